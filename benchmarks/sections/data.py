"""Data section, per core: what each input path costs the CPU, as `g2sd-cache train` runs it.

Every path is train's own loader (`StepLoader`, built by train's `epoch_loader`) with workers=0 (so the
image path renders in this process) and torch at one thread, its epoch's positions repeated until a pass
holds `image_views` / `cached_views` views (a benchmark epoch of a hundred views would otherwise measure
the per-epoch set-up that a real epoch of a million views amortises). Rates are per CPU-second of this
process, all threads (the pixel path reads on a background thread), so they are per-core figures even on
a busy machine; wall-clock rates are in the JSON. The cache files were just written, so reads come from
the page cache: this is decoding and copying, not disk.

- `image_only_samples_per_s`: the image path (online G2SD, replay): read the JPEG, decode, sample the
  view, crop + resize + flip, cut the visible patches, collate.
- `cached_samples_per_s`: the default cached path (a cache that stores pixels): visible patches, targets,
  masks scattered from the memory-mapped shards into the batch buffers; no image is opened.
- `pixel_cache_speedup` = cached / image-only (targets: >= 20x, and >= 8,000 views/s per core in fp16).
- `cached_first_read_samples_per_s`: the cached path on a freshly opened cache, where each inner chunk's
  crc32c is checked on its first read (once per process and chunk, so an epoch's first pass over a view).
- `no_pixels_samples_per_s`: a `--pixels none` cache: targets from the cache, the image decoded as above.
- `read_ms_per_batch`: one batch's `Cache.take` per array alone, and the rest of the pixel path's step
  (buffers, plan lookups, batch assembly, the reader thread's hand-over): where its time goes.
- `cached_gb_per_s`: the bytes a view brings (pixels + target codes + scales + mask) times the cached rate,
  against `memcpy_gb_per_s`: np.copyto of the same batch bytes from a ring larger than the last-level cache
  (DRAM-bound, as page-cache reads are).
- `remote`: the cached path from a local S3 server through the node-local copy, cold and warm, time to
  first batch, bytes fetched per epoch against its share of the cache (benchmarks/sections/remote.py).
- `feed_cores_per_gpu` {image, cached}: cores needed to feed one GPU training the default student at R
  samples/s, R / per-core rate. With --device cuda, R is that student's measured step rate (step section,
  the student alone); otherwise R is an ESTIMATE: `assumed_gpu_tflops` / the student's FLOPs per sample.
- `cached_samples_per_s_by_codec` {default codec, pca64, pca64+lossless, pca64+jpeg}: the cached pixel path on a
  cache of each codec (pca64: a low-rank cache of the storage images, 13 KB of targets per ViT-B view instead of
  202 KB; with exact pixels, `--pixels lossless` or `--pixels jpeg`). Its host-side work is the whole loader (read
  codes + scales + pixels; lossless: decompress the residual planes; jpeg: decode on the CPU); the low-rank decode
  (codes x scale @ basis + centre) and the lossless unfilter run on the device, after the copy:
  `lowrank_decode_ms_per_batch`, timed on --device (on a CPU run it is CPU work, on CUDA GPU work).
  At the CPU profile's batch of 16 a fixed ~0.2-0.3 ms of Python per batch (five arrays' reads, buffers, the
  hand-over) is a large share; benchmarks/pixels.py measures the same loader at a GPU's batch of 256 too.
- `feed_cores_per_gpu_by_student` {student: {codec: cores}}: cores per GPU at each student's rate (measured on
  CUDA, else the same TFLOPS estimate over its FLOPs): the default ViT-S and ViT-T (3.3 GFLOP, ~3.5x the rate).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from g2sd_cache.benchmarks.sections import Bench, section
from g2sd_cache.benchmarks.common import Profile, cpu_clock, log, median, torch_threads
from g2sd_cache.benchmarks.sections.extract import extract_config, timed_extract
from g2sd_cache.benchmarks.sections.step import Run

#: the low-rank codec whose cached path the data section times (and feeds at ViT-S and ViT-T rates)
LOWRANK_CODEC = "pca64"
#: its caches' pixel modes besides visible: the <= 40 KB caches (lossless: exact pixels; jpeg: teacher-consistent)
LOWRANK_PIXELS = ("lossless", "jpeg")

# The estimate's sustained rate: about 25 % of an H100/H200's dense bf16 peak (989 TFLOPS). The student's
# step is small matrix multiplies (width 384, 50 visible tokens in the encoder), where 20-35 % of peak is
# what tuned training reaches, so this is a modest, not a best, case: R = 250e12 / 11.3e9 ~ 22,000 samples/s.
ASSUMED_GPU_TFLOPS = 250.0


def _tiled(loader, views: int, spec=None):
    """`loader`'s full steps repeated until they hold at least `views` views (workers=0, no pinning);
    `spec` replaces its StreamSpec."""
    from g2sd_cache.generic.plan import PAD
    from g2sd_cache.generic.stream import StepLoader

    full = loader.positions[(loader.positions != PAD).all(axis=1)]
    reps = max(1, -(-views // full.size))
    return StepLoader(spec or loader.spec, np.tile(full, (reps, 1)), batch_size=loader.batch_size, workers=0,
                      prefetch=loader.prefetch, pin_memory=False)


def _pass(loader) -> dict:
    with cpu_clock() as got:
        got_n = sum(len(b) for step in loader for b in step)
    return {"samples": got_n, **got}


def _read_breakdown(run: Run, batch: int, repeats: int) -> dict:
    """ms of CPU per batch of `Cache.take` for each array of a pixel-path batch, read alone."""
    cache, loader = run.setup.cache, run.loader(0)
    spec, pos = loader.spec, loader.positions.reshape(-1)[:batch]
    specs = cache.manifest.specs()
    out = {}
    for name in ("pixels", "target", "scale", "mask", "source_index"):
        if name not in specs:
            continue
        dest = np.empty((len(pos), *specs[name].per_view_shape), dtype=specs[name].dtype)
        units, rows = spec.order.unit[pos], spec.order.row[pos]
        with cpu_clock() as got:
            for _ in range(repeats):
                for u in np.unique(units):
                    sel = units == u
                    cache.take(int(u), spec.view, rows[sel], {name: dest}, np.flatnonzero(sel))
        out[name] = 1e3 * got["cpu_s"] / repeats
    return out


def _memcpy_gb_per_s(nbytes: int, ring_bytes: int, total_bytes: int) -> float:
    src = np.ones(nbytes, dtype=np.uint8)
    ring = np.empty((max(2, -(-ring_bytes // nbytes)), nbytes), dtype=np.uint8)
    ring[:] = src
    dst = np.empty_like(src)
    copies = max(len(ring), -(-total_bytes // nbytes))
    with cpu_clock() as got:
        for i in range(copies):
            np.copyto(dst, ring[i % len(ring)])
    return copies * nbytes / got["cpu_s"] / 1e9


def feed_rate(step: dict, device: torch.device) -> dict:
    """R, the samples/s one GPU trains the default student at: measured on CUDA, else estimated."""
    from g2sd_cache.models.mae import DEFAULT_STUDENT

    gflop = step["gflop_per_sample"][DEFAULT_STUDENT]
    measured = step["student_alone_samples_per_s"].get(DEFAULT_STUDENT) if device.type == "cuda" else None
    if measured:
        return {"feed_rate_samples_per_s": measured, "feed_rate_is_estimate": False, "assumed_gpu_tflops": None,
                "feed_rate_basis": f"measured: {DEFAULT_STUDENT} step alone on {device}, batch {step['batch_size']}, "
                                   f"{step['precision']}", "feed_student": DEFAULT_STUDENT}
    return {"feed_rate_samples_per_s": ASSUMED_GPU_TFLOPS * 1e3 / gflop, "feed_rate_is_estimate": True,
            "assumed_gpu_tflops": ASSUMED_GPU_TFLOPS, "feed_student": DEFAULT_STUDENT,
            "feed_rate_basis": f"ESTIMATE: {ASSUMED_GPU_TFLOPS:.0f} TFLOPS sustained (bf16, ~25 % of an H100/H200's "
                               f"dense peak) / {gflop:.1f} GFLOP per sample ({DEFAULT_STUDENT}, forward + backward)"}


def student_rates(step: dict, device: torch.device) -> dict[str, float]:
    """samples/s one GPU trains each timed student at: measured on CUDA, else ASSUMED_GPU_TFLOPS / its FLOPs."""
    measured = step["student_alone_samples_per_s"] if device.type == "cuda" else {}
    return {s: measured.get(s) or ASSUMED_GPU_TFLOPS * 1e3 / step["gflop_per_sample"][s]
            for s in step["student_alone_samples_per_s"]}


def _decode_ms(run: Run, batch: int, device: torch.device, repeats: int = 20) -> float:
    """ms per batch of the low-rank decode on `device` (what training does before the loss), median of repeats."""
    import time

    from g2sd_cache.cache import codecs
    cache = run.setup.cache
    b = cache.read_block(0, 0, 0, min(batch, cache.shard_images[0]))
    reps = -(-batch // len(b))
    codes = codecs.from_storage(cache.codec, np.array(b.codes)).repeat(reps, 1, 1)[:batch].to(device)
    scale = torch.from_numpy(np.array(b.scale)).repeat(reps, 1)[:batch].to(device)
    basis = cache.basis.to(device)
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        codecs.decode(cache.codec, codes, scale, basis=basis)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * median(times[2:])


def data_section(ws: dict, prof: Profile, device: torch.device, step: dict) -> dict:
    from g2sd_cache.cache.reader import open_cache

    runs = dict(ws["runs"])
    log(f"data: a --pixels none cache of {prof.store_images} images for the decode + cached-targets path")
    nopix = ws["tmp"] / "nopix"
    timed_extract(extract_config(ws["store"], nopix, prof.teachers[0], prof, device, views=1, pixels="none",
                                 workers=0))
    runs["no_pixels"] = Run.build(dataclasses.replace(runs["cached"].cfg, cache=str(nopix), data=str(ws["store"])),
                                  ws["runs"]["cached"].env)
    log(f"data: a {LOWRANK_CODEC} cache of {prof.store_images} images for the low-rank cached path")
    lowrank = ws["tmp"] / "data-lowrank"
    timed_extract(extract_config(ws["store"], lowrank, prof.teachers[0], prof, device, views=1, codec=LOWRANK_CODEC,
                                 workers=0))
    runs["lowrank"] = Run.build(dataclasses.replace(runs["cached"].cfg, cache=str(lowrank), data=None),
                                ws["runs"]["cached"].env)
    kinds = {"image_only": ("online", prof.image_views), "cached": ("cached", prof.cached_views),
             "no_pixels": ("no_pixels", prof.image_views), "lowrank": ("lowrank", prof.cached_views)}
    for pixels in LOWRANK_PIXELS:
        log(f"data: a {LOWRANK_CODEC} + --pixels {pixels} cache of {prof.store_images} images")
        root = ws["tmp"] / f"data-lowrank-{pixels}"
        timed_extract(extract_config(ws["store"], root, prof.teachers[0], prof, device, views=1, codec=LOWRANK_CODEC,
                                     pixels=pixels, workers=0))
        runs[f"lowrank_{pixels}"] = Run.build(dataclasses.replace(runs["cached"].cfg, cache=str(root), data=None),
                                              ws["runs"]["cached"].env)
        # jpeg decodes ~40x slower per view than the others read: fewer views keep the pass as long
        kinds[f"lowrank_{pixels}"] = (f"lowrank_{pixels}", prof.cached_views // (16 if pixels == "jpeg" else 1))

    def one(kind: str, epoch: int) -> dict:
        run, views = kinds[kind]
        return _pass(_tiled(runs[run].loader(epoch, workers=0), views))

    passes: dict[str, list] = {k: [] for k in (*kinds, "cached_first_read")}
    with torch_threads(1):
        log("data: image path, cached pixel path and --pixels none path, one core")
        one("cached", 0)          # warm: page cache, open maps, checksums, imports
        for r in range(prof.data_repeats):
            for kind in (list(kinds) if r % 2 == 0 else list(kinds)[::-1]):
                passes[kind].append(one(kind, r))
            epoch = runs["cached"].loader(r, workers=0)    # one epoch, on a cache opened anew: nothing verified
            spec = dataclasses.replace(epoch.spec, cache=open_cache(str(ws["cache"])))
            passes["cached_first_read"].append(_pass(_tiled(epoch, 1, spec)))
        by_array = _read_breakdown(runs["cached"], prof.batch, repeats=max(8, prof.cached_views // prof.batch // 4))
        specs = runs["cached"].setup.cache.manifest.specs()
        view_bytes = sum(math.prod(specs[n].per_view_shape) * np.dtype(specs[n].dtype).itemsize
                         for n in ("pixels", "target", "scale", "mask", "source_index") if n in specs)
        memcpy = _memcpy_gb_per_s(prof.batch * view_bytes, prof.ring_bytes, prof.cached_views * view_bytes)

    def rate(kind: str, per: str = "cpu_s") -> float:
        return median([p["samples"] / p[per] for p in passes[kind]])

    from g2sd_cache.benchmarks.sections.remote import remote_part
    remote = remote_part(ws["cache"], runs["cached"], ws["tmp"])   # the same cache, from a local S3 server

    img, cached = rate("image_only"), rate("cached")
    batch_ms = 1e3 * prof.batch / cached
    by_array["rest of the pixel path"] = batch_ms - sum(by_array.values())
    feed = feed_rate(step, device)
    r = feed["feed_rate_samples_per_s"]
    by_codec = {runs["cached"].setup.cache.manifest.codec: cached, LOWRANK_CODEC: rate("lowrank"),
                **{f"{LOWRANK_CODEC}+{p}": rate(f"lowrank_{p}") for p in LOWRANK_PIXELS}}
    return {
        "cached_samples_per_s_by_codec": by_codec,
        "lowrank_decode_ms_per_batch": _decode_ms(runs["lowrank"], prof.batch, device),
        "feed_cores_per_gpu_by_student": {s: {c: rate_s / v for c, v in by_codec.items()}
                                          for s, rate_s in student_rates(step, device).items()},
        "image_only_samples_per_s": img, "cached_samples_per_s": cached, "pixel_cache_speedup": cached / img,
        "remote": remote,
        "cached_first_read_samples_per_s": rate("cached_first_read"),
        "no_pixels_samples_per_s": rate("no_pixels"),
        "wall_samples_per_s": {k: rate(k, "wall_s") for k in passes},
        "read_ms_per_batch": by_array, "view_bytes": view_bytes,
        "cached_gb_per_s": cached * view_bytes / 1e9, "memcpy_gb_per_s": memcpy,
        "cached_vs_memcpy": cached * view_bytes / 1e9 / memcpy,
        "feed_cores_per_gpu": {"image": r / img, "cached": r / cached}, **feed,
        "batch_size": prof.batch, "codec": runs["cached"].setup.cache.manifest.codec, "passes": passes,
        "per": "CPU-second of this process (all threads), torch at 1 thread, workers=0",
    }


@section("data")
def run_section(bench: Bench) -> dict:
    return data_section(bench.ws, bench.prof, bench.device, bench.report["step"])
