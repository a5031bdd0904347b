"""Training data for one rank: the plan's sample positions -> steps of micro-batches, by one of two paths.

**Pixel path** (a cache that stores the views' visible patches — the default): no image file is opened,
no decoder runs and no worker process starts. A webdataset pipeline runs on a background thread:

    micro-batch positions (generic/plan.py: the epoch's global order, this rank's slices)
      -> read_cached: Cache.take scatters visible patches, target codes, scales and masks straight from
         the memory-mapped shard files into (pinned) batch buffers — one copy per byte
      -> group_steps: `accum` micro-batches per optimizer step

**Image path** (online G2SD, replay, caches made with `--pixels none`): DataLoader workers decode images.
Worker w renders the rank's samples w, w + W, w + 2W, ... (each: read the image, sample a fresh view or
replay the cached crop/flip, cut the visible patches); the DataLoader takes one sample from each worker in
turn, which puts them back in plan order, and the main process collates them on a background thread.
Any number of workers gives the same samples in the same order.

Either way a micro-batch is a `Batch` of visible patches (uint8, normalised on the device), masks and, for
a cache, the target codes in the cache's codec, which go straight into the loss kernel. From a `--pixels
lossless` cache the host only decompresses: the batch holds the patches' residual planes, and
`Batch.device_patches` undoes the filter on the device (cache/lossless.py), as a low-rank cache's targets are
decoded there. A stand-in sample
(the padding of an epoch's last global batch, or under --on-error skip a sample that could not be read)
keeps its place with `valid` False, so every rank still runs the same steps, and the loss ignores it.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from g2sd_cache.cache import lossless
from g2sd_cache.cache.reader import Cache
from g2sd_cache.cache.digests import check_image
from g2sd_cache.common.grouping import group_positions
from g2sd_cache.generic.host_buffers import BatchBuffers
from g2sd_cache.generic.plan import PAD, EpochOrder
from g2sd_cache.data.sources import Source, TarSource
from g2sd_cache.data.views import ViewGeometry, decode_image, render_view, sample_view, visible_patches
from g2sd_cache.common.workers import keep_as_is, mp_context


@dataclass(frozen=True)
class StreamSpec:
    """What it takes to materialise a rank's samples. `view` is the cached view index this epoch uses
    (epoch mod K) with a cache, or the view counter of fresh views (the epoch) online."""

    source: Source | None            # None: a pixel cache trained without --data
    cache: Cache | None
    geometry: ViewGeometry
    seed: int
    view: int
    order: EpochOrder
    keys: bool = False               # also return each sample's source key (--log-samples)

    @property
    def reads_pixels(self) -> bool:
        return self.cache is not None and self.cache.has_pixels


@dataclass
class Batch:
    """A micro-batch. patches [B, n_keep, p, p, 3] uint8; mask [B, L] bool (True = hidden); valid [B] bool;
    codes [B, T, D'] in the codec's dtype and scale [B, T] float32 (int4: [B, T, D/32] float16) (cached), or
    None (online);
    index [B] int64 source image index (-1 for stand-ins); view [B] int64; keys (with spec.keys, else empty);
    errors: why invalid samples that are not padding could not be read. `residual`: `patches` holds a lossless
    cache's residual planes [B, n_keep, 3, p, p] instead (zeros decode to zeros): read them with `device_patches`."""

    patches: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor
    codes: torch.Tensor | None
    scale: torch.Tensor | None
    index: torch.Tensor
    view: torch.Tensor
    keys: list[str]
    errors: list[str]
    residual: bool = False

    def __len__(self) -> int:
        return self.patches.shape[0]

    def device_patches(self, device: torch.device | str) -> torch.Tensor:
        """uint8 [B, n_keep, p, p, 3] on `device`: the copy, then (lossless) the filter undone there."""
        x = self.patches.to(device, non_blocking=True)
        return lossless.unfilter(x) if self.residual else x


def stand_in_mask(g: ViewGeometry) -> np.ndarray:
    """A valid mask (first patches visible) for stand-in samples, which only keep batch shapes."""
    mask = np.ones(g.num_patches, dtype=bool)
    mask[: g.num_visible] = False
    return mask


# ----------------------------------------------------------------------------------------------
# Pixel path: block reads from the memory-mapped cache, on a background thread.

def read_cached(spec: StreamSpec, pin: bool, keep: int = 8):
    """Stage: positions [B] (PAD for stand-ins) -> Batch, read from a cache that stores pixels.
    `keep`: batch buffers kept for reuse (about the batches alive at once; see host_buffers.py)."""
    cache, g = spec.cache, spec.geometry
    specs = cache.specs
    # a jpeg cache's views are decoded into the same uint8 pixel buffers (Cache.take); a lossless cache's are only
    # decompressed, into residual planes of the same bytes, which the device finishes (Batch.device_patches)
    pix = lossless.LOSSLESS_ARRAY if cache.lossless else "pixels"
    shapes = {pix: (cache.residual_shape if cache.lossless else cache.pixel_shape, "uint8")} | {
        n: (specs[n].per_view_shape, specs[n].dtype) for n in ("target", "scale", "mask", "source_index") if n in specs}
    buffers = BatchBuffers(shapes, pin, keep)
    codec_dtype = cache.codec.torch_dtype
    stand_in = stand_in_mask(g)

    def stage(src: Iterator[np.ndarray]):
        for pos in src:
            b = len(pos)
            t = out = None    # the previous batch's views let go first, so its block can be handed out again
            t, out = buffers.get(b)
            valid = pos != PAD
            errors: list[str] = []
            units, rows = spec.order.unit[pos[valid]], spec.order.row[pos[valid]]
            at_all = np.flatnonzero(valid)
            for u, i in group_positions(units):
                rows_u, at = rows[i], at_all[i]
                try:
                    cache.take(u, spec.view, rows_u, out, at)
                except Exception:   # find the rows that fail: they become stand-ins (--on-error decides)
                    for r, a in zip(rows_u, at):
                        try:
                            cache.take(u, spec.view, np.array([r]), out, np.array([a]))
                        except Exception as e:
                            valid[a] = False
                            errors.append(f"{cache.shard_name(u)} row {r} view {spec.view}: {e}")
            invalid = np.flatnonzero(~valid)
            if len(invalid):       # stand-ins: zeros, and a valid mask so shapes and kernels stay happy
                for name in out:
                    out[name][invalid] = 0
                out["mask"][invalid] = stand_in
                out["source_index"][invalid] = -1
            keys = _keys(cache, spec, pos) if spec.keys else []
            yield Batch(patches=t[pix], residual=cache.lossless, mask=t["mask"], valid=torch.from_numpy(valid),
                        codes=t["target"].view(codec_dtype), scale=t.get("scale"), index=t["source_index"],
                        view=torch.full((b,), spec.view, dtype=torch.int64), keys=keys, errors=errors)
    return stage


def _keys(cache: Cache, spec: StreamSpec, pos: np.ndarray) -> list[str]:
    keys = [""] * len(pos)
    for i, p in enumerate(pos):
        if p != PAD:
            try:
                keys[i] = cache.keys(int(spec.order.unit[p]), spec.view, spec.order.row[p:p + 1])[0]
            except Exception:   # a corrupt key array: the sample is already a stand-in or will fail elsewhere
                pass
    return keys


def group_steps(accum: int):
    """Stage: Batch -> list of `accum` Batches (one optimizer step)."""
    def stage(src):
        step = []
        for batch in src:
            step.append(batch)
            if len(step) == accum:
                yield step
                step = []
        if step:
            yield step
    return stage


# ----------------------------------------------------------------------------------------------
# Image path: DataLoader workers decode, render and cut the visible patches.

class ImageSamples(IterableDataset):
    """The rank's remaining samples (flat plan positions), rendered by worker w for flat indices w, w + W, ..."""

    def __init__(self, spec: StreamSpec, positions: np.ndarray):
        self.spec, self.positions = spec, positions

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = range(w, len(self.positions), workers)
        tar_images = _TarImages(self.spec, self.positions, mine) if isinstance(self.spec.source, TarSource) else None
        for i in mine:
            yield render_sample(self.spec, i, int(self.positions[i]), tar_images)


class _TarImages:
    """A worker's images from tar sources: tars are read sequentially, so when a worker reaches a tar it
    streams it once, keeping the images of its own samples from that tar (contiguous in its order)."""

    def __init__(self, spec: StreamSpec, positions: np.ndarray, mine: range):
        self.spec = spec
        self.rows: dict[int, list[int]] = {}
        for i in mine:
            p = int(positions[i])
            if p != PAD:
                self.rows.setdefault(int(spec.order.unit[p]), []).append(int(spec.order.row[p]))
        self.unit, self.images = -1, {}

    def get(self, unit: int, key: str) -> bytes | None:
        if unit != self.unit:
            self.unit, self.images = unit, {}
            wanted = set(self.spec.cache.keys(unit, self.spec.view, np.array(self.rows.get(unit, []), dtype=np.int64)))
            for k, data in self.spec.source.samples(unit, on_error=lambda exc: True):
                if k in wanted and data is not None:
                    self.images[k] = data
                    if len(self.images) == len(wanted):
                        break
        return self.images.get(key)


def render_sample(spec: StreamSpec, i: int, pos: int, tar_images: _TarImages | None = None) -> dict:
    """Sample at flat index i (plan position `pos`): {"i", "patches" [n_keep, p, p, 3] uint8, "mask" [L],
    "valid", "error", "index", "key", "codes"/"scale" (cached)}. Never raises: a failure is a stand-in."""
    g, cache = spec.geometry, spec.cache
    sample = {"i": i, "valid": False, "error": "", "index": -1, "key": ""}
    specs = cache.specs if cache is not None else {}
    arrays = {n: np.zeros((1, *specs[n].per_view_shape), dtype=specs[n].dtype)
              for n in ("target", "scale", "mask", "crop", "flip", "source_index") if n in specs}
    if pos != PAD:
        try:
            _render(spec, sample, arrays, int(spec.order.unit[pos]), int(spec.order.row[pos]), tar_images)
            sample["valid"] = True
        except Exception as e:
            sample["error"] = f"{sample['key'] or 'view'}: {type(e).__name__}: {e}"
    if not sample["valid"]:   # a stand-in: zeros and a valid mask keep the batch's shapes
        sample["patches"] = torch.zeros(g.num_visible, g.patch_size, g.patch_size, 3, dtype=torch.uint8)
        sample["mask"] = torch.from_numpy(stand_in_mask(g))
        for a in arrays.values():
            a[...] = 0
    for name, key in (("target", "codes"), ("scale", "scale")):
        if name in arrays:
            sample[key] = torch.from_numpy(arrays[name][0])
    return sample


def _render(spec: StreamSpec, sample: dict, arrays: dict[str, np.ndarray], unit: int, row: int,
            tar_images: _TarImages | None) -> None:
    """Fill `sample` (and the cached `arrays`) for row `row` of `unit`: read, decode, view, visible patches."""
    g, cache = spec.geometry, spec.cache
    if cache is not None:
        cache.take(unit, spec.view, np.array([row]), arrays, np.array([0]))
        sample["index"] = int(arrays["source_index"][0])
        key = sample["key"] = cache.keys(unit, spec.view, np.array([row]))[0]
    else:
        sample["index"] = row
        key = sample["key"] = spec.source.keys[row]
    raw = tar_images.get(unit, key) if tar_images is not None else spec.source.read(key)
    if raw is None:
        raise FileNotFoundError(f"image {key} is not in its tar shard")
    if cache is not None:   # the bytes extract read, or the cached crop/flip/mask describe another picture
        check_image(raw, cache.image_crc32c(unit, row), key)
    img = decode_image(raw)
    if cache is None:
        v = sample_view(spec.seed, row, spec.view, img.size, g)
        crop, flip, mask = v.crop, v.flip, v.mask
    else:
        crop, flip, mask = tuple(int(c) for c in arrays["crop"][0]), bool(arrays["flip"][0]), arrays["mask"][0]
    mask_t = torch.from_numpy(np.asarray(mask, dtype=bool).copy())
    pixels = render_view(img, crop, flip, g.img_size)
    sample["patches"] = visible_patches(pixels[None], mask_t[None], g.patch_size)[0]
    sample["mask"] = mask_t


def collate(samples: list[dict], spec: StreamSpec, pin: bool) -> Batch:
    codes = scale = None
    if "codes" in samples[0]:
        codes = torch.stack([s["codes"] for s in samples])
        dtype = spec.cache.codec.torch_dtype
        codes = codes.view(dtype) if codes.dtype != dtype else codes
        if "scale" in samples[0]:
            scale = torch.stack([s["scale"] for s in samples])
    batch = Batch(patches=torch.stack([s["patches"] for s in samples]),
                  mask=torch.stack([s["mask"] for s in samples]),
                  valid=torch.tensor([s["valid"] for s in samples]), codes=codes, scale=scale,
                  index=torch.tensor([s["index"] for s in samples], dtype=torch.int64),
                  view=torch.full((len(samples),), spec.view, dtype=torch.int64),
                  keys=[s["key"] for s in samples] if spec.keys else [],
                  errors=[s["error"] for s in samples if s["error"]])
    if pin:
        for name in ("patches", "mask", "valid", "codes", "scale"):
            t = getattr(batch, name)
            if t is not None:
                setattr(batch, name, t.pin_memory())
    return batch


# ----------------------------------------------------------------------------------------------

class StepLoader:
    """The remaining optimizer steps of one rank's epoch, each a list of `accum` micro-batches, in plan order.

    positions: [steps, per_rank] plan positions (plan.rank_positions); per_rank = batch_size x accum."""

    def __init__(self, spec: StreamSpec, positions: np.ndarray, *, batch_size: int, workers: int, prefetch: int,
                 pin_memory: bool):
        if positions.shape[1] % batch_size:
            raise ValueError(f"{positions.shape[1]} samples per step is not a multiple of the batch {batch_size}")
        self.spec, self.positions, self.batch_size = spec, positions, batch_size
        self.accum = positions.shape[1] // batch_size
        self.workers, self.prefetch, self.pin = workers, prefetch, pin_memory

    def __len__(self) -> int:
        return len(self.positions)

    def _micro_positions(self) -> Iterator[np.ndarray]:
        return iter(self.positions.reshape(-1, self.batch_size))

    def _steps(self) -> Iterator[list[Batch]]:
        if self.spec.reads_pixels:
            # batches alive at once: the queue's steps, the one being read and the one being trained on
            keep = (self.prefetch + 3) * self.accum
            return iter(wds.DataPipeline(self._micro_positions, read_cached(self.spec, self.pin, keep),
                                         group_steps(self.accum)))
        return group_steps(self.accum)(self._image_batches())

    def _image_batches(self) -> Iterator[Batch]:
        flat = self.positions.reshape(-1)
        dataset = ImageSamples(self.spec, flat)
        samples = iter(dataset) if self.workers == 0 else iter(DataLoader(
            dataset, batch_size=None, num_workers=self.workers, collate_fn=keep_as_is,
            multiprocessing_context=mp_context(self.workers, __name__), prefetch_factor=self.prefetch))
        pending: list[dict] = []
        for expected, sample in enumerate(samples):
            if sample["i"] != expected:
                raise RuntimeError(f"data order broke: got sample {sample['i']}, expected {expected}")
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield collate(pending, self.spec, self.pin)
                pending = []

    def __iter__(self) -> Iterator[list[Batch]]:
        """Steps are produced on a background thread, `prefetch` ahead, so reading overlaps the step."""
        return _background(self._steps, self.prefetch)


def _background(make: Callable[[], Iterator], depth: int) -> Iterator:
    """Run iterator `make()` on a daemon thread, `depth` items ahead; errors re-raise in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():   # never block past a stop: the consumer may have gone
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        items = None
        try:   # set-up inside: an error building the reader reaches the consumer, never a silent hang
            items = make()
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as e:
            put(e)
        finally:
            close = getattr(items, "close", None)
            if close:
                close()   # ends a DataLoader iterator, so its workers exit now

    thread = threading.Thread(target=produce, name="batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = q.get(timeout=0.5)
            except queue.Empty:
                # a producer that died without its last word (killed mid-put) must not leave us waiting
                if not thread.is_alive() and q.empty():
                    raise RuntimeError("the batch-reader thread ended without a result") from None
                continue
            if item is end:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
