"""What the cache costs the student: online G2SD against cached G2SD with K views and every codec (issue 13).

    python benchmarks/study.py [--data DIR] [--seeds N] [--views 1 2 4 8] [--codec-views K] [--codecs ...]
                               [--json OUT.json] [--plot OUT.png] [--quick]
    python benchmarks/study.py --teacher mae_pretrain_vit_base_full.pth --arch mae_vit_base_patch16 \\
                               --student mae_vit_small_patch16_dec256d4b --data DIR --device cuda

Online G2SD draws a fresh crop, flip and mask of every image every epoch; cached G2SD replays K stored views
(epoch e trains on view e mod K), in a lossy codec. The study trains the same student, from the same
initialisation, on the same training images, for the same number of steps (so the same number of samples),
under each arm:

    online            the teacher in the loop, fresh views every epoch (G2SD as published)
    cached-kK         a cache of K views per image (fp16, the default codec), for K in --views
    CODEC-kK          a cache of --codec-views K views in every other codec of g2sd_cache.cache.codecs.CODECS

and measures each trained student on a held-out split of images that no arm trained on, with fresh views
(view indices no arm used) through the live teacher: the G2SD loss (smooth-L1, beta 2, all tokens) against the
teacher's float32 targets and the mean cosine between the student's prediction and the target per token.
Every arm is repeated for --seeds seeds (student initialisation, data order and views all follow the seed;
the held-out views do not), and its gap to online is taken within each seed, then averaged: the spread is
that of the paired differences.

Parity (fidelity/paired.py): every cached arm CODEC:PIXELS:K is also judged against fp16 with the same PIXELS
and K (fp16 with other pixels against fp16 with exact ones: the pixel mode's own cost), which sees the same
views in the same order from the same initialisation, so only the stored targets (or pixels) differ. The
study adds these references where they are missing (one line each), reports the paired gap's mean ± standard
error, and says whether the error is below 1 % of online's loss and the gap within 2 errors of zero. A pcaR arm
with R at or above the teacher's target width is skipped with one line; an --arms given twice is refused.

Nothing here trains or extracts on its own: caches come from `g2sd_cache.generic.extract.run_extract`, students from
`g2sd_cache.generic.train.train` (cached arms with `cache=`, the online arm with `teacher=` and `data=`), read back
from the run's checkpoint. For a seed s, extract's view v of an image is the view online G2SD trains on in
epoch v (both are `views.sample_view(s, image, v)`), so cached-kK replays the views of online's first K epochs
(the batches differ: a cache's epoch order runs over its shards, online's over the folder listing).

Profiles: the default (micro teacher and student, small generated images, CPU, a few minutes) is a proxy —
a random micro teacher's targets are not real MAE features — that shows the shape of the trade-off and
checks the tool; `--teacher CKPT --arch ... --student ... --data DIR --device cuda` measures the real thing.
`--quick` is a smoke run for the tests.

Modules: benchmarks/fidelity/setup.py (profiles, configuration), benchmarks/fidelity/data.py (split, held-out views, evaluation),
benchmarks/fidelity/arms.py (one arm, the whole study, aggregation over seeds), benchmarks/fidelity/report.py (table, plot); shared
helpers from benchmarks/common.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from g2sd_cache.cache import codecs
from g2sd_cache.common.errors import UserError

from g2sd_cache.benchmarks.common import write_outputs
from g2sd_cache.benchmarks.fidelity.arms import run_study
from g2sd_cache.benchmarks.fidelity.report import plot, table
from g2sd_cache.benchmarks.fidelity.setup import DEFAULT_CODEC, PROFILES, StudyConfig, choose_profile  # noqa: F401 (DEFAULT_CODEC: for the tests)


def _profiles(field: str) -> str:
    """The profiles' defaults of a flag, for --help: "micro 64, full 16, quick 2"."""
    def show(v):
        return "all" if v is None else " ".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return "default: " + ", ".join(f"{name} {show(getattr(p, field))}" for name, p in PROFILES.items())


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="What the cache costs the student: trains one student under online G2SD and under cached G2SD "
                    "(K views per image, every codec) for the same steps from the same initialisation, and "
                    "evaluates each on held-out images with fresh views through the live teacher. A flag left out "
                    "takes its profile's value: micro (the default: micro presets on CPU, minutes), full (any "
                    "non-test --arch: a real teacher, for a GPU) or quick (--quick: a smoke run).")
    ap.add_argument("--data", help="image folder to split into training and held-out images, the same split every "
                    "time (default: generate synthetic images)")
    ap.add_argument("--teacher", default="random", help="MAE checkpoint with its decoder, random / random:SEED, or "
                    "pretrained-micro[:SEED] (the micro teacher pretrained with MAE's loss on photographs; default: random)")
    ap.add_argument("--arch", help=f"teacher preset; a non-test one selects the full profile ({_profiles('arch')})")
    ap.add_argument("--student", help=f"student preset ({_profiles('student')})")
    ap.add_argument("--views", type=int, nargs="+", metavar="K", help=f"the K of the cached arms ({_profiles('views')})")
    ap.add_argument("--codec-views", type=int, default=2, metavar="K", help="the K at which every codec is compared "
                    "(default: 2)")
    ap.add_argument("--codecs", nargs="+", choices=list(codecs.CODECS), help="codecs to compare (default: all)")
    ap.add_argument("--arms", nargs="+", default=[], metavar="CODEC:PIXELS:K", help="extra cached arms, e.g. "
                    "int8:jpeg:4 int8:jpeg:8 (PIXELS: visible or jpeg; named CODEC-PIXELS-kK)")
    ap.add_argument("--pixel-quality", type=int, default=90, help="JPEG quality of the jpeg arms (default: 90)")
    ap.add_argument("--seeds", type=int, default=2, help="repeats of every arm, seeds 0..N-1 (student "
                    "initialisation, data order and training views); the spread is over these (default: 2)")
    ap.add_argument("--train-images", type=int, help=f"images to train on ({_profiles('train_images')})")
    ap.add_argument("--heldout-images", type=int, help=f"images held out for evaluation ({_profiles('heldout_images')})")
    ap.add_argument("--eval-views", type=int, help=f"fresh views per held-out image ({_profiles('eval_views')})")
    ap.add_argument("--epochs", type=int, help="passes over the training images; every arm trains epochs x "
                    f"ceil(training images / batch) steps ({_profiles('epochs')})")
    ap.add_argument("--batch-size", type=int, help="batch of training, extraction and evaluation "
                    f"({_profiles('batch_size')})")
    ap.add_argument("--blr", type=float, help=f"base learning rate, lr = blr x batch / 256 ({_profiles('blr')})")
    ap.add_argument("--warmup-epochs", type=float, help=f"linear warm-up in epochs ({_profiles('warmup_epochs')})")
    ap.add_argument("--img-size", type=int, help=f"crop size in pixels ({_profiles('img_size')})")
    ap.add_argument("--target-layer", type=int, default=4, help="teacher decoder block whose LN-ed output is the "
                    "target (default: 4)")
    ap.add_argument("--workers", type=int, help=f"DataLoader processes of extract and online training "
                    f"({_profiles('workers')})")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    ap.add_argument("--threads", type=int, help="torch CPU threads; micro models run fastest on one "
                    f"({_profiles('threads').replace('all', 'torch default')})")
    ap.add_argument("--workdir", help="work in this new or empty folder and keep it: the split images and every "
                    "arm's log, with --keep also its cache and run (default: a temporary folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep every cache and run folder (needs disk)")
    ap.add_argument("--quick", action="store_true", help="the quick profile: a smoke run of every arm (tests)")
    ap.add_argument("--report", metavar="JSON", help="print the table (and --plot) of an earlier --json; runs nothing")
    ap.add_argument("--json", help="write the arms' figures and the configuration to this JSON file")
    ap.add_argument("--plot", help="PNG: held-out loss vs K, and vs bytes per view (needs matplotlib)")
    return ap


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The flags, with the profile's value wherever a flag was left out."""
    prof = choose_profile(args.quick, args.arch)
    pick = lambda flag, field: getattr(prof, field) if flag is None else flag   # noqa: E731
    return StudyConfig(
        profile=prof, data=args.data, teacher=args.teacher, arch=pick(args.arch, "arch"),
        student=pick(args.student, "student"), views=tuple(sorted(set(args.views or prof.views))),
        codec_views=args.codec_views, codecs=tuple(args.codecs or codecs.CODECS), seeds=args.seeds,
        train_images=pick(args.train_images, "train_images"), heldout_images=pick(args.heldout_images, "heldout_images"),
        eval_views=pick(args.eval_views, "eval_views"), epochs=pick(args.epochs, "epochs"),
        batch_size=pick(args.batch_size, "batch_size"), blr=pick(args.blr, "blr"),
        warmup_epochs=pick(args.warmup_epochs, "warmup_epochs"), img_size=pick(args.img_size, "img_size"),
        target_layer=args.target_layer, workers=pick(args.workers, "workers"), threads=pick(args.threads, "threads"),
        device=args.device, workdir=args.workdir, keep=args.keep, arms=tuple(args.arms),
        pixel_quality=args.pixel_quality)


def read_report(path: str) -> dict:
    """An earlier --json, checked enough that the table and plot can be drawn from it."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--report {path}: cannot read it as JSON ({type(e).__name__}: {e})") from e
    if not (isinstance(report, dict) and isinstance(report.get("arms"), list) and "config" in report
            and any(isinstance(a, dict) and a.get("name") == "online" for a in report["arms"])):
        raise UserError(f"--report {path}: not a study --json (no arms with an online arm, or no config)")
    return report


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            raise UserError("--plot needs matplotlib, which is not installed: pip install matplotlib")
        if args.report:
            report = read_report(args.report)
        else:
            report = run_study(config_from_args(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was reported", file=sys.stderr)
        return 130
    print(table(report))
    write_outputs(report, args.json, args.plot, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
