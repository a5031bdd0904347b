"""Throughput of G2SD distillation, online vs cached, and what feeds it, in one run.

    python benchmarks/throughput.py [--device cpu|cuda] [--quick] [--json OUT.json] [--plot OUT.png]
                                    [--teachers ...] [--students ...] [--batch-size N] [--workers N] [--rounds N]

Everything runs in one process on seeded synthetic JPEGs (g2sd_cache.data.synthetic, ~500x375) in a temporary
folder, through the product's own code: `run_extract` writes the caches, train's `prepare` + `Distiller`
run the steps and train's `StepLoader` feeds them. One module per section, each saying what its figures
mean; every figure lands in the JSON under the section's name:

- extract (benchmarks/sections/extract.py, runs first: its cache feeds the others): `run_extract` against the bare teacher.
- step (benchmarks/sections/step.py): online vs cached `Distiller` steps, speedup against the ideal
  (t_teacher + t_student) / t_student, and the models' FLOPs per sample (benchmarks/sections/flops.py).
- data (benchmarks/sections/data.py): per core, the image path against the cached pixel path (and `--pixels none`), where
  the pixel path's time goes, and the cores one GPU needs on each path (measured rate on CUDA, else an
  estimate from FLOPs, labelled as one).
- loss (benchmarks/sections/loss.py -> benchmarks/loss.py): the fused loss kernel (CUDA) or the torch reference (CPU).
- storage (benchmarks/sections/storage.py): bytes per view of targets and pixels for every codec, codec errors.
- finetune (benchmarks/sections/finetune.py): G2SD's second stage, `FineTuner` steps online vs on cached teacher logits
  (speedup against the ideal), the logits cache's bytes per sample, extract-logits against the bare teacher;
  classifier presets, batch and workers of its own (bench_finetune.finetune_profile: ViT-B -> ViT-S and ViT-T;
  micro with --quick), which the flags below do not change.
  `python benchmarks/finetune.py` runs it alone.
Then benchmarks/targets.py judges the figures against the open issues' targets (PASS / SHORT), and
benchmarks/report.py prints the markdown report and draws the plot. Shared helpers: benchmarks/common.py.

On a shared machine, per-core (CPU-second) figures stay true but wall-clock step rates are noisy: the
report prints the load average at start and end.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

from g2sd_cache.benchmarks.common import (Profile, loadavg, log, machine_info, make_images, profile_for, subset_folder,
                                          write_outputs)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="--teachers, --students, --batch-size, "
                                 "--workers and --rounds apply to the stage-1 sections; the finetune section (stage 2) "
                                 "keeps its own profile (benchmarks/sections/finetune.py).")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--quick", action="store_true", help="micro presets, tiny batches: a smoke run in well under a minute")
    ap.add_argument("--json", help="write every figure and the machine description to this JSON file")
    ap.add_argument("--plot", help="draw the step, data and feed comparisons as bar charts (PNG; needs matplotlib)")
    ap.add_argument("--teachers", nargs="+", help="teacher presets (the first is used for extract and storage)")
    ap.add_argument("--students", nargs="+",
                    help="student presets (the first, with the first teacher, is the headline pair)")
    ap.add_argument("--batch-size", type=int, help="override the profile's batch size")
    ap.add_argument("--workers", type=int, help="override the profile's DataLoader workers (extract, online steps)")
    ap.add_argument("--rounds", type=int, help="override the profile's timed step rounds")
    return ap.parse_args(argv)


def make_profile(args: argparse.Namespace, device: torch.device) -> Profile:
    """The profile for the device, with the command line's overrides; a bad value exits with one line."""
    from g2sd_cache.models.mae import STUDENT_PRESETS, TEACHER_PRESETS

    for flag, names, presets in (("--teachers", args.teachers, TEACHER_PRESETS),
                                 ("--students", args.students, STUDENT_PRESETS)):
        unknown = [n for n in names or () if n not in presets]
        if unknown:
            sys.exit(f"{flag}: unknown preset {unknown[0]}; choose from: {', '.join(presets)}")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                               ("--rounds", args.rounds, 1)):
        if value is not None and value < least:
            sys.exit(f"{flag} {value}: must be at least {least}")
    over = {"teachers": tuple(args.teachers or ()) or None, "students": tuple(args.students or ()) or None,
            "batch": args.batch_size, "workers": args.workers, "rounds": args.rounds}
    return dataclasses.replace(profile_for(device, args.quick), **{k: v for k, v in over.items() if v is not None})


def run(prof: Profile, device: torch.device, quick: bool) -> dict:
    from g2sd_cache.data.sources import open_source

    from g2sd_cache.benchmarks.sections import Bench, run_sections
    from g2sd_cache.benchmarks.targets import targets_rows

    t_start = time.perf_counter()
    rep: dict = {"profile": prof.name, "config": dataclasses.asdict(prof), "machine": machine_info(device)}
    log(f"{prof.name} profile on {device}: teachers {', '.join(prof.teachers)}; students {', '.join(prof.students)}; "
        f"batch {prof.batch}")
    with tempfile.TemporaryDirectory(prefix="g2sd-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"making {prof.images} synthetic JPEGs")
        images = make_images(tmp / "images", prof.images)
        source = open_source(str(images))
        ws = {"tmp": tmp, "images": images, "small": subset_folder(source, tmp / "small", prof.small_images),
              "store": subset_folder(source, tmp / "store", prof.store_images)}
        run_sections(Bench(ws, prof, device, quick, rep))   # the sections, in order (benchmarks/sections/)
    rep["machine"]["loadavg_end"] = loadavg()
    rep["runtime_s"] = time.perf_counter() - t_start
    rep["targets"] = targets_rows(rep)
    return rep


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        sys.exit("--plot needs matplotlib, which is not installed: pip install matplotlib")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: no CUDA device here; use --device cpu")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        sys.exit(f"--device {args.device}: expected cpu, cuda or cuda:N")
    device = torch.device(args.device if args.device != "cuda" else "cuda:0")
    rep = run(make_profile(args, device), device, args.quick)

    from g2sd_cache.benchmarks.report import markdown, plot
    print(markdown(rep))
    write_outputs(rep, args.json, args.plot, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
