"""`g2sd-cache extract`: run the frozen MAE teacher once per sampled view and store G2SD's targets.

    listing -> shards (runs of the seeded listing order, or one per tar) -> this rank's unfinished shards
      -> DataLoader workers: decode image, sample K views, crop + flip,
         cut each view's visible patches (all the teacher sees)          (extract_views.RenderedImages)
      -> main: batches of views of one shard -> teacher -> LN(z_t) -> codec, + the patches (_ShardAssembler)
      -> background thread: write the shard atomically                   (writer.ShardWriter)
    rank 0, after every rank is done: manifest.json from the shards' records.

Batches never mix shards, so a shard's bytes do not depend on which shards were already done:
after a kill and a rerun, the cache equals an uninterrupted run's, array by array.
Memory is bounded by the shard size (one shard filling, one being written), never by the dataset.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from g2sd_cache.cache import codecs
from g2sd_cache.cache.lossless import LOSSLESS_ARRAY
from g2sd_cache.cache.pixel_codecs import DEFAULT_QUALITY, JPEG_ARRAY, PIXEL_MODES, decode_jpegs
from g2sd_cache.common.config import check_seed, to_yaml
from g2sd_cache.common.dist import DIST_TIMEOUT_MIN, DistEnv, run_on_ranks
from g2sd_cache.common.errors import UserError
from g2sd_cache.models.mae import TEACHER_PRESETS, build_teacher
from g2sd_cache.cache.destination import open_destination
from g2sd_cache.cache.schema import (CONFIG, VLEN_BYTES, ShardRecord, array_specs, encode_keys,
                                     shard_name)
from g2sd_cache.data.sources import FolderSource, Source, TarSource, open_source
from g2sd_cache.data.views import ViewGeometry, normalize_patches
from g2sd_cache.common.workers import keep_as_is, mp_context
from g2sd_cache.training.precision import TEACHER_PRECISIONS, recorded_precision, resolve_teacher_precision, teacher_autocast
from g2sd_cache.cache.writer import ShardData, ShardWriter
from g2sd_cache.generic.extract_views import RenderedImages, ShardPlan
from g2sd_cache.cache.inspect import format_calibration
from g2sd_cache.generic.calibrate import (AUTO, Calibration, calibrate, needs_calibration, read_calibration,
                                          teacher_targets, write_calibration)
from g2sd_cache.generic.manifest import write_manifest


@dataclass(frozen=True)
class ExtractConfig:
    data: str
    out: str
    teacher: str = "random"
    arch: str = "mae_vit_base_patch16"
    views: int = 1
    seed: int = 0
    target_layer: int = 4
    mask_ratio: float = 0.75
    img_size: int = 224
    codec: str = "fp16"
    shard_size: int = 2048
    chunk_views: int = 64
    batch_size: int = 64
    workers: int = dataclasses.field(default_factory=lambda: min(8, os.cpu_count() or 1))
    device: str = "auto"
    on_error: str = "skip"
    overwrite: bool = False
    pixels: str = "visible"
    teacher_precision: str = "auto"   # auto: fp16 autocast on CUDA (G2SD's), fp32 on CPU
    dist_timeout: float = DIST_TIMEOUT_MIN   # minutes a collective waits for the other ranks
    pixel_quality: int = DEFAULT_QUALITY     # --pixels jpeg: the JPEG quality (1..100)
    max_error: float | None = None     # --codec auto: the largest relative RMS error of decoded targets allowed
    calibration_views: int = 256       # views the codecs are measured (and a low-rank basis fitted) on
    staging: str | None = None         # --out is a URL: local folder where shards are written before upload
    lease_s: float = 120.0             # --out is a URL: the lock's lease, renewed every third of it

    # Fields that decide the cache's content; a rerun with any of them changed is refused.
    # The teacher is compared by the sha256 of its weights (fingerprints), not by how its path was typed.
    CONTENT = ("arch", "views", "seed", "target_layer", "mask_ratio", "img_size", "codec",
               "shard_size", "chunk_views", "pixels", "pixel_quality", "max_error", "calibration_views")

    @property
    def geometry(self) -> ViewGeometry:
        return ViewGeometry(img_size=self.img_size, patch_size=TEACHER_PRESETS[self.arch].patch_size,
                            mask_ratio=self.mask_ratio)

    def validate(self) -> None:
        if self.arch not in TEACHER_PRESETS:
            raise UserError(f"unknown --arch {self.arch}; choose one of: {', '.join(TEACHER_PRESETS)}")
        if self.codec != AUTO:
            codecs.get_codec(self.codec)
        if (self.codec == AUTO) != (self.max_error is not None):
            raise UserError("--codec auto chooses by --max-error E: give both (or neither)")
        if self.max_error is not None and not 0 < self.max_error < 1:
            raise UserError(f"--max-error {self.max_error}: a relative RMS error in (0, 1), e.g. 0.05")
        if self.calibration_views < 2:
            raise UserError("--calibration-views must be at least 2")
        depth = TEACHER_PRESETS[self.arch].decoder_depth
        if not 1 <= self.target_layer <= depth:
            raise UserError(f"--target-layer {self.target_layer}: must be between 1 and {depth} "
                            f"(the teacher's decoder blocks)")
        self.geometry.check()
        check_seed(self.seed)
        for name in ("views", "shard_size", "chunk_views", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.workers < 0:
            raise UserError("--workers must be 0 or more")
        if self.on_error not in ("skip", "fail"):
            raise UserError(f"--on-error {self.on_error}: choose skip or fail")
        if self.teacher_precision not in TEACHER_PRECISIONS:
            raise UserError(f"--teacher-precision {self.teacher_precision}: choose one of "
                            f"{', '.join(TEACHER_PRECISIONS)}")
        if self.pixels not in PIXEL_MODES:
            raise UserError(f"--pixels {self.pixels}: choose {', '.join(PIXEL_MODES)}")
        if not 1 <= self.pixel_quality <= 100:
            raise UserError(f"--pixel-quality {self.pixel_quality}: must be between 1 and 100")

    @property
    def visible_pixels(self) -> tuple[int, int] | None:
        """(n_keep, patch size) when the cache stores the views' visible patches."""
        g = self.geometry
        return (g.num_visible, g.patch_size) if self.pixels != "none" else None


def plan_shards(source: Source, cfg: ExtractConfig) -> list[ShardPlan]:
    """Tars: one shard each, in order. Folders: runs of a seeded random order of the listing, so that a
    class-sorted folder gives shards (and inner chunks) of mixed classes; see schema.folder_order."""
    if isinstance(source, TarSource):
        return [ShardPlan(i) for i in range(len(source))]
    per_shard = max(1, cfg.shard_size // cfg.views)
    if per_shard >= cfg.chunk_views:  # whole inner chunks: zarr stores a partial edge chunk at full size
        per_shard -= per_shard % cfg.chunk_views
    n = len(source)
    return [ShardPlan(i, s, min(n, s + per_shard)) for i, s in enumerate(range(0, n, per_shard))]


# ----------------------------------------------------------------------------------------------
# Main process: teacher batches and shard assembly.

class _ShardAssembler:
    """Collects one shard's images (in order), runs the teacher on full batches of their views and
    keeps the encoded targets in [K, capacity, ...] buffers that grow as needed."""

    def __init__(self, plan: ShardPlan, source: Source, cfg: ExtractConfig, tokens: int, width: int,
                 basis: torch.Tensor | None = None, jpeg_decoder: str = "cpu"):
        self.plan, self.cfg, self.basis = plan, cfg, basis    # cfg.codec resolved; basis: a low-rank codec's
        self.jpeg_decoder = jpeg_decoder
        self.codec = codecs.get_codec(cfg.codec)
        self.specs = array_specs(self.codec, tokens, width, cfg.geometry.num_patches, cfg.visible_pixels, cfg.pixels)
        self.expected = plan.stop - plan.start if isinstance(source, FolderSource) else None
        self.received = 0
        self.images = 0
        self.skipped: list[dict] = []
        self.image_crc32c: list[int] = []      # per stored row: crc32c of the source bytes
        self.codec_error: dict = {}
        self.pending: list[tuple[int, int, torch.Tensor]] = []   # (row, view, patches [n_keep,p,p,3])
        self.buffers: dict[str, np.ndarray] = {}
        self._grow(self.expected or 64)

    def _grow(self, capacity: int) -> None:
        k = self.cfg.views
        for name, spec in self.specs.items():
            # keys: kept as str objects until the shard is finished; jpeg: bytes objects
            variable = None in spec.per_view_shape or spec.dtype == VLEN_BYTES
            new = np.empty((k, capacity) if variable else (k, capacity, *spec.per_view_shape),
                           dtype=object if variable else spec.dtype)
            if name in self.buffers:
                new[:, : self.images] = self.buffers[name][:, : self.images]
            self.buffers[name] = new

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.received == self.expected

    def add(self, item: dict) -> None:
        """An image's rendered views (or its error), in shard order."""
        self.received += 1
        if "error" in item:
            self.skipped.append({"key": item["key"], "error": item["error"]})
            return
        row = self.images
        if row == self.buffers["target"].shape[1]:
            self._grow(2 * row)
        b = self.buffers
        b["crop"][:, row], b["flip"][:, row], b["mask"][:, row] = item["crop"], item["flip"], item["mask"]
        b["source_index"][:, row], b["key"][:, row] = item["index"], item["key"]
        if item.get("jpeg") is not None:
            if item["patches"] is None:    # encoded by the worker, decoded here by the GPU decoder
                g = self.cfg.geometry
                item["patches"] = decode_jpegs(item["jpeg"], g.num_visible, g.patch_size, self.jpeg_decoder).cpu()
            for v, blob in enumerate(item["jpeg"]):
                b[JPEG_ARRAY][v, row] = blob
        for v, blob in enumerate(item.get("lossless") or ()):   # the exact patches, encoded by the worker
            b[LOSSLESS_ARRAY][v, row] = blob
        if "pixels" in b:
            b["pixels"][:, row] = item["patches"].numpy()
        self.image_crc32c.append(item["crc32c"])
        for v in range(self.cfg.views):
            self.pending.append((row, v, item["patches"][v]))
        self.images += 1

    def run_teacher(self, teacher, device: torch.device, flush: bool = False, precision: str = "fp32") -> int:
        """Run the teacher (in resolved `precision`) on full batches of pending views (and the remainder if
        `flush`). Returns views done."""
        done = 0
        bs = self.cfg.batch_size
        while len(self.pending) >= bs or (flush and self.pending):
            batch, self.pending = self.pending[:bs], self.pending[bs:]
            rows = np.array([r for r, _, _ in batch])
            vis = np.array([v for _, v, _ in batch])
            patches = torch.stack([p for _, _, p in batch]).to(device, non_blocking=True)
            mask = torch.from_numpy(self.buffers["mask"][vis, rows]).to(device)
            with teacher_autocast(precision, device)():
                target = teacher.targets_visible(normalize_patches(patches), mask, self.cfg.target_layer)
            bad = ~torch.isfinite(target).flatten(1).all(dim=1)
            if bool(bad.any()):
                j = int(bad.nonzero()[0, 0])
                raise UserError(f"teacher output is not finite (NaN or Inf) for image {self.buffers['key'][vis[j], rows[j]]} "
                                f"view {vis[j]}; nothing of shard {shard_name(self.plan.index)} was written. "
                                f"Check the teacher checkpoint")
            if not self.codec_error:
                sample = target[:64].float()
                # low-rank codecs only against this cache's basis, and only the ranks it holds
                width = sample.shape[-1]
                measured = {name: c for name, c in {**codecs.CODECS, self.codec.name: self.codec}.items()
                            if c.rank is None or (self.basis is not None and c.fits(width)
                                                  and c.basis_rank(width) < len(self.basis))}
                self.codec_error = {name: codecs.codec_error(c, sample, self.basis) for name, c in measured.items()}
            seeds = (codecs.dither_seeds(self.cfg.seed, self.buffers["source_index"][vis, rows], vis)
                     if self.codec.dithered else None)    # int4, pcaA+B+C: a pure function of (seed, image, view)
            codes, scale = codecs.encode(self.codec, target, seeds, self.basis)
            self.buffers["target"][vis, rows] = codecs.to_storage(self.codec, codes)
            if scale is not None:
                self.buffers["scale"][vis, rows] = scale.cpu().numpy()
            done += len(batch)
        return done

    def finish(self, source: Source) -> ShardData:
        n = self.images
        arrays = {name: buf[:, :n] for name, buf in self.buffers.items()}
        arrays["key"] = encode_keys(arrays["key"].astype(str))
        tar = source.urls[self.plan.index] if isinstance(source, TarSource) else None
        record = ShardRecord(index=self.plan.index, images=n, views_per_image=self.cfg.views,
                             start=None if tar else self.plan.start, stop=None if tar else self.plan.stop, tar=tar,
                             skipped=self.skipped, codec_error=self.codec_error, image_crc32c=self.image_crc32c)
        return ShardData(record, arrays)


# ----------------------------------------------------------------------------------------------

def _prepare_output(dest, cfg: ExtractConfig, fingerprints: dict) -> None:
    """Rank 0: claim and lock the cache (cache/ownership.py, cache/destination.py: only a cache is resumed or
    overwritten; a second extract into it is refused), then check that an existing cache was made by the
    same configuration."""
    dest.claim(cfg.overwrite)
    old = dest.read_config()
    if old is not None:
        new = dataclasses.asdict(cfg) | fingerprints
        # a key the old config lacks (a flag added since) had its default then
        old = {k: getattr(ExtractConfig, k) for k in ("max_error", "calibration_views")} | old
        diff = [k for k in (*ExtractConfig.CONTENT, *fingerprints) if old.get(k) != new.get(k)]
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            raise UserError(f"--out {cfg.out} holds a cache made with another configuration ({changes}); "
                            f"pass --overwrite to replace it or choose another --out")
    dest.write_text(CONFIG, to_yaml(cfg, fingerprints))


def jpeg_decoder(device: torch.device) -> str:
    """The JPEG decoder whose output the teacher sees (--pixels jpeg): nvjpeg beside a GPU teacher, else libjpeg-turbo."""
    return "cuda" if device.type == "cuda" else "cpu"



def run_extract(cfg: ExtractConfig) -> dict:
    """Extract the cache described by `cfg`; returns the summary that the CLI prints."""
    dests = []       # the destination is opened after validation, on every rank; released whatever happens

    def body(cfg: ExtractConfig, env: DistEnv) -> dict:
        dests.append(open_destination(cfg.out, cfg.staging, cfg.lease_s))
        return _extract(cfg, env, dests[0])
    return run_on_ranks(cfg, body, release=lambda: [d.release() for d in dests], command="extract")


def _calibrate(cfg: ExtractConfig, source: Source, plans: list[ShardPlan], teacher, device,
               precision: str) -> Calibration:
    """Rank 0: the teacher's targets of the cache's first views (as extract renders them) -> the codec and basis."""
    items = RenderedImages(source, plans, cfg)
    x = teacher_targets(iter(items), teacher, device, cfg.calibration_views, cfg.batch_size, cfg.target_layer,
                        autocast=teacher_autocast(precision, device))
    return calibrate(x, cfg.codec, cfg.max_error)


def _extract(cfg: ExtractConfig, env: DistEnv, dest) -> dict:
    source = open_source(cfg.data)
    if isinstance(source, TarSource) and cfg.shard_size != ExtractConfig.shard_size:
        print("note: --shard-size is ignored for tar sources: the cache keeps one shard per tar")
    teacher, info = build_teacher(cfg.teacher, cfg.arch, cfg.img_size)
    teacher.to(env.device)
    precision = resolve_teacher_precision(cfg.teacher_precision, env.device)
    tokens, width = teacher.num_tokens, teacher.shape.decoder_embed_dim
    # the teacher's arithmetic is part of every target: shards of one cache share it
    fingerprints = {"teacher_sha256": info.sha256, "source_fingerprint": source.fingerprint,
                    "teacher_precision": recorded_precision(precision)}
    if isinstance(source, FolderSource):  # the images' order in the shards is part of the cache's content
        fingerprints["folder_order"] = "seeded shuffle"
    decoder = jpeg_decoder(env.device)
    if cfg.pixels == "jpeg":   # the teacher's pixels depend on the decoder: a resume must use the same one
        fingerprints["pixel_decoder"] = decoder
    plans = plan_shards(source, cfg)
    if env.is_main:
        _prepare_output(dest, cfg, fingerprints)
        if needs_calibration(cfg.codec) and read_calibration(dest) is None:   # fitted here, uploaded before any shard
            write_calibration(dest, _calibrate(cfg, source, plans, teacher, env.device, precision))
    env.barrier()
    cal = read_calibration(dest) or Calibration(cfg.codec)
    if env.is_main and cal.record is not None:
        print(format_calibration(cal.record))
    written = dataclasses.replace(cfg, codec=cal.codec)     # --codec auto resolved
    mine = [p for p in plans if p.index % env.world == env.rank]
    pending = [p for p in mine if not dest.is_complete(p.index)]
    dest.clear_unfinished([p.index for p in pending])
    if env.is_main and len(pending) < len(mine):
        print(f"resuming: {len(mine) - len(pending)} of {len(mine)} shards of this rank are already complete")

    dataset = RenderedImages(source, pending, cfg, decoder)
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.workers, collate_fn=keep_as_is,
                        multiprocessing_context=mp_context(cfg.workers, __name__),
                        pin_memory=env.device.type == "cuda", prefetch_factor=4 if cfg.workers else None)
    total = sum(p.stop - p.start for p in pending) * cfg.views if isinstance(source, FolderSource) else None
    bar = tqdm(total=total, unit="view", desc=f"extract[{env.rank}]" if env.world > 1 else "extract",
               disable=not env.is_main, dynamic_ncols=True, smoothing=0.05)
    writer = ShardWriter(dest.staging, cfg.chunk_views, publish=dest.publish)
    assemblers: dict[int, _ShardAssembler] = {}
    plan_by_index = {p.index: p for p in pending}
    views_done, skipped = 0, 0
    waited = teacher_s = write_wait = 0.0
    start = time.perf_counter()
    try:
        items = iter(loader)
        while True:
            t0 = time.perf_counter()
            item = next(items, None)
            waited += time.perf_counter() - t0     # data loading the teacher could not hide
            if item is None:
                break
            s = item["shard"]
            asm = assemblers.get(s) or assemblers.setdefault(
                s, _ShardAssembler(plan_by_index[s], source, written, tokens, width, cal.basis, decoder))
            if "end" in item:
                asm.expected = asm.received
            elif "error" in item:
                if cfg.on_error == "fail":
                    raise UserError(f"cannot read image {item['key']}: {item['error']}; fix or remove it, "
                                    f"or rerun with --on-error skip")
                skipped += 1
                asm.add(item)
            else:
                asm.add(item)
            t0 = time.perf_counter()
            done = asm.run_teacher(teacher, env.device, flush=asm.complete, precision=precision)
            teacher_s += time.perf_counter() - t0
            views_done += done
            bar.update(done)
            if asm.complete:
                t0 = time.perf_counter()
                writer.submit(asm.finish(source))
                write_wait += time.perf_counter() - t0   # blocked behind the previous shard's write
                del assemblers[s]
        if assemblers:  # cannot happen unless the loader stopped early
            raise RuntimeError(f"shards {sorted(assemblers)} did not receive all their images")
        writer.close()
    finally:
        writer.abandon()
        bar.close()
    elapsed = time.perf_counter() - start
    env.barrier()

    summary = {"views": views_done, "teacher_precision": precision, "skipped_images": skipped, "bytes": writer.bytes_written,
               "seconds": elapsed, "views_per_s": views_done / elapsed if elapsed > 0 else 0.0,
               "teacher_s": teacher_s, "data_wait_s": waited, "write_wait_s": write_wait,
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if env.device.type == "cuda":
        summary["peak_gpu_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    if env.is_main:
        dest.check()
        manifest = write_manifest(dest, written, source, plans, info, tokens, width, recorded_precision(precision), cal,
                                  decoder)
        on_disk = sum(sum(s.files.values()) for s in manifest.shards)
        summary.update(cache_views=manifest.views, cache_images=manifest.images, cache_skipped=len(manifest.skipped),
                       cache_bytes=on_disk, bytes_per_view=on_disk / max(1, manifest.views))
    return summary
