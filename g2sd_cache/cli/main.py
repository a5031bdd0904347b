"""The `g2sd-cache` command: argument parsing only. Each sub-command builds its frozen config here
and hands it to the module that does the work; nothing below this file sees argparse."""
from __future__ import annotations

import argparse
import os
import sys

from g2sd_cache.common.errors import UserError

EXTRACT_EXAMPLE = "g2sd-cache extract --data /data/imagenet/train --teacher mae_pretrain_vit_base_full.pth " \
                  "--arch mae_vit_base_patch16 --out /cache/in1k-b16 --views 4"


def _config_from_args(cls, args: argparse.Namespace, values: dict | None = None):
    """The frozen config `cls` from parsed arguments (one per field; `values` first, flags override)."""
    import dataclasses
    merged = dict(values or {})
    merged.update({f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
    return cls(**merged)


def _add_extract(sub) -> None:
    from g2sd_cache.cache.codecs import CODECS
    from g2sd_cache.models.mae import TEACHER_PRESETS
    p = sub.add_parser("extract", help="run the MAE teacher once over sampled views and write the target cache",
                       description="Sample K views (crop, flip, mask) of every image, run the frozen MAE teacher and "
                                   "store LN-ed decoder features (and each view's visible patches) in a sharded zarr v3 "
                                   "cache. Rerunning the same command resumes: complete shards are kept, the rest "
                                   f"redone. Example: {EXTRACT_EXAMPLE}")
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, help="image folder (class sub-folders or flat; jpg/jpeg/png/webp) or "
                      "webdataset tars: paths, brace patterns like 'train-{000000..000099}.tar', URLs, comma-separated")
    data.add_argument("--out", required=True, help="cache directory to create (or resume)")
    data.add_argument("--pixels", default="visible", choices=["visible", "none"], help="visible (default): also store "
                      "each view's visible patches as uint8 (+37,632 B/view at 224 px, mask 0.75), so train needs no "
                      "images and no JPEG decoding; none: a smaller cache, train then needs --data")
    data.add_argument("--on-error", default="skip", choices=["skip", "fail"], help="unreadable images: skip and list "
                      "them in the manifest, or stop with the path")
    data.add_argument("--overwrite", action="store_true", help="replace the cache at --out: only a folder marked as a "
                      "g2sd-cache cache that holds nothing else is deleted; anything else is refused")
    model = p.add_argument_group("teacher and views")
    model.add_argument("--teacher", required=True, help="official MAE checkpoint with its decoder "
                       "(mae_pretrain_vit_*_full.pth, G2SD's teacher, or mae_visualize_vit_*.pth), or 'random' / "
                       "'random:SEED' for a seeded random teacher")
    model.add_argument("--arch", default="mae_vit_base_patch16", choices=list(TEACHER_PRESETS),
                       help="teacher architecture")
    model.add_argument("--target-layer", type=int, default=4, help="teacher decoder block whose LN-ed output is the "
                       "target (G2SD: 4)")
    model.add_argument("--views", type=int, default=1, help="views per image; train uses view (epoch mod views)")
    model.add_argument("--seed", type=int, default=0, help="seed of the view sampler (view = f(seed, image, view "
                       "index)) and of the images' order in the shards")
    model.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches hidden (MAE: 0.75)")
    model.add_argument("--img-size", type=int, default=224, help="crop size in pixels")
    model.add_argument("--teacher-precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                       help="the teacher's arithmetic (auto: fp16 autocast on CUDA, as G2SD's teacher runs; fp32 on "
                       "CPU, where fp16 is unsupported). Recorded in the manifest and shown by inspect; its error "
                       "lands in every stored target")
    store = p.add_argument_group("storage")
    store.add_argument("--codec", default="fp16", choices=list(CODECS), help="how targets are stored: fp16/bf16 "
                       "(2 B/value), int8/fp8 with a per-token scale (1 B/value) or int4 (0.5 B/value, a float16 "
                       "scale per 32 channels, unbiased stochastic rounding); see `g2sd-cache inspect` for each "
                       "codec's error on your teacher")
    store.add_argument("--shard-size", type=int, default=2048, help="views per cache shard for image folders "
                       "(memory: about 2 shards of targets); tar sources keep one shard per tar")
    store.add_argument("--chunk-views", type=int, default=64, help="images per inner zarr chunk (the unit of a "
                       "read and of a checksum)")
    perf = p.add_argument_group("performance")
    perf.add_argument("--batch-size", type=int, default=64, help="views per teacher forward")
    perf.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes "
                      "decoding images")
    perf.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: this rank's GPU if any)")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a cache: manifest, bytes per view, codec errors",
                       description="Print a cache's manifest summary, its bytes per view, and the relative RMS error "
                                   "and cosine of every codec against float32 targets.")
    p.add_argument("cache", help="cache directory or fsspec URL")
    p.add_argument("--sample", type=int, default=64, help="stored views to re-encode with every codec")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def _add_train(sub) -> None:
    from g2sd_cache.models.mae import DEFAULT_STUDENT, STUDENT_PRESETS, TEACHER_PRESETS
    p = sub.add_parser(
        "train", help="train a G2SD student from the cache (or online with the teacher, the baseline)",
        argument_default=argparse.SUPPRESS,
        description="G2SD generic distillation. --cache: cached (no teacher forward, and with a pixel cache no image "
                    "decoding: the product); --teacher: online G2SD as in the paper (the baseline); both: replay the "
                    "cached views through the live teacher and log the target discrepancy (the verification). Run "
                    "under `torchrun --nproc_per_node N` for DDP. Example: g2sd-cache train --cache /cache/in1k-b16 "
                    "--out runs/s16 --config configs/g2sd_vit_small_from_vit_base.yaml")
    data = p.add_argument_group("data")
    data.add_argument("--cache", help="a cache written by `g2sd-cache extract`")
    data.add_argument("--data", help="image folder or tar shards: required online, and for caches extracted with "
                      "--pixels none; optional with a pixel cache (then only checked against the cache's listing)")
    data.add_argument("--out", help="run directory: checkpoint.pt, metrics.jsonl, tb/, config.yaml (required); a new "
                      "or empty folder, or one of train's own runs")
    data.add_argument("--shuffle-window", type=int, help="views shuffled together in the epoch order (default 16384); "
                      "reads stay within about window x bytes/view of the cache at a time")
    data.add_argument("--on-error", choices=["skip", "fail"], help="unreadable cache chunks or images: stop naming "
                      "them (fail, default) or leave them out of the loss and count them (skip)")
    model = p.add_argument_group("model")
    model.add_argument("--student", choices=list(STUDENT_PRESETS), help=f"student preset (default {DEFAULT_STUDENT})")
    model.add_argument("--teacher", help="MAE checkpoint (or random[:SEED]) for online or replay mode")
    model.add_argument("--arch", choices=list(TEACHER_PRESETS), help="teacher architecture for online mode "
                       "(default mae_vit_base_patch16; replay takes the cache's)")
    model.add_argument("--target-layer", type=int, help="online mode: teacher decoder block of the target (default 4)")
    model.add_argument("--mask-ratio", type=float, help="online mode: fraction of patches hidden (default 0.75)")
    model.add_argument("--img-size", type=int, help="online mode: crop size (default 224)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help="epochs to train (default 300, G2SD's); epoch e uses cached view e "
                     "mod K")
    opt.add_argument("--steps", type=int, help="optimizer steps to train instead of --epochs")
    opt.add_argument("--batch-size", type=int, help="micro-batch per rank (default 64)")
    opt.add_argument("--accum-iter", type=int, help="micro-batches per optimizer step (default 1); the global batch "
                     "is batch-size x accum-iter x ranks")
    opt.add_argument("--blr", type=float, help="base lr; lr = blr x global batch / 256 (default 1.5e-4)")
    opt.add_argument("--min-lr", type=float, help="lr at the end of the cosine (default 2.5e-6, G2SD's)")
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay on every parameter with 2 or more "
                     "dimensions, cls and mask tokens included; none on biases and norms (default 0.05, as G2SD)")
    opt.add_argument("--warmup-epochs", type=float, help="linear warm-up length in epochs (default 10); with "
                     "--steps, a warm-up longer than the run is refused")
    opt.add_argument("--warmup-steps", type=int, help="linear warm-up length in optimizer steps (overrides "
                     "--warmup-epochs)")
    opt.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value (default: no clipping, as "
                     "MAE)")
    opt.add_argument("--loss-tokens", choices=["all", "masked", "visible"], help="tokens the smooth-L1 averages over "
                     "(default all, G2SD's; visible includes cls)")
    opt.add_argument("--beta", type=float, help="smooth-L1 beta (default 2.0, G2SD's)")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, help="seed of student init and data order (default 0)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, mid-epoch, "
                     "with the same samples in the same order, on any number of ranks and workers")
    run.add_argument("--stop-after", type=int, help="end after this many steps as if preempted (checkpoint saved; "
                     "the schedule still follows --epochs/--steps)")
    run.add_argument("--log-every", type=int, help="steps between console lines / metrics.jsonl records (default 20)")
    run.add_argument("--save-every", type=int, help="steps between checkpoints (default 1000; also saved at the end)")
    run.add_argument("--log-samples", action="store_true", help="write the (image, view, key) of every sample to "
                     "samples-rankN.jsonl (audits, tests)")
    run.add_argument("--config", help="YAML file of these options (names with underscores); flags override it")
    perf = p.add_argument_group("performance")
    perf.add_argument("--workers", type=int, help="DataLoader processes per rank decoding images (image path only: "
                      "online, replay without pixels, --pixels none caches; default 4). The data order does not "
                      "depend on it")
    perf.add_argument("--prefetch", type=int, help="steps read ahead of the optimizer (and samples per worker on the "
                      "image path; default 2)")
    perf.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    perf.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype (auto: bf16 on "
                      "CUDA, fp32 on CPU). fp16 is G2SD's (with a loss scaler); bf16 needs none")
    perf.add_argument("--teacher-precision", choices=["auto", "fp32", "fp16", "bf16"], help="the online / replay "
                      "teacher's arithmetic, apart from the student's (auto: fp16 autocast on CUDA as G2SD, fp32 on "
                      "CPU)")


def _add_verify(sub) -> None:
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
                   f"{', '.join(f'{k} {v:g}' for k, v in CODEC_TOLERANCE.items())}; combined with "
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


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a trained student: the stage-1 encoder or the stage-2 classifier (timm or "
                                      "MAE checkpoint layout)",
                       description="Stage 1 (a `train` run): the student's encoder. --format timm: a state dict that "
                                   "timm.create_model('vit_small_patch16_224', num_classes=0) (or vit_tiny_patch16_224) "
                                   "loads strictly. --format mae: {'model': state dict}, what MAE's main_finetune.py "
                                   "--finetune and G2SD's specific distillation (main_finetune_dis.py) read. "
                                   "Stage 2 (a `finetune` run: its best.pt, else its checkpoint.pt; or either file): "
                                   "the whole classifier. --format timm: the distilled student as timm's "
                                   "deit_small_distilled_patch16_224 (deit_tiny_/deit_base_ by size; "
                                   "timm.create_model(name, num_classes=C)), strict keys, identical logits: the dist "
                                   "token's position row is zero; a plain fine-tuned student (no teacher) as "
                                   "vit_small_patch16_224 with global_pool='avg'. --format mae: {'model': state dict} "
                                   "in G2SD's / MAE's models_vit layout.")
    p.add_argument("run", help="run directory of `g2sd-cache train` or `g2sd-cache finetune`, or a finetune "
                   "checkpoint file (RUN/best.pt)")
    p.add_argument("--out", required=True, help="file to write (.pth)")
    p.add_argument("--format", default="timm", choices=["timm", "mae"], help="timm: bare state dict, strict into "
                   "timm (default); mae: the same tensors under 'model', as MAE/G2SD scripts expect")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run both stages on generated images (no downloads, a few minutes on CPU)",
                       description="Stage 1: generate JPEGs in class folders, extract a cache with a seeded random "
                                   "ViT-B teacher (2 views per image), train the small student from it, run the same "
                                   "steps online, and print views cached, bytes per view, the loss and cached vs "
                                   "online samples/s. Stage 2: extract a random fine-tuned teacher's predictions on 2 "
                                   "epochs of mixed batches, fine-tune the stage-1 student from them (validating each "
                                   "epoch) and online, export the result to timm and evaluate it.")
    p.add_argument("--out", default="g2sd-demo", help="folder for the demo's images, caches and runs (replaced)")
    p.add_argument("--images", type=int, default=48, help="synthetic training images (default 48)")
    p.add_argument("--steps", type=int, default=24, help="stage-1 training steps in each mode (default 24)")
    p.add_argument("--batch-size", type=int, default=16, help="stage-1 views per step (default 16)")
    p.add_argument("--stage2-epochs", type=int, default=2, help="stage-2 epochs in each mode, and epochs of teacher "
                   "predictions cached (default 2)")
    p.add_argument("--preset", default="small", choices=["small", "micro"], help="small: ViT-B teachers, ViT-S "
                   "students at 224 px (default); micro: tiny models at 64 px, the same steps in seconds")
    p.add_argument("--workers", type=int, default=1, help="DataLoader processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _run_extract(args) -> int:
    from g2sd_cache.generic.extract import ExtractConfig, run_extract
    cfg = _config_from_args(ExtractConfig, args)
    s = run_extract(cfg)
    if "cache_views" in s:
        print(f"extracted {s['views']} views in {s['seconds']:.1f} s ({s['views_per_s']:.1f} views/s), "
              f"{s['skipped_images']} images skipped; cache: {s['cache_views']} views, "
              f"{s['cache_bytes'] / 2**20:.1f} MiB, {s['bytes_per_view']:.0f} B/view; "
              f"peak RSS {s['peak_rss_gb']:.2f} GiB" + (f", GPU {s['peak_gpu_gb']:.2f} GiB" if 'peak_gpu_gb' in s else ""))
    return 0


def _run_inspect(args) -> int:
    import json
    from g2sd_cache.cache.inspect import format_report, inspect_report
    report = inspect_report(args.cache, args.sample)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _run_train(args) -> int:
    from g2sd_cache.common.config import check_keys, read_yaml
    from g2sd_cache.generic.train import TrainConfig, train
    values = {}
    if hasattr(args, "config"):
        values = read_yaml(args.config)
        check_keys(values, TrainConfig, args.config)
    if not getattr(args, "out", None) and not values.get("out"):
        raise UserError("--out is required (on the command line or in --config)")
    summary = train(_config_from_args(TrainConfig, args, values))
    return 0 if summary else 1


def _run_verify(args) -> int:
    import json
    from g2sd_cache.cache.logits import is_logits_cache
    if is_logits_cache(args.cache):    # stage 2's cache of teacher predictions (verify/logits.py)
        from g2sd_cache.verify.logits import format_logits_summary as format_summary, verify_logits
        report = verify_logits(args.cache, deep=args.deep, teacher=args.teacher, data=args.data, device=args.device,
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


def _run_demo(args) -> int:
    from g2sd_cache.cli.demo import DemoConfig, run_demo
    run_demo(DemoConfig(out=args.out, images=args.images, steps=args.steps, batch_size=args.batch_size,
                        workers=args.workers, device=args.device, preset=args.preset,
                        stage2_epochs=args.stage2_epochs))
    return 0


def _run_export(args) -> int:
    from g2sd_cache.cli.export import export_run, export_summary
    r = export_run(args.run, args.out, args.format)
    for note in r.get("notes", ()):
        print(f"note: {note}")
    print(export_summary(r))
    return 0


def _stage2_commands() -> dict:
    from g2sd_cache.cli.stage2 import COMMANDS as stage2
    return stage2


COMMANDS = {"demo": (_add_demo, _run_demo), "extract": (_add_extract, _run_extract), "train": (_add_train, _run_train),
            "export": (_add_export, _run_export), "inspect": (_add_inspect, _run_inspect),
            "verify": (_add_verify, _run_verify)}
COMMANDS.update(_stage2_commands())   # finetune, extract-logits, evaluate (cli/stage2.py)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2sd-cache", description="G2SD distillation from a cache of MAE teacher "
                                     "targets: extract once, train students without the teacher.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except UserError as e:
        print(f"g2sd-cache {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"g2sd-cache {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
