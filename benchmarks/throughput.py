"""Throughput of G2SD distillation, online vs cached, side by side in one run (issue 5).

    python benchmarks/throughput.py [--device cpu|cuda] [--quick] [--json OUT.json] [--plot OUT.png]
                                    [--teachers ...] [--students ...] [--batch-size N] [--workers N]

Everything runs in one process on seeded synthetic JPEGs (g2sd_cache.synthetic, ~500x375) in a
temporary folder, through the product's own code: `run_extract` writes the cache, `EpochLoader`
streams it. Sections (each a markdown table; every figure is a median over repeats):

1. Step. Online G2SD steps (teacher forward + student forward/backward + AdamW) against cached
   steps (student only; targets from the cache through the real reader, `stream.EpochLoader`),
   same student and batch. One round times, in turn: online and cached steps of every pair, the
   teacher forward alone and the student step alone (both on one in-memory batch, no data
   loading); rounds alternate direction (ABBA) and each ratio is taken within a round, then the
   median over rounds, so drift of a noisy machine cancels. ideal = (t_teacher + t_student) /
   t_student, efficiency = measured speedup / ideal.
   Data loading: the loaders run with `--workers` DataLoader processes (1 on CPU), so image decode
   and target reads overlap the step; on a 2-core box the worker competes with torch's threads for
   the cores, and that contention is part of the measured step, online and cached alike. Worker
   start-up (and the first batch of each epoch) is timed apart and reported, never inside a timed
   step; `data wait` is the fraction of a timed step spent blocked on the next batch. A loader
   keeps up to `prefetch` collated batches ready, so on CUDA each timed cell first runs `drain`
   untimed steps; on CPU the table's "data headroom" (one core's pipeline rate over the step rate)
   shows whether the buffer could hide a slow pipeline.
2. Data, per core: the image-only pipeline online G2SD pays (decode + crop + flip + normalise),
   the cached pipeline (the same plus block reads of targets), both through `EpochLoader` with
   workers=0 in this process and torch at one thread, and target block reads alone
   (`Cache.read_block`). Rates are per CPU-second of this process (all its threads), so they are
   per-core figures even on a busy machine; wall-clock rates are in the JSON. Read bandwidth is
   set next to a numpy memcpy of the same bytes in the same process. The cache files were just
   written, so reads come from the page cache: this is decode cost, not disk.
3. Loss: benchmarks/loss.py (`run_loss_benchmark`); on CPU the torch reference only.
4. Storage: one small cache per codec written by `run_extract` with the first teacher: bytes per
   view on disk (all files / views), of the target arrays alone, and by formula (T x D x bytes +
   4 x T for scaled codecs); relative RMS error of each codec on float32 targets of a real teacher
   forward (random weights, synthetic images); ImageNet-1k projections; the read bandwidth the
   measured cached step rate needs.
5. Extract: `run_extract` views/s against the bare teacher forward (normalise + targets) on the
   same batches (same views, batch size and device). Extract's own timer starts after the teacher
   is built and includes worker start-up and the final shard write; two extracts of different
   sizes give the steady-state rate by difference, which is what a large extract runs at.

Finally a "Targets" table judges the figures against issue 5's targets: PASS or SHORT, with numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGENET_IMAGES = 1_281_167
BETA = 2.0
BLR = 1.5e-4
SEED = 0
TARGETS = {"efficiency": 0.95, "read_vs_memcpy": 0.8, "cached_cost": 1.1, "extract": 0.95,
           "quant_bytes": 0.51, "quant_rmse": 0.01, "loss_copy": 0.85, "loss_eager": 3.0}


# ------------------------------------------------------------------------------------------------
# Profiles: what one run measures, sized to the device.

@dataclass(frozen=True)
class Profile:
    name: str
    teachers: tuple[str, ...]
    students: tuple[str, ...]
    batch: int            # step, extract and data batch size
    images: int           # images in the benchmark folder; the step cache holds images x views views
    small_images: int     # a smaller extract, for the steady-state rate by difference
    store_images: int     # images of each per-codec storage cache
    views: int = 2        # views per image in the caches (decode once, K crops)
    rounds: int = 5       # timed rounds of the step section
    warm_rounds: int = 1  # untimed rounds first
    steps: int = 1        # timed steps per cell
    drain: int = 0        # untimed loader steps before each timed loader cell
    workers: int = 1      # DataLoader workers for extract and the step loaders
    prefetch: int = 2     # EpochLoader prefetch (train's default)
    data_repeats: int = 3
    read_bytes: int = 256 << 20   # target bytes read per repeat of the read-bandwidth test
    ring_bytes: int = 128 << 20   # memcpy source ring, larger than a last-level cache
    extract_rounds: int = 2
    breakdown_repeats: int = 2
    teacher_views_max: int = 100_000  # bare-teacher pass: at most this many of extract's views
    img_size: int = 224


def profile_for(device: torch.device, quick: bool) -> Profile:
    if quick:  # micro presets: exercises every code path in well under a minute
        return Profile("quick", ("test_mae_micro_patch16",), ("test_vit_micro_patch16_dec32d1b",), batch=4,
                       images=16, small_images=8, store_images=8, rounds=3, steps=2, data_repeats=2,
                       read_bytes=8 << 20, ring_bytes=32 << 20, breakdown_repeats=1)
    teachers = ("mae_vit_base_patch16", "mae_vit_large_patch16")
    students = ("mae_vit_small_patch16_dec256d4b", "mae_vit_tiny_patch16_dec128d4b")
    if device.type == "cuda":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
        return Profile("cuda", teachers, students, batch=256, images=3072, small_images=768, store_images=256,
                       rounds=5, steps=8, drain=3, workers=max(1, cores - 2), breakdown_repeats=3,
                       teacher_views_max=2048, extract_rounds=3)
    return Profile("cpu", teachers, students, batch=16, images=64, small_images=16, store_images=32)


# ------------------------------------------------------------------------------------------------
# Small helpers.

def log(msg: str) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (train's default precision there); fp32 on CPU (train's default)."""
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext


@contextlib.contextmanager
def quiet():
    """Swallow the product's progress bars and notes; show them if something fails."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except BaseException:
        sys.stderr.write(out.getvalue() + err.getvalue())
        raise


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu_model": cpu, "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "gpu": None,
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device if device.type == "cuda" else 0)
        info["cuda"] = torch.version.cuda
    return info


def dir_bytes(path: Path, parts: tuple[str, ...] | None = None) -> int:
    """Bytes of every file under `path` (or only under sub-folders named in `parts`)."""
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and (parts is None or any(part in p.relative_to(path).parts for part in parts)):
            total += p.stat().st_size
    return total


def fmt(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Inputs: synthetic image folders.

def make_images(root: Path, count: int) -> Path:
    """`count` seeded ~500x375 JPEGs. Large sets are written in parallel parts (sub-folders)."""
    from g2sd_cache.synthetic import make_image_folder

    parts = max(1, min(os.cpu_count() or 1, count // 256))
    if parts == 1:
        return make_image_folder(root, count, seed=SEED, classes=4, vary_size=True)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    sizes = [count // parts + (i < count % parts) for i in range(parts)]
    with ProcessPoolExecutor(parts, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(make_image_folder, [root / f"part{i:02d}" for i in range(parts)], sizes,
                      [SEED + i for i in range(parts)]))
    return root


def subset_folder(source, dst: Path, n: int) -> Path:
    """The first `n` images of `source` (a FolderSource), as symlinks under the same relative paths."""
    for key in source.keys[:n]:
        link = dst / key
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(source.root) / key)
    return dst


# ------------------------------------------------------------------------------------------------
# Section 5 (run first: its cache feeds the step section). Extract vs the bare teacher.

def extract_config(data: Path, out: Path, arch: str, prof: Profile, device: torch.device, **kw):
    from g2sd_cache.extract import ExtractConfig

    base = dict(data=str(data), out=str(out), teacher=f"random:{SEED}", arch=arch, views=prof.views, seed=SEED,
                img_size=prof.img_size, codec="fp16", batch_size=prof.batch, workers=prof.workers,
                device=str(device), overwrite=True)
    base.update(kw)
    return ExtractConfig(**base)


def timed_extract(cfg) -> dict:
    from g2sd_cache.extract import run_extract

    t0 = time.perf_counter()
    with quiet():
        summary = run_extract(cfg)
    summary["wall_with_setup_s"] = time.perf_counter() - t0
    return summary


def render_extract_batches(cfg, source, max_views: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches extract feeds its teacher, rebuilt: views sampled from (seed, image, view), image-major
    within a shard, cut into `batch_size` chunks that never cross a shard. [(pixels uint8, mask)]"""
    from g2sd_cache.extract import plan_shards
    from g2sd_cache.views import decode_image, render_view, sample_view

    g, k = cfg.geometry, cfg.views

    def render(index: int):
        img = decode_image(source.read(source.keys[index]))
        views = [sample_view(cfg.seed, index, v, img.size, g) for v in range(k)]
        return [(render_view(img, v.crop, v.flip, g.img_size), torch.from_numpy(v.mask)) for v in views]

    batches, taken = [], 0
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for plan in plan_shards(source, cfg):
            n_img = min(plan.stop - plan.start, -(-(max_views - taken) // k))
            if n_img <= 0:
                break
            views = [v for per_image in pool.map(render, range(plan.start, plan.start + n_img)) for v in per_image]
            for i in range(0, len(views), cfg.batch_size):
                chunk = views[i:i + cfg.batch_size]
                batches.append((torch.stack([p for p, _ in chunk]), torch.stack([m for _, m in chunk])))
            taken += len(views)
    return batches


def teacher_pass(teacher, batches, target_layer: int, device: torch.device, keep_views: int):
    """Times normalise + teacher targets over `batches` (already on the device). Returns (seconds, views,
    float32 targets of the first `keep_views` views, on the CPU)."""
    from g2sd_cache.views import normalize

    ac = autocast_for(device)
    kept, n_kept = [], 0
    sync(device)
    t0 = time.perf_counter()
    for pixels, mask in batches:
        with ac():
            out = teacher.targets(normalize(pixels), mask, target_layer)
        if n_kept < keep_views:
            kept.append(out[: keep_views - n_kept].float().cpu())
            n_kept += kept[-1].shape[0]
    sync(device)
    return time.perf_counter() - t0, sum(len(p) for p, _ in batches), (torch.cat(kept) if kept else None)


def extract_section(ws: dict, prof: Profile, device: torch.device) -> dict:
    from g2sd_cache.models import build_teacher
    from g2sd_cache.sources import open_source

    arch = prof.teachers[0]
    tmp = ws["tmp"]
    # Warm-up: the first DataLoader of a process starts the forkserver; no timed extract pays that.
    log("extract: warm-up (starts the DataLoader forkserver)")
    timed_extract(extract_config(ws["small"], tmp / "warm", "test_mae_micro_patch16", prof, device, views=1))
    cfg_small = extract_config(ws["small"], tmp / "extract-small", arch, prof, device)
    cfg = extract_config(ws["images"], tmp / "extract", arch, prof, device)

    source = open_source(str(ws["images"]))
    batches = render_extract_batches(cfg, source, prof.teacher_views_max)
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
                       "fixed_cost_s": (small["seconds"] - small["views"] / steady) if math.isfinite(steady)
                       else float("nan"),
                       "wall_with_setup_s": large["wall_with_setup_s"], "bytes_per_view": large.get("bytes_per_view")})
    ws["cache"] = tmp / "extract"
    del teacher, batches

    col = {k: [r[k] for r in rounds] for k in rounds[0]}
    return {
        "teacher": arch, "batch_size": cfg.batch_size, "workers": cfg.workers, "views_per_image": cfg.views,
        "views": rounds[0]["views"], "small_views": rounds[0]["small_views"],
        "teacher_only_views": rounds[0]["teacher_views"],
        "seconds": median(col["seconds"]), "fixed_cost_s": median(col["fixed_cost_s"]),
        "views_per_s": median(col["views_per_s"]), "steady_views_per_s": median(col["steady_views_per_s"]),
        "teacher_only_views_per_s": median(col["teacher_views_per_s"]),
        "ratio": median([r["views_per_s"] / r["teacher_views_per_s"] for r in rounds]),
        "steady_ratio": median([r["steady_views_per_s"] / r["teacher_views_per_s"] for r in rounds]),
        "rounds": rounds,
    }


# ------------------------------------------------------------------------------------------------
# Section 1. Steps: online vs cached, with the teacher alone and the student alone.

class Feed:
    """Full batches from one EpochLoader after another (a new epoch when one runs short). Loader
    start-up up to its first batch is timed apart (`startups`), never inside a timed step."""

    def __init__(self, make_loader, batch_size: int):
        self.make_loader, self.batch_size = make_loader, batch_size
        self.epoch, self.it, self.left, self.peeked = -1, None, 0, None
        self.startups: list[float] = []

    def ensure(self, n: int) -> None:
        if self.left >= n:
            return
        self.close()
        self.epoch += 1
        loader = self.make_loader(self.epoch)
        full = loader.plan.rank_views // self.batch_size
        if full < n:
            raise ValueError(f"an epoch has {full} full batches, a cell needs {n}: use more images")
        t0 = time.perf_counter()
        self.it = iter(loader)
        self.peeked = next(self.it)
        self.startups.append(time.perf_counter() - t0)
        self.left = full

    def next(self):
        self.left -= 1
        if self.peeked is not None:
            batch, self.peeked = self.peeked, None
        else:
            batch = next(self.it)
        if not bool(batch.valid.all()):
            raise RuntimeError(f"the benchmark data has unreadable samples: {batch.errors[:2]}")
        return batch

    def close(self) -> None:
        """Finish the epoch rather than abandon it: closing an EpochLoader iterator whose producer thread
        already queued its last batch stalls 5 s (its `q.put(None)` blocks without checking `stop`)."""
        if self.it is not None:
            for _ in self.it:
                pass
            self.it, self.peeked, self.left = None, None, 0


def loader_factory(source, cache, geometry, batch_size: int, workers: int, prefetch: int, device):
    """EpochLoaders exactly as train builds them: cached when `cache` is given, else online (fresh views)."""
    from g2sd_cache.plan import plan_epoch
    from g2sd_cache.stream import EpochLoader, StreamSpec

    slots = max(1, workers)

    def make(epoch: int):
        if cache is not None:
            spec = StreamSpec(source, cache, geometry, SEED, 0, epoch, epoch % cache.views_per_image)
            units, block = list(cache.shard_images), cache.manifest.chunk_views
        else:
            spec = StreamSpec(source, None, geometry, SEED, 0, epoch, epoch)
            units, block = [len(source)], 64
        # Shuffle windows of one block (train's default is 1024 views): the benchmark's epochs are short, and
        # windows are dealt to workers whole, so large windows would leave most workers idle here.
        plan = plan_epoch(units, epoch=epoch, seed=SEED, rank=0, world=1, slots=slots, block=block, window=block)
        return EpochLoader(spec, plan, batch_size=batch_size, workers=workers, start=0, prefetch=prefetch,
                           pin_memory=device.type == "cuda",
                           codec_dtype=cache.codec.torch_dtype if cache is not None else None)
    return make


class Student:
    """A student with AdamW as train.py sets it up, and its step: forward, masked_smooth_l1, backward, step."""

    def __init__(self, name: str, target_dim: int, img_size: int, batch: int, device, autocast):
        from timm.optim import param_groups_weight_decay

        from g2sd_cache.models import build_student
        from g2sd_cache.train import NO_WEIGHT_DECAY

        self.name = name
        self.model = build_student(name, target_dim, img_size, seed=SEED).to(device)
        groups = param_groups_weight_decay(self.model, 0.05, no_weight_decay_list=NO_WEIGHT_DECAY)
        self.opt = torch.optim.AdamW(groups, lr=BLR * batch / 256, betas=(0.9, 0.95))
        self.autocast = autocast

    def step(self, imgs, mask, target, scale, parts: dict | None = None, device=None):
        from g2sd_cache.kernels import masked_smooth_l1

        marks = []

        def mark():
            if parts is not None:
                sync(device)
                marks.append(time.perf_counter())
        mark()
        with self.autocast():
            pred = self.model(imgs, mask)
        mark()
        loss = masked_smooth_l1(pred, target, scale=scale, beta=BETA)
        mark()
        loss.backward()
        mark()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        mark()
        if parts is not None:
            for key, a, b in zip(("forward", "loss", "backward", "adamw"), marks, marks[1:]):
                parts.setdefault(key, []).append(b - a)
        return loss


def step_section(ws: dict, prof: Profile, device: torch.device) -> dict:
    from g2sd_cache.cache import open_cache
    from g2sd_cache.models import build_teacher
    from g2sd_cache.sources import open_source
    from g2sd_cache.views import ViewGeometry, normalize

    cache = open_cache(str(ws["cache"]))
    m = cache.manifest
    source = open_source(str(ws["images"]))
    geometry = ViewGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.geometry.items()})
    bs, ac = prof.batch, autocast_for(device)
    target_layer = m.target_layer

    log(f"step: building teachers {', '.join(prof.teachers)} and students {', '.join(prof.students)}")
    teachers = {}
    for arch in prof.teachers:
        t, _ = build_teacher(f"random:{SEED}", arch, geometry.img_size)
        if t.shape.decoder_embed_dim != m.target_dim:
            raise SystemExit(f"teacher {arch} has target width {t.shape.decoder_embed_dim}, the cache "
                             f"{m.target_dim}: pass teachers of the same decoder width")
        teachers[arch] = t.to(device)
    students = {s: Student(s, m.target_dim, geometry.img_size, bs, device, ac) for s in prof.students}

    feeds = {"online": Feed(loader_factory(source, None, geometry, bs, prof.workers, prof.prefetch, device), bs),
             "cached": Feed(loader_factory(source, cache, geometry, bs, prof.workers, prof.prefetch, device), bs)}

    # One real batch, kept on the device, for the teacher-alone and student-alone cells.
    feeds["cached"].ensure(1)
    b0 = feeds["cached"].next()
    fixed_imgs = normalize(b0.pixels.to(device))
    fixed_mask = b0.mask.to(device)
    fixed_codes = b0.codes.to(device)
    fixed_scale = b0.scale.to(device) if b0.scale is not None else None

    def online_step(student: Student, teacher):
        def run(batch):
            imgs = normalize(batch.pixels.to(device, non_blocking=True))
            mask = batch.mask.to(device, non_blocking=True)
            with ac():
                target = teacher.targets(imgs, mask, target_layer)
            student.step(imgs, mask, target, None)
        return run

    def cached_step(student: Student):
        def run(batch):
            imgs = normalize(batch.pixels.to(device, non_blocking=True))
            mask = batch.mask.to(device, non_blocking=True)
            codes = batch.codes.to(device, non_blocking=True)
            scale = batch.scale.to(device, non_blocking=True) if batch.scale is not None else None
            student.step(imgs, mask, codes, scale)
        return run

    def loader_cell(feed: Feed, fn) -> dict:
        feed.ensure(prof.drain + prof.steps)
        for _ in range(prof.drain):
            fn(feed.next())
        sync(device)
        wait, t0 = 0.0, time.perf_counter()
        for _ in range(prof.steps):
            tw = time.perf_counter()
            batch = feed.next()
            wait += time.perf_counter() - tw
            fn(batch)
        sync(device)
        dt = time.perf_counter() - t0
        return {"s_per_step": dt / prof.steps, "samples_per_s": prof.steps * bs / dt, "data_wait_frac": wait / dt}

    def fixed_cell(fn) -> dict:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(prof.steps):
            fn()
        sync(device)
        dt = time.perf_counter() - t0
        return {"s_per_step": dt / prof.steps, "samples_per_s": prof.steps * bs / dt}

    def teacher_alone(teacher):
        def run():
            with ac():
                teacher.targets(fixed_imgs, fixed_mask, target_layer)
        return run

    def run(cell) -> dict:
        kind = cell[0]
        if kind == "online":
            return loader_cell(feeds["online"], online_step(students[cell[2]], teachers[cell[1]]))
        if kind == "cached":
            return loader_cell(feeds["cached"], cached_step(students[cell[1]]))
        if kind == "student":
            s = students[cell[1]]
            return fixed_cell(lambda: s.step(fixed_imgs, fixed_mask, fixed_codes, fixed_scale))
        return fixed_cell(teacher_alone(teachers[cell[1]]))

    # A round: per student, online steps of each teacher alternating with its cached and alone cells.
    cells = []
    for s in prof.students:
        onl = [("online", t, s) for t in prof.teachers]
        fillers = [("cached", s), ("student", s)]
        for j in range(max(len(onl), len(fillers))):
            cells += onl[j:j + 1] + fillers[j:j + 1]
    cells += [("teacher", t) for t in prof.teachers]

    results: list[dict] = []
    total_rounds = prof.warm_rounds + prof.rounds
    for r in range(total_rounds):
        order = cells if r % 2 == 0 else cells[::-1]
        t0 = time.perf_counter()
        got = {cell: run(cell) for cell in order}
        log(f"step: round {r + 1}/{total_rounds}{' (warm-up)' if r < prof.warm_rounds else ''} "
            f"took {time.perf_counter() - t0:.1f} s")
        if r >= prof.warm_rounds:
            results.append(got)

    # Where a student step's time goes (synchronised between parts, so slightly slower than a step).
    breakdown = {}
    for name, s in students.items():
        parts: dict = {}
        for _ in range(prof.breakdown_repeats):
            s.step(fixed_imgs, fixed_mask, fixed_codes, fixed_scale, parts=parts, device=device)
        breakdown[name] = {k: 1e3 * median(v) for k, v in parts.items()}

    for feed in feeds.values():
        feed.close()

    pairs = []
    for s in prof.students:
        for t in prof.teachers:
            rows = []
            for got in results:
                on, ca = got[("online", t, s)], got[("cached", s)]
                tt, ts = got[("teacher", t)]["s_per_step"], got[("student", s)]["s_per_step"]
                rows.append({"speedup": ca["samples_per_s"] / on["samples_per_s"], "ideal": (tt + ts) / ts,
                             "online": on["samples_per_s"], "cached": ca["samples_per_s"],
                             "t_teacher": tt, "t_student": ts, "t_online": on["s_per_step"],
                             "t_cached": ca["s_per_step"], "wait_online": on["data_wait_frac"],
                             "wait_cached": ca["data_wait_frac"]})
            col = {k: [row[k] for row in rows] for k in rows[0]}
            speedup, ideal = median(col["speedup"]), median(col["ideal"])
            pairs.append({
                "teacher": t, "student": s, "batch_size": bs,
                "online_samples_per_s": median(col["online"]), "cached_samples_per_s": median(col["cached"]),
                "speedup": speedup, "ideal_speedup": ideal, "efficiency": speedup / ideal,
                "speedup_min": min(col["speedup"]), "speedup_max": max(col["speedup"]),
                "t_teacher_ms": 1e3 * median(col["t_teacher"]), "t_student_ms": 1e3 * median(col["t_student"]),
                "t_online_ms": 1e3 * median(col["t_online"]), "t_cached_ms": 1e3 * median(col["t_cached"]),
                "online_overhead_ms": 1e3 * median([o - a - b for o, a, b in
                                                    zip(col["t_online"], col["t_teacher"], col["t_student"])]),
                "cached_overhead_ms": 1e3 * median([c - b for c, b in zip(col["t_cached"], col["t_student"])]),
                "online_data_wait_frac": median(col["wait_online"]),
                "cached_data_wait_frac": median(col["wait_cached"]),
                "rounds": rows,
            })
    main = pairs[0]
    return {
        **{k: main[k] for k in ("online_samples_per_s", "cached_samples_per_s", "speedup", "ideal_speedup",
                                "efficiency", "teacher", "student", "batch_size")},
        "pairs": pairs, "student_breakdown_ms": breakdown,
        "workers": prof.workers, "prefetch_batches": prof.prefetch, "timed_steps_per_cell": prof.steps,
        "drain_steps_per_cell": prof.drain, "rounds": prof.rounds, "warm_rounds": prof.warm_rounds,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "loader_startup_s": {k: f.startups for k, f in feeds.items()},
        "cache_codec": m.codec, "target_shape": [m.tokens, m.target_dim],
    }


# ------------------------------------------------------------------------------------------------
# Section 2. Data pipelines and target reads, per core.

def data_section(ws: dict, prof: Profile) -> dict:
    import zarr

    from g2sd_cache.cache import open_cache
    from g2sd_cache.sources import open_source
    from g2sd_cache.views import ViewGeometry, normalize

    cache = open_cache(str(ws["cache"]))
    m = cache.manifest
    source = open_source(str(ws["images"]))
    geometry = ViewGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.geometry.items()})
    cpu = torch.device("cpu")
    makers = {"image_only": loader_factory(source, None, geometry, prof.batch, 0, prof.prefetch, cpu),
              "cached": loader_factory(source, cache, geometry, prof.batch, 0, prof.prefetch, cpu)}

    def epoch_pass(kind: str, epoch: int) -> dict:
        loader = makers[kind](epoch)
        n = 0
        c0, t0 = time.process_time(), time.perf_counter()
        for batch in loader:
            normalize(batch.pixels)
            n += len(batch)
        cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - t0
        return {"samples": n, "cpu_s": cpu_s, "wall_s": wall_s}

    runs: dict[str, list] = {"image_only": [], "cached": []}
    with torch_threads(1):
        log("data: image-only and cached pipelines, one core")
        epoch_pass("cached", 0)       # warm: page cache, zarr handles, imports
        for r in range(prof.data_repeats):
            for kind in (("image_only", "cached") if r % 2 == 0 else ("cached", "image_only")):
                runs[kind].append(epoch_pass(kind, r))

        log("data: target block reads and memcpy")
        block = m.chunk_views
        blocks = [(s, v, a, min(n, a + block)) for s, n in enumerate(cache.shard_images)
                  for v in range(cache.views_per_image) for a in range(0, n, block)]
        block = max(b - a for _, _, a, b in blocks)
        groups = {s: zarr.open_group(f"{cache.root}/{cache.shard_name(s)}", mode="r")
                  for s in range(len(cache.shard_images))}
        first = cache.read_block(*blocks[0])
        per_pass = sum((b - a) for _, _, a, b in blocks) * first.codes[0].nbytes
        passes = max(1, -(-prof.read_bytes // per_pass))
        src = np.ascontiguousarray(first.codes)
        dst = np.empty_like(src)
        copies = max(1, -(-prof.read_bytes // src.nbytes))
        # memcpy from a ring larger than the last-level cache: the bytes come from DRAM, as a file's bytes
        # from the page cache must; the same block copied again and again stays in cache ("hot").
        ring = np.empty((max(2, -(-prof.ring_bytes // src.nbytes)), *src.shape), dtype=src.dtype)
        ring[:] = src

        def timed(fn) -> dict:
            c0, t0 = time.process_time(), time.perf_counter()
            nbytes = fn()
            return {"bytes": nbytes, "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0}

        def read_blocks():
            # As an epoch's fresh DataLoader worker reads: a new reader (maps opened, every chunk's crc32c
            # checked once), and the bytes copied out of the page cache into this process's memory.
            nbytes = 0
            for _ in range(passes):
                reader = open_cache(str(ws["cache"]))
                for blk in blocks:
                    b = reader.read_block(*blk)
                    codes = np.array(b.codes)
                    nbytes += codes.nbytes + (np.array(b.scale).nbytes if b.scale is not None else 0)
            return nbytes

        def read_raw():
            nbytes = 0
            for _ in range(passes):
                for s, v, a, b in blocks:
                    nbytes += groups[s]["target"][v, a:b].nbytes
            return nbytes

        def memcpy():
            for i in range(copies):
                np.copyto(dst, ring[i % len(ring)])
            return copies * src.nbytes

        def memcpy_hot():
            for _ in range(copies):
                np.copyto(dst, src)
            return copies * src.nbytes

        fns = {"read_block": read_blocks, "zarr_target_only": read_raw, "memcpy": memcpy, "memcpy_hot": memcpy_hot}
        bw: dict[str, list] = {name: [] for name in fns}
        read_raw()
        memcpy()
        for r in range(prof.data_repeats):
            for name, fn in (fns.items() if r % 2 == 0 else reversed(list(fns.items()))):
                bw[name].append(timed(fn))

        # Where read_block's time goes: each array of the block read alone (ms per block, CPU time).
        array_ms: dict[str, float] = {}
        with warnings.catch_warnings():  # zarr warns about shard.json, which is ours, not zarr's
            warnings.simplefilter("ignore")
            names = sorted(groups[0].array_keys())
        for name in names:
            per = []
            for _ in range(prof.data_repeats):
                c0 = time.process_time()
                for s, v, a, b in blocks:
                    groups[s][name][v, a:b]
                per.append(1e3 * (time.process_time() - c0) / len(blocks))
            array_ms[name] = median(per)
        c0 = time.process_time()
        for blk in blocks:
            cache.read_block(*blk)
        array_ms["read_block (all)"] = 1e3 * (time.process_time() - c0) / len(blocks)

    def rate(rs, key="samples", per="cpu_s"):
        return median([x[key] / x[per] for x in rs])

    gbps = {name: rate(rs, "bytes") / 1e9 for name, rs in bw.items()}
    gbps_wall = {name: rate(rs, "bytes", "wall_s") / 1e9 for name, rs in bw.items()}
    view_bytes = first.codes[0].nbytes + (first.scale[0].nbytes if first.scale is not None else 0)
    img, cached = rate(runs["image_only"]), rate(runs["cached"])
    read_views = gbps["read_block"] * 1e9 / view_bytes
    return {
        "image_only_samples_per_s": img, "cached_samples_per_s": cached,
        "image_only_samples_per_s_wall": rate(runs["image_only"], per="wall_s"),
        "cached_samples_per_s_wall": rate(runs["cached"], per="wall_s"),
        "cached_cost_ratio": img / cached,
        "target_read_samples_per_s": read_views,
        "target_read_gb_per_s": gbps["read_block"], "zarr_target_only_gb_per_s": gbps["zarr_target_only"],
        "memcpy_gb_per_s": gbps["memcpy"], "memcpy_hot_gb_per_s": gbps["memcpy_hot"],
        "memcpy_ring_bytes": int(ring.nbytes), "read_block_ms_by_array": array_ms,
        "read_vs_memcpy": gbps["read_block"] / gbps["memcpy"],
        "gb_per_s_wall": gbps_wall,
        "block_views": block, "block_bytes": src.nbytes, "view_bytes": view_bytes, "batch_size": prof.batch,
        "codec": m.codec, "runs": runs, "bandwidth_runs": bw,
        "per": "CPU-second of this process (all threads), torch at 1 thread, workers=0",
    }


# ------------------------------------------------------------------------------------------------
# Section 3. Loss (benchmarks/loss.py).

def loss_section(device: torch.device, quick: bool) -> dict:
    path = Path(__file__).resolve().with_name("loss.py")
    spec = importlib.util.spec_from_file_location("g2sd_benchmark_loss", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    log("loss: benchmarks/loss.py")
    report = mod.run_loss_benchmark(str(device), quick=quick)
    report["markdown"] = mod.format_markdown(report)
    return report


def loss_targets(report: dict) -> dict:
    """Worst case over (B, target dtype) of the fused kernel's fraction of copy bandwidth and speed-up
    over torch eager; None where the kernel was not timed (CPU)."""
    rows = [r for r in report.get("results", []) if r.get("time_ms")]
    frac, speed = [], []
    for r in rows:
        if r["method"] != "triton_fused":
            continue
        eager = next((e for e in rows if e["method"] == "torch_eager" and e["B"] == r["B"]
                      and e["target_dtype"] == r["target_dtype"]), None)
        if r.get("frac_of_copy") is not None:
            frac.append(r["frac_of_copy"])
        if eager:
            speed.append(eager["time_ms"] / r["time_ms"])
    return {"min_frac_of_copy": min(frac) if frac else None, "min_speedup_vs_eager": min(speed) if speed else None}


# ------------------------------------------------------------------------------------------------
# Section 4. Storage per codec.

def storage_section(ws: dict, prof: Profile, device: torch.device, cached_rate: float) -> dict:
    from g2sd_cache import codecs
    from g2sd_cache.cache import open_cache

    arch = prof.teachers[0]
    out: dict = {}
    targets = ws.get("targets_fp32")
    for name, codec in codecs.CODECS.items():
        log(f"storage: {prof.store_images}-view {name} cache")
        root = ws["tmp"] / f"store-{name}"
        cfg = extract_config(ws["store"], root, arch, prof, device, views=1, codec=name, workers=0,
                             chunk_views=prof.store_images)
        timed_extract(cfg)
        m = open_cache(str(root)).manifest
        on_disk = dir_bytes(root)
        target_files = sum(dir_bytes(root / s["name"], ("target", "scale")) for s in m.shards)
        formula = m.tokens * m.target_dim * codec.bytes_per_value() + (4 * m.tokens if codec.scaled else 0)
        err = codecs.codec_error(codec, targets) if targets is not None else {"rel_rmse": None, "cosine": None}
        out[name] = {"bytes_per_view": on_disk / m.views, "target_bytes_per_view": target_files / m.views,
                     "formula_bytes_per_view": formula, "rel_rmse": err["rel_rmse"], "cosine": err["cosine"],
                     "manifest_codec_error": m.codec_error.get(name), "views": m.views,
                     "imagenet_gb": {str(k): on_disk / m.views * IMAGENET_IMAGES * k / 1e9 for k in (1, 4, 10)},
                     "read_mb_per_s_at_cached_rate": on_disk / m.views * cached_rate / 1e6}
    for name in out:
        out[name]["vs_fp16"] = out[name]["bytes_per_view"] / out["fp16"]["bytes_per_view"]
    out["tokens"], out["target_dim"] = m.tokens, m.target_dim
    out["teacher"] = arch
    out["error_views"] = int(targets.shape[0]) if targets is not None else 0
    out["cached_samples_per_s"] = cached_rate
    out["imagenet_images"] = IMAGENET_IMAGES
    return out


# ------------------------------------------------------------------------------------------------
# Report.

def judge(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "SHORT")


def targets_rows(rep: dict) -> list[dict]:
    rows = []
    for p in rep["step"]["pairs"]:
        rows.append({"what": f"step efficiency {short(p['teacher'])}->{short(p['student'])}", "target": "≥ 0.95",
                     "value": f"{p['efficiency']:.2f} (speedup {p['speedup']:.2f}x of ideal {p['ideal_speedup']:.2f}x)",
                     "status": judge(p["efficiency"] >= TARGETS["efficiency"])})
    d = rep["data"]
    rows.append({"what": "target-read bandwidth vs memcpy (one core)", "target": "≥ 0.8x",
                 "value": f"{d['read_vs_memcpy']:.2f}x ({d['target_read_gb_per_s']:.2f} vs "
                          f"{d['memcpy_gb_per_s']:.2f} GB/s)",
                 "status": judge(d["read_vs_memcpy"] >= TARGETS["read_vs_memcpy"])})
    rows.append({"what": "cached pipeline cost per view vs image-only", "target": "≤ 1.1x",
                 "value": f"{d['cached_cost_ratio']:.2f}x ({1e3 / d['cached_samples_per_s']:.2f} vs "
                          f"{1e3 / d['image_only_samples_per_s']:.2f} ms per view per core)",
                 "status": judge(d["cached_cost_ratio"] <= TARGETS["cached_cost"])})
    e = rep["extract"]
    steady_ok = e["steady_ratio"] >= TARGETS["extract"] if math.isfinite(e["steady_ratio"]) else None
    rows.append({"what": "extract vs bare teacher (steady state, by difference)", "target": "≥ 0.95x",
                 "value": f"{fmt(e['steady_ratio'], '.2f')}x ({fmt(e['steady_views_per_s'], '.1f')} vs "
                          f"{e['teacher_only_views_per_s']:.1f} views/s)", "status": judge(steady_ok)})
    rows.append({"what": f"extract vs bare teacher (end to end, {e['views']} views)", "target": "≥ 0.95x",
                 "value": f"{e['ratio']:.2f}x ({e['views_per_s']:.1f} vs {e['teacher_only_views_per_s']:.1f} views/s)",
                 "status": judge(e["ratio"] >= TARGETS["extract"])})
    s = rep["storage"]
    for name in ("int8", "fp8"):
        c = s[name]
        rmse = c["rel_rmse"]
        rows.append({"what": f"{name} bytes per view vs fp16", "target": "≤ 0.51x",
                     "value": f"{c['vs_fp16']:.3f}x ({c['bytes_per_view']:.0f} vs {s['fp16']['bytes_per_view']:.0f} B)",
                     "status": judge(c["vs_fp16"] <= TARGETS["quant_bytes"])})
        rows.append({"what": f"{name} relative RMS error", "target": "≤ 1 %",
                     "value": f"{fmt(None if rmse is None else 100 * rmse, '.2f')} %",
                     "status": judge(None if rmse is None else rmse <= TARGETS["quant_rmse"])})
    lt = loss_targets(rep["loss"])
    cpu_note = "kernel needs CUDA (this run: CPU)" if lt["min_frac_of_copy"] is None else None
    frac, speed = lt["min_frac_of_copy"], lt["min_speedup_vs_eager"]
    rows.append({"what": "CUDA fused loss vs copy bandwidth (worst B, target)", "target": "≥ 0.85x",
                 "value": cpu_note or f"{frac:.2f}x",
                 "status": judge(None if frac is None else frac >= TARGETS["loss_copy"])})
    rows.append({"what": "CUDA fused loss vs torch eager (worst B, target)", "target": "≥ 3x",
                 "value": cpu_note or f"{fmt(speed, '.2f')}x",
                 "status": judge(None if speed is None else speed >= TARGETS["loss_eager"])})
    return rows


def short(name: str) -> str:
    for k, v in (("vit_base", "B"), ("vit_large", "L"), ("vit_huge", "H"), ("vit_small", "S"), ("vit_tiny", "T"),
                 ("micro", "micro")):
        if k in name:
            return v
    return name


def markdown(rep: dict) -> str:
    mi, st, d, e, s = rep["machine"], rep["step"], rep["data"], rep["extract"], rep["storage"]
    la0, la1 = mi.get("loadavg_start"), mi.get("loadavg_end")
    out = [f"# g2sd-cache throughput — {rep['profile']} profile on {mi['device']}", "",
           f"Machine: {mi['cpu_model']}, {mi['usable_cores']} usable cores, torch {mi['torch']} "
           f"({mi['torch_threads']} threads), GPU: {mi['gpu'] or 'none'}; load average (1 min) "
           f"{fmt(la0[0] if la0 else None, '.2f')} at start, {fmt(la1[0] if la1 else None, '.2f')} at end; "
           f"run took {rep['runtime_s']:.0f} s.", ""]

    out += ["## 1. Step: online vs cached G2SD", "",
            f"batch {st['batch_size']}, {st['precision']}, medians of {st['rounds']} interleaved rounds "
            f"(after {st['warm_rounds']} warm-up), {st['timed_steps_per_cell']} timed step(s) per cell; "
            f"speedup, ideal and efficiency are per-round ratios, then the median.", ""]
    rows = []
    for p in st["pairs"]:
        rows.append([f"{short(p['teacher'])} → {short(p['student'])}", fmt(p["online_samples_per_s"], ".2f"),
                     fmt(p["cached_samples_per_s"], ".2f"),
                     f"{p['speedup']:.2f}x ({p['speedup_min']:.2f}–{p['speedup_max']:.2f})",
                     f"{p['ideal_speedup']:.2f}x", f"{p['efficiency']:.2f}", fmt(p["t_teacher_ms"], ".0f"),
                     fmt(p["t_student_ms"], ".0f"), fmt(p["online_overhead_ms"], "+.0f"),
                     fmt(p["cached_overhead_ms"], "+.0f"),
                     f"{100 * p['online_data_wait_frac']:.0f} % / {100 * p['cached_data_wait_frac']:.0f} %"])
    out.append(table(["teacher → student", "online samples/s", "cached samples/s", "speedup (range)", "ideal",
                      "efficiency", "teacher alone ms", "student alone ms", "online − (teacher+student) ms",
                      "cached − student ms", "data wait online / cached"], rows))
    su = st["loader_startup_s"]
    headroom = d["cached_samples_per_s"] * st["workers"] / st["cached_samples_per_s"]
    out += ["", f"Data loading: {st['workers']} DataLoader worker(s) per loader, so decode and target reads run in "
            f"another process, overlapping the step; on a small CPU box that worker competes with torch's "
            f"{mi['torch_threads']} threads for the cores, and the contention is inside both measured steps. "
            f"Loader start-up to the first batch of an epoch is excluded from the timed steps: online "
            f"{fmt(median(su['online']), '.2f')} s, cached {fmt(median(su['cached']), '.2f')} s (median of "
            f"{len(su['online'])} / {len(su['cached'])} epoch starts). Up to {st['prefetch_batches']} collated batches "
            f"wait in each loader ({st['drain_steps_per_cell']} untimed drain steps per cell); data headroom "
            f"(one core's cached pipeline × workers / cached step rate, B→S) = {headroom:.1f}x, "
            f"so {'the pipeline keeps up' if headroom > 1.2 else 'the pipeline is the bottleneck'}."]
    if mi["device"] == "cpu":
        p0, b = st["pairs"][0], st["batch_size"]
        out += ["", f"Where the step overheads go (CPU): a batch of {b} costs the data pipeline "
                f"{b * 1e3 / d['image_only_samples_per_s']:.0f} ms (online) / {b * 1e3 / d['cached_samples_per_s']:.0f} ms "
                f"(cached) of CPU (section 2), taken from the same cores the step runs on; measured, the online step "
                f"exceeds teacher + student by {p0['online_overhead_ms']:+.0f} ms and the cached step exceeds the student "
                f"alone by {p0['cached_overhead_ms']:+.0f} ms ({short(p0['teacher'])} → {short(p0['student'])}). A smaller "
                f"student feels the same cost more, so its efficiency drops first."]
    out += ["", "Student step, synchronised per part (ms):", ""]
    out.append(table(["student", "forward", "loss", "backward", "AdamW"],
                     [[short(k), *(fmt(v.get(p), ".1f") for p in ("forward", "loss", "backward", "adamw"))]
                      for k, v in st["student_breakdown_ms"].items()]))

    out += ["", "## 2. Data pipeline, per core", "",
            f"EpochLoader with workers=0 in this process, torch at 1 thread, batch {d['batch_size']}, {d['codec']} "
            f"targets; rates per CPU-second of the process (all its threads). Reads come from the page cache.", ""]
    out.append(table(["pipeline", "samples/s per core", "ms per sample", "vs image-only"], [
        ["image-only: decode + crop + flip + normalise (online G2SD)", fmt(d["image_only_samples_per_s"], ".0f"),
         fmt(1e3 / d["image_only_samples_per_s"], ".2f"), "1.00x"],
        ["cached: the same + target block reads", fmt(d["cached_samples_per_s"], ".0f"),
         fmt(1e3 / d["cached_samples_per_s"], ".2f"), f"{d['cached_cost_ratio']:.2f}x cost"],
        [f"target reads alone (Cache.read_block, {d['block_views']} views per block)",
         fmt(d["target_read_samples_per_s"], ".0f"), fmt(1e3 / d["target_read_samples_per_s"], ".3f"), "-"]]))
    out += [""]
    out.append(table(["copy of target bytes", "GB/s per core", "vs memcpy"], [
        ["Cache.read_block (all of a block's arrays; target bytes counted)", fmt(d["target_read_gb_per_s"], ".2f"),
         f"{d['read_vs_memcpy']:.2f}x"],
        ["zarr target array alone", fmt(d["zarr_target_only_gb_per_s"], ".2f"),
         f"{d['zarr_target_only_gb_per_s'] / d['memcpy_gb_per_s']:.2f}x"],
        [f"numpy memcpy (np.copyto of {d['block_bytes'] / 2**20:.1f} MiB blocks from a "
         f"{d['memcpy_ring_bytes'] / 2**20:.0f} MiB ring: DRAM-bound)", fmt(d["memcpy_gb_per_s"], ".2f"), "1.00x"],
        ["numpy memcpy of one block again and again (cache-resident, for context)", fmt(d["memcpy_hot_gb_per_s"], ".2f"),
         f"{d['memcpy_hot_gb_per_s'] / d['memcpy_gb_per_s']:.2f}x"]]))
    out += ["", "Where a read_block goes (ms of CPU per block, each array read alone): " + ", ".join(
        f"{k} {v:.2f}" for k, v in d["read_block_ms_by_array"].items()) + "."]

    out += ["", "## 3. Loss", "", rep["loss"]["markdown"]]

    out += ["", "## 4. Storage per codec", "",
            f"Caches of {s['fp16']['views']} views written by run_extract ({short(s['teacher'])} teacher, "
            f"T={s['tokens']}, D={s['target_dim']}); RMS error on {s['error_views']} float32 targets of a random-weight "
            f"teacher on synthetic images (real MAE features have outlier channels: re-check on your teacher). "
            f"Read bandwidth at this device's measured cached rate, {s['cached_samples_per_s']:.1f} samples/s (B→S).", ""]
    rows = []
    for name in ("fp16", "bf16", "int8", "fp8"):
        c = s[name]
        rows.append([name, fmt(c["bytes_per_view"], ".0f"), fmt(c["target_bytes_per_view"], ".0f"),
                     fmt(c["formula_bytes_per_view"], ".0f"), f"{c['vs_fp16']:.3f}x",
                     fmt(None if c["rel_rmse"] is None else 100 * c["rel_rmse"], ".3f"),
                     *(fmt(c["imagenet_gb"][k], ".0f") for k in ("1", "4", "10")),
                     fmt(c["read_mb_per_s_at_cached_rate"], ".2f")])
    out.append(table(["codec", "bytes/view on disk", "target arrays", "formula", "vs fp16", "rel RMSE %",
                      "ImageNet K=1 GB", "K=4 GB", "K=10 GB", "read MB/s at cached rate"], rows))

    out += ["", "## 5. Extract vs the bare teacher", "",
            f"{short(e['teacher'])} teacher, batch {e['batch_size']}, {e['workers']} worker(s), "
            f"{e['views_per_image']} views per image; the bare teacher runs normalise + targets on the same batches "
            f"(the first {e['teacher_only_views']} views). Medians of {len(e['rounds'])} rounds of (bare teacher, small "
            f"extract, large extract), ratios taken within a round. run_extract's own timer starts once the teacher "
            f"is built: it includes worker start-up, the pipeline filling and the last shard's write, which the "
            f"difference of the two extracts removes.", ""]
    out.append(table(["measure", "views/s", "vs bare teacher"], [
        [f"run_extract end to end ({e['views']} views, {e['seconds']:.1f} s)", fmt(e["views_per_s"], ".1f"),
         f"{e['ratio']:.2f}x"],
        [f"run_extract steady state ({e['views']} − {e['small_views']} views; "
         f"fixed cost {fmt(e['fixed_cost_s'], '.2f')} s)",
         fmt(e["steady_views_per_s"], ".1f"), f"{fmt(e['steady_ratio'], '.2f')}x"],
        ["bare teacher forward", fmt(e["teacher_only_views_per_s"], ".1f"), "1.00x"]]))

    out += ["", "## Targets (issue 5)", ""]
    out.append(table(["what", "target", "measured", ""],
                     [[r["what"], r["target"], r["value"], r["status"]] for r in rep["targets"]]))
    return "\n".join(out)


def plot(rep: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, d = rep["step"], rep["data"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [2, 1, 1.3]})
    labels = [f"{short(p['teacher'])}→{short(p['student'])}" for p in st["pairs"]]
    x = np.arange(len(labels))
    online = [p["online_samples_per_s"] for p in st["pairs"]]
    cached = [p["cached_samples_per_s"] for p in st["pairs"]]
    ideal = [p["online_samples_per_s"] * p["ideal_speedup"] for p in st["pairs"]]
    a1.bar(x - 0.27, online, 0.27, label="online (teacher in the loop)")
    a1.bar(x, cached, 0.27, label="cached (g2sd-cache)")
    a1.bar(x + 0.27, ideal, 0.27, label="ideal: online × (t_teacher + t_student) / t_student", color="none",
           edgecolor="gray", hatch="//")
    for xi, p in zip(x, st["pairs"]):
        a1.text(xi, p["cached_samples_per_s"], f"{p['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    a1.set_xticks(x, labels)
    a1.set_ylabel("samples/s")
    a1.set_title(f"Training step, batch {st['batch_size']}, {st['precision']} ({rep['machine']['device']})")
    a1.legend(fontsize=8)
    a2.bar(["image-only", "cached"], [d["image_only_samples_per_s"], d["cached_samples_per_s"]], color=["C0", "C1"])
    a2.set_ylabel("samples/s per core")
    a2.set_title("Data pipeline (decode, crop, flip, normalise)", fontsize=10)
    a3.bar(["Cache.read_block", "zarr target\narray alone", "memcpy"],
           [d["target_read_gb_per_s"], d["zarr_target_only_gb_per_s"], d["memcpy_gb_per_s"]], color=["C2", "C2", "gray"])
    a3.set_ylabel("GB/s per core")
    a3.set_title(f"Reading {d['codec']} targets vs memcpy", fontsize=10)
    mi = rep["machine"]
    fig.suptitle(f"{mi['cpu_model']}, {mi['usable_cores']} cores; GPU: {mi['gpu'] or 'none'}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--quick", action="store_true", help="micro presets, tiny batches: a smoke run in under a minute")
    ap.add_argument("--json", help="write every figure and the machine description to this JSON file")
    ap.add_argument("--plot", help="draw the step and data comparisons as bar charts (PNG; needs matplotlib)")
    ap.add_argument("--teachers", nargs="+", help="teacher presets (the first is used for extract and storage)")
    ap.add_argument("--students", nargs="+",
                    help="student presets (the first, with the first teacher, is the headline pair)")
    ap.add_argument("--batch-size", type=int, help="override the profile's batch size")
    ap.add_argument("--workers", type=int, help="override the profile's DataLoader workers")
    ap.add_argument("--rounds", type=int, help="override the profile's timed step rounds")
    args = ap.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        sys.exit("--plot needs matplotlib, which is not installed: pip install matplotlib")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: no CUDA device here; use --device cpu")
    device = torch.device(args.device if args.device != "cuda" else "cuda:0")

    prof = profile_for(device, args.quick)
    over = {k: v for k, v in (("teachers", tuple(args.teachers or ()) or None),
                              ("students", tuple(args.students or ()) or None), ("batch", args.batch_size),
                              ("workers", args.workers), ("rounds", args.rounds)) if v is not None}
    prof = dataclasses.replace(prof, **over)
    t_start = time.perf_counter()
    rep: dict = {"profile": prof.name, "config": dataclasses.asdict(prof), "machine": machine_info(device)}
    log(f"{prof.name} profile on {device}: teachers {', '.join(prof.teachers)}; students {', '.join(prof.students)}; "
        f"batch {prof.batch}")

    with tempfile.TemporaryDirectory(prefix="g2sd-throughput-") as tmp_name:
        from g2sd_cache.sources import open_source

        tmp = Path(tmp_name)
        log(f"making {prof.images} synthetic JPEGs")
        images = make_images(tmp / "images", prof.images)
        source = open_source(str(images))
        ws = {"tmp": tmp, "images": images,
              "small": subset_folder(source, tmp / "small", prof.small_images),
              "store": subset_folder(source, tmp / "store", prof.store_images)}
        rep["extract"] = extract_section(ws, prof, device)
        rep["step"] = step_section(ws, prof, device)
        rep["data"] = data_section(ws, prof)
        rep["loss"] = loss_section(device, args.quick)
        rep["storage"] = storage_section(ws, prof, device, rep["step"]["cached_samples_per_s"])
    rep["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    rep["runtime_s"] = time.perf_counter() - t_start
    rep["targets"] = targets_rows(rep)

    print(markdown(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1, default=str))
        log(f"wrote {args.json}")
    if args.plot:
        plot(rep, args.plot)
        log(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
