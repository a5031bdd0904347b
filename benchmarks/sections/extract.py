"""Extract section: `run_extract` views/s against the bare teacher forward on the same batches.

Figures (`extract.*`):
- `views_per_s`: views written per second of `run_extract`'s own timer, end to end. The timer starts once
  the teacher is built, so it includes DataLoader worker start-up, the pipeline filling and the last
  shard's write.
- `steady_views_per_s`: the rate by difference of two extracts (`images` and `small_images` images):
  what a large extract runs at once those fixed costs are paid; `fixed_cost_s` is what they cost.
- `teacher_only_views_per_s`: the teacher alone — normalise the visible patches + `targets_visible`, under
  extract's own precision — on the batches extract feeds it (rebuilt by extract's own image renderer:
  same views, batch size and device, never crossing a shard), already in device memory.
- `ratio` / `steady_ratio`: extract over the bare teacher, taken within each round, then the median.
  (Target: >= 0.95: extract's decoding, encoding and writing hide behind the teacher.)

The section runs first: its large cache (pixels stored, the default) feeds the step and data sections, and
the float32 targets of its bare-teacher pass give the storage section the codecs' errors.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from g2sd_cache.benchmarks.sections import Bench, section
from g2sd_cache.benchmarks.common import SEED, Profile, log, median, quiet, sync


def extract_config(data: Path, out: Path, arch: str, prof: Profile, device: torch.device, **kw):
    from g2sd_cache.generic.extract import ExtractConfig

    base = dict(data=str(data), out=str(out), teacher=f"random:{SEED}", arch=arch, views=prof.views, seed=SEED,
                img_size=prof.img_size, codec="fp16", batch_size=prof.batch, workers=prof.workers,
                device=str(device), overwrite=True)
    base.update(kw)
    return ExtractConfig(**base)


def timed_extract(cfg) -> dict:
    from g2sd_cache.generic.extract import run_extract

    t0 = time.perf_counter()
    with quiet():
        summary = run_extract(cfg)
    summary["wall_with_setup_s"] = time.perf_counter() - t0
    return summary


def extract_batches(cfg, source, max_views: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches extract feeds its teacher, from extract's own renderer in this process: views of each
    shard's images in order, cut into `batch_size` chunks that never cross a shard.
    [(visible patches uint8 [B, n_keep, p, p, 3], mask [B, L])]"""
    from g2sd_cache.generic.extract import RenderedImages, plan_shards

    batches, pending, shard, taken = [], [], None, 0

    def flush():
        for i in range(0, len(pending), cfg.batch_size):
            chunk = pending[i:i + cfg.batch_size]
            batches.append((torch.stack([p for p, _ in chunk]), torch.stack([m for _, m in chunk])))
        pending.clear()

    for item in RenderedImages(source, plan_shards(source, cfg), cfg):
        if "patches" not in item:
            continue
        if item["shard"] != shard:
            flush()
            shard = item["shard"]
        pending += [(p, torch.from_numpy(m)) for p, m in zip(item["patches"], item["mask"])]
        taken += len(item["patches"])
        if taken >= max_views:
            break
    flush()
    return batches


def teacher_pass(teacher, batches, target_layer: int, device: torch.device, keep_views: int):
    """Times normalise + teacher targets over `batches` (on the device), at extract's precision.
    Returns (seconds, views, float32 targets of the first `keep_views` views on the CPU, or None)."""
    from g2sd_cache.data.views import normalize_patches
    from g2sd_cache.training.precision import resolve_teacher_precision, teacher_autocast

    autocast = teacher_autocast(resolve_teacher_precision("auto", device), device)   # extract's default
    kept, n_kept = [], 0
    sync(device)
    t0 = time.perf_counter()
    for patches, mask in batches:
        with autocast():
            out = teacher.targets_visible(normalize_patches(patches), mask, target_layer)
        if n_kept < keep_views:
            kept.append(out[: keep_views - n_kept].float().cpu())
            n_kept += kept[-1].shape[0]
    sync(device)
    return time.perf_counter() - t0, sum(len(p) for p, _ in batches), (torch.cat(kept) if kept else None)


def extract_section(ws: dict, prof: Profile, device: torch.device) -> dict:
    from g2sd_cache.models.mae import build_teacher
    from g2sd_cache.data.sources import open_source

    arch, tmp = prof.teachers[0], ws["tmp"]
    # Warm-up: the first DataLoader of a process starts the forkserver; no timed extract pays that.
    log("extract: warm-up (starts the DataLoader forkserver)")
    timed_extract(extract_config(ws["small"], tmp / "warm", "test_mae_micro_patch16", prof, device, views=1))
    cfg_small = extract_config(ws["small"], tmp / "extract-small", arch, prof, device)
    cfg = extract_config(ws["images"], tmp / "extract", arch, prof, device)

    batches = extract_batches(cfg, open_source(str(ws["images"])), prof.teacher_views_max)
    batches = [(p.to(device), m.to(device)) for p, m in batches]
    teacher, _ = build_teacher(cfg.teacher, arch, cfg.img_size)
    teacher.to(device)
    teacher_pass(teacher, batches[:1], cfg.target_layer, device, 0)   # warm-up

    # Rounds of (bare teacher, small extract, large extract): ratios are taken within a round.
    rounds = []
    for r in range(prof.extract_rounds):
        log(f"extract: round {r + 1}/{prof.extract_rounds}: bare teacher, then extracts of "
            f"{prof.small_images} and {prof.images} images x {prof.views} views with {arch}")
        secs, teacher_views, got = teacher_pass(teacher, batches, cfg.target_layer, device, 256 if r == 0 else 0)
        if got is not None:
            ws["targets_fp32"] = got
        small, large = timed_extract(cfg_small), timed_extract(cfg)
        dv, ds = large["views"] - small["views"], large["seconds"] - small["seconds"]
        steady = dv / ds if dv > 0 and ds > 0 else float("nan")
        rounds.append({"teacher_views_per_s": teacher_views / secs, "teacher_views": teacher_views,
                       "views": large["views"], "seconds": large["seconds"],
                       "views_per_s": large["views"] / large["seconds"],
                       "small_views": small["views"], "small_seconds": small["seconds"], "steady_views_per_s": steady,
                       "fixed_cost_s": small["seconds"] - small["views"] / steady if math.isfinite(steady)
                       else float("nan"), "wall_with_setup_s": large["wall_with_setup_s"]})
    ws["cache"] = tmp / "extract"
    del teacher, batches

    col = {k: [r[k] for r in rounds] for k in rounds[0]}
    return {
        "teacher": arch, "batch_size": cfg.batch_size, "workers": cfg.workers, "views_per_image": cfg.views,
        "pixels": cfg.pixels, "views": rounds[0]["views"], "small_views": rounds[0]["small_views"],
        "teacher_only_views": rounds[0]["teacher_views"],
        "seconds": median(col["seconds"]), "fixed_cost_s": median(col["fixed_cost_s"]),
        "views_per_s": median(col["views_per_s"]), "steady_views_per_s": median(col["steady_views_per_s"]),
        "teacher_only_views_per_s": median(col["teacher_views_per_s"]),
        "ratio": median([r["views_per_s"] / r["teacher_views_per_s"] for r in rounds]),
        "steady_ratio": median([r["steady_views_per_s"] / r["teacher_views_per_s"] for r in rounds]),
        "rounds": rounds,
    }


@section("extract")
def run_section(bench: Bench) -> dict:
    return extract_section(bench.ws, bench.prof, bench.device)
