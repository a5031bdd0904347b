"""`g2sd-cache verify`: its flags and the report it prints (the target cache's checks, or the logits cache's)."""
from __future__ import annotations

from g2sd_cache.cli.command import Command


def add(sub):
    from g2sd_cache.verify.cache import BF16_COMPUTE_TOLERANCE, CODEC_TOLERANCE
    p = sub.add_parser(
        "verify", help="check a cache: manifest vs disk, checksums, views exactly once, masks, crops, pixels, targets",
        description="Check a cache without trusting it: the manifest against the shard folders and file sizes, every "
                    "file's digest and every inner chunk's and shard index's crc32c (read directly, fast), no leftover "
                    "temporary files, every (image, view) pair exactly once, masks keeping the manifest's visible "
                    "count; with --data that the images are the ones extracted, every crop lies inside its image, "
                    "every view regenerates from (seed, image, view) and stored pixels equal its visible patches. "
                    "--deep N also replays N random views through the teacher and compares targets. Exit status 0 "
                    "with a summary when all holds, 1 with one line per problem otherwise.")
    p.add_argument("cache", help="cache directory (or fsspec URL) written by `g2sd-cache extract`")
    p.add_argument("--data", default=None, metavar="PATH", help="the image folder or tar shards the cache was "
                   "extracted from: also check the images (crc32c), keys, crop boxes, view regeneration and stored "
                   "pixels (byte for byte)")
    p.add_argument("--pixel-views", type=int, default=None, metavar="N", help="with --data, compare the stored pixels "
                   "of a seeded sample of N views instead of every view (re-rendering costs ~2.4 ms of a core per view)")
    p.add_argument("--deep", type=int, default=0, metavar="N", help="replay N random views through the live teacher "
                   "(from the stored pixels; a --pixels none cache needs --data) and fail any whose stored target "
                   "differs by more than the codec's tolerance (relative RMS: "
                   f"{', '.join(f'{k} {v:g}' for k, v in CODEC_TOLERANCE.items())}, pcaR twice its worst held-out "
                   "calibration view (0.05 to 0.5); combined with "
                   f"{BF16_COMPUTE_TOLERANCE:g} when bf16 autocast may be involved); default 0")
    p.add_argument("--teacher", default=None, metavar="CKPT|random", help="teacher for --deep: the MAE checkpoint "
                   "the cache was made with, or random[:SEED]; default: the one the manifest records. Its weights "
                   "must have the manifest's sha256")
    p.add_argument("--device", default="auto", help="device for --deep: auto (CUDA if available), cpu, cuda or "
                   "cuda:N")
    p.add_argument("--teacher-precision", default=None, choices=["auto", "fp32", "fp16", "bf16"], help="the "
                   "replaying teacher's arithmetic for --deep (default: what the manifest records extract used, where "
                   "the device supports it; auto: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="which views --deep and --pixel-views pick "
                   "(default 0)")
    p.add_argument("--json", action="store_true", help="print the report (problems and figures) as JSON")
    return p


def run(args) -> int:
    import json
    from g2sd_cache.cache.logits import is_logits_cache
    if is_logits_cache(args.cache):    # stage 2's cache of teacher predictions (verify/logits.py)
        from g2sd_cache.verify.logits import format_logits_summary as format_summary, verify_logits_at
        report = verify_logits_at(args.cache, deep=args.deep, teacher=args.teacher, data=args.data, device=args.device,
                                  seed=args.seed, teacher_precision=args.teacher_precision)
    else:
        from g2sd_cache.verify.cache import format_summary, verify_cache
        report = verify_cache(args.cache, deep=args.deep, teacher=args.teacher, data=args.data, device=args.device,
                              seed=args.seed, pixel_views=args.pixel_views, teacher_precision=args.teacher_precision)
    if args.json:
        print(json.dumps({"ok": report.ok, "problems": report.problems, "summary": report.summary}, indent=1,
                         default=str))
    elif report.ok:
        print(format_summary(report))
    else:
        for line in report.problems:
            print(line)
        print(f"verify: {len(report.problems)} problem(s) in {report.path}")
    return 0 if report.ok else 1


COMMAND = Command("verify", add, run)
