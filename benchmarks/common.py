"""What every section of benchmarks/throughput.py shares: the profile (what one run measures), timing
and machine helpers, and the synthetic image folders all sections read. benchmarks/study.py and
benchmarks/finetune.py use the same helpers.

Timing conventions: wall-clock figures are medians over repeats, taken in interleaved (ABBA) rounds so
that drift of a shared machine hits both sides of a ratio alike. CPU figures (`cpu_clock`) are
`time.process_time()` of this process — all its threads, so the background reader thread of the pixel
path counts — which gives per-core rates that stay true on a busy machine.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SEED = 0
IMAGENET_IMAGES = 1_281_167


@dataclass(frozen=True)
class Profile:
    name: str
    teachers: tuple[str, ...]
    students: tuple[str, ...]
    batch: int            # step, extract and data batch size
    images: int           # images in the benchmark folder; the step cache holds images x views views
    small_images: int     # a smaller extract, for extract's steady-state rate by difference
    store_images: int     # images of each per-codec storage cache (and of the --pixels none cache)
    views: int = 2        # views per image in the caches
    rounds: int = 5       # timed rounds of the step section
    warm_rounds: int = 1  # untimed rounds first
    steps: int = 3        # timed steps per cell at least ...
    max_steps: int = 40   # ... and more, up to this, until the cell's mean is stable (see sections/step.py)
    stable_rel: float = 0.035   # target relative standard error of a cell's mean step time (~ +-7 % at 95 %)
    drain: int = 0        # untimed loader steps before each timed loader cell (at least `prefetch` are run)
    workers: int = 1      # DataLoader workers for extract and the image path of the step loaders
    prefetch: int = 2     # StepLoader prefetch (train's default)
    data_repeats: int = 3
    image_views: int = 256     # views decoded per repeat of the image-path data measurement
    cached_views: int = 8192   # views read per repeat of the cached-path data measurement
    ring_bytes: int = 128 << 20   # memcpy source ring, larger than a last-level cache
    extract_rounds: int = 2
    breakdown_repeats: int = 2
    teacher_views_max: int = 100_000  # bare-teacher pass: at most this many of extract's views
    img_size: int = 224


def profile_for(device: torch.device, quick: bool) -> Profile:
    if quick:  # micro presets: exercises every code path in well under a minute
        return Profile("quick", ("test_mae_micro_patch16",), ("test_vit_micro_patch16_dec32d1b",), batch=4,
                       images=16, small_images=8, store_images=8, rounds=2, steps=3, max_steps=8, stable_rel=0.05, data_repeats=2,
                       image_views=32, cached_views=1024, ring_bytes=32 << 20, breakdown_repeats=1)
    teachers = ("mae_vit_base_patch16", "mae_vit_large_patch16")
    students = ("mae_vit_small_patch16_dec256d4b", "mae_vit_tiny_patch16_dec128d4b")
    if device.type == "cuda":
        return Profile("cuda", teachers, students, batch=256, images=3072, small_images=768, store_images=256,
                       rounds=5, steps=8, max_steps=64, drain=3, workers=max(1, usable_cores() - 2), breakdown_repeats=3,
                       teacher_views_max=2048, extract_rounds=3, cached_views=32768)
    return Profile("cpu", teachers, students, batch=16, images=64, small_images=16, store_images=32, max_steps=12)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def log(msg: str, tag: str | None = None) -> None:
    """A progress line on stderr, tagged with the script's name (throughput, finetune, ...) and the time."""
    tag = tag or Path(sys.argv[0]).stem
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else float("nan")


@contextlib.contextmanager
def cpu_clock():
    """Times the block: yields a dict that gets `cpu_s` (this process, all threads) and `wall_s`."""
    got: dict = {}
    c0, t0 = time.process_time(), time.perf_counter()
    try:
        yield got
    finally:
        got["cpu_s"], got["wall_s"] = time.process_time() - c0, time.perf_counter() - t0


@contextlib.contextmanager
def quiet(log_file: Path | None = None):
    """Swallow the product's progress bars and notes: appended to `log_file` if given (it stays there, for a
    failure's message to point at), else kept in memory and shown if something fails."""
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield
        return
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    except BaseException:
        sys.stderr.write(out.getvalue() + err.getvalue())
        raise


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's CPU threads set to `n` (None: unchanged) for the block, then restored."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def loadavg() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu_model": cpu, "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "gpu": None, "loadavg_start": loadavg()}
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


def make_images(root: Path, count: int, classes: int = 4) -> Path:
    """`count` seeded ~500x375 JPEGs. Large sets are written in parallel parts (sub-folders)."""
    from g2sd_cache.data.synthetic import make_image_folder

    parts = max(1, min(os.cpu_count() or 1, count // 256))
    if parts == 1:
        return make_image_folder(root, count, seed=SEED, classes=classes, vary_size=True)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    sizes = [count // parts + (i < count % parts) for i in range(parts)]
    with ProcessPoolExecutor(parts, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(make_image_folder, [root / f"part{i:02d}" for i in range(parts)], sizes,
                      [SEED + i for i in range(parts)], [classes] * parts))
    return root


def generate_images(root: Path, count: int, sides: tuple[int, int], classes: int = 4) -> Path:
    """`count` seeded synthetic JPEGs (g2sd_cache.data.synthetic) of random width and height in `sides`, image i in
    folder class{i % classes}; small sides make folders of thousands of images in seconds."""
    import numpy as np

    from g2sd_cache.data.synthetic import jpeg_bytes, synthetic_image

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(*sides)), int(rng.integers(*sides)))
        (folder / f"img{i:06d}.jpg").write_bytes(jpeg_bytes(synthetic_image(1_000_003 + i, size)))
    return root


def subset_folder(source, dst: Path, n: int) -> Path:
    """The first `n` images of `source` (a FolderSource), as symlinks under the same relative paths."""
    for key in source.keys[:n]:
        link = dst / key
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(source.root) / key)
    return dst


def write_outputs(report: dict, json_path: str | None, plot_path: str | None, plot) -> None:
    """A benchmark's files: the report as JSON at `json_path`, `plot(report, plot_path)` drawn (each if given)."""
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {json_path}")
    if plot_path:
        plot(report, plot_path)
        log(f"wrote {plot_path}")
