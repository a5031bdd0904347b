"""The `g2sd-cache` command: argument parsing only. Each sub-command builds its frozen config here
and hands it to the module that does the work; nothing below this file sees argparse."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import UserError

EXTRACT_EXAMPLE = "g2sd-cache extract --data /data/imagenet/train --teacher mae_visualize_vit_base.pth " \
                  "--arch mae_vit_base_patch16 --out /cache/in1k-b16 --views 4"


def _add_extract(sub) -> None:
    from .codecs import CODECS
    from .models import TEACHER_PRESETS
    p = sub.add_parser("extract", help="run the MAE teacher once over sampled views and write the target cache",
                       description="Sample K views (crop, flip, mask) of every image, run the frozen MAE teacher and "
                                   "store LN-ed decoder features in a sharded zarr v3 cache. Rerunning the same "
                                   "command resumes: complete shards are kept, the rest redone. "
                                   f"Example: {EXTRACT_EXAMPLE}")
    p.add_argument("--data", required=True, help="image folder (class sub-folders or flat; jpg/jpeg/png/webp) or "
                   "webdataset tars: paths, brace patterns like 'train-{000000..000099}.tar', URLs, comma-separated")
    p.add_argument("--teacher", required=True, help="official MAE checkpoint with decoder (mae_visualize_vit_*.pth "
                   "or mae_pretrain_vit_*_full.pth), or 'random' / 'random:SEED' for a seeded random teacher")
    p.add_argument("--arch", default="mae_vit_base_patch16", choices=list(TEACHER_PRESETS), help="teacher architecture")
    p.add_argument("--out", required=True, help="cache directory to create (or resume)")
    p.add_argument("--views", type=int, default=1, help="views per image; train uses view (epoch mod views)")
    p.add_argument("--seed", type=int, default=0, help="seed of the view sampler: view = f(seed, image, view index)")
    p.add_argument("--target-layer", type=int, default=4, help="teacher decoder block whose LN-ed output is the target (G2SD: 4)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches hidden (MAE: 0.75)")
    p.add_argument("--img-size", type=int, default=224, help="crop size in pixels")
    p.add_argument("--codec", default="fp16", choices=list(CODECS), help="how targets are stored: fp16/bf16 "
                   "(2 B/value) or int8/fp8 with a per-token scale (1 B/value); see `g2sd-cache inspect` for errors")
    p.add_argument("--shard-size", type=int, default=2048, help="views per cache shard for image folders "
                   "(memory: about 2 shards of targets); tar sources keep one shard per tar")
    p.add_argument("--chunk-views", type=int, default=64, help="images per inner zarr chunk (the unit of a read)")
    p.add_argument("--batch-size", type=int, default=64, help="views per teacher forward")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes decoding images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: this rank's GPU if any)")
    p.add_argument("--on-error", default="skip", choices=["skip", "fail"], help="unreadable images: skip and list "
                   "them in the manifest, or stop with the path")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    p.add_argument("--pixels", default="visible", choices=["visible", "none"], help="visible (default): also store "
                   "each view's visible patches as uint8 (+37,632 B/view at 224 px, mask 0.75), so train needs no "
                   "images and no JPEG decoding; none: a smaller cache, train then needs --data")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a cache: manifest, bytes per view, codec errors",
                       description="Print a cache's manifest summary, its bytes per view, and the relative RMS error "
                                   "and cosine of every codec against float32 targets.")
    p.add_argument("cache", help="cache directory or fsspec URL")
    p.add_argument("--sample", type=int, default=64, help="stored views to re-encode with every codec")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def _add_train(sub) -> None:
    from .models import DEFAULT_STUDENT, STUDENT_PRESETS, TEACHER_PRESETS
    p = sub.add_parser(
        "train", help="train a G2SD student from the cache (or online with the teacher, the baseline)",
        argument_default=argparse.SUPPRESS,
        description="G2SD generic distillation. --cache: cached (no teacher forward, the product); --teacher: online "
                    "G2SD as in the paper (the baseline); both: replay the cached views through the live teacher and "
                    "log the target discrepancy (the verification). Run under `torchrun --nproc_per_node N` for DDP. "
                    "Example: g2sd-cache train --data /data/imagenet/train --cache /cache/in1k-b16 --out runs/s16 "
                    "--epochs 300 --batch-size 256")
    p.add_argument("--data", help="image folder or tar shards: required online, and for caches extracted with "
                   "--pixels none; optional with a pixel cache (then only checked against the cache's listing)")
    p.add_argument("--out", help="run directory: checkpoint.pt, metrics.jsonl, tb/, config.yaml (required)")
    p.add_argument("--cache", help="a cache written by `g2sd-cache extract`")
    p.add_argument("--teacher", help="MAE checkpoint (or random[:SEED]) for online or replay mode")
    p.add_argument("--arch", choices=list(TEACHER_PRESETS), help="teacher architecture for online mode "
                   "(default mae_vit_base_patch16; replay takes the cache's)")
    p.add_argument("--student", choices=list(STUDENT_PRESETS), help=f"student preset (default {DEFAULT_STUDENT})")
    p.add_argument("--epochs", type=int, help="epochs to train (default 300, G2SD's); epoch e uses cached view e mod K")
    p.add_argument("--steps", type=int, help="optimizer steps to train instead of --epochs")
    p.add_argument("--batch-size", type=int, help="micro-batch per rank (default 64)")
    p.add_argument("--accum-iter", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--blr", type=float, help="base lr; lr = blr x effective batch / 256 (default 1.5e-4)")
    p.add_argument("--min-lr", type=float, help="lr at the end of the cosine (default 2.5e-6, G2SD's)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on every parameter with 2 or more "
                   "dimensions, cls and mask tokens included; none on biases and norms (default 0.05, as G2SD)")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up length in epochs (default 10); with --steps, "
                   "a warm-up longer than the run is refused")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up length in optimizer steps (overrides "
                   "--warmup-epochs)")
    p.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value (default: no clipping, as MAE)")
    p.add_argument("--loss-tokens", choices=["all", "masked", "visible"], help="tokens the smooth-L1 averages over "
                   "(default all, G2SD's; visible includes cls)")
    p.add_argument("--beta", type=float, help="smooth-L1 beta (default 2.0, G2SD's)")
    p.add_argument("--target-layer", type=int, help="online mode: teacher decoder block of the target (default 4)")
    p.add_argument("--mask-ratio", type=float, help="online mode: fraction of patches hidden (default 0.75)")
    p.add_argument("--img-size", type=int, help="online mode: crop size (default 224)")
    p.add_argument("--workers", type=int, help="DataLoader processes per rank decoding images (image path only: "
                   "online, replay without pixels, --pixels none caches; default 4). The data order does not "
                   "depend on it")
    p.add_argument("--prefetch", type=int, help="samples per worker and batches in flight ahead of the step (default 2)")
    p.add_argument("--shuffle-window", type=int, help="views shuffled together in the epoch order (default 16384); "
                   "reads stay within about window x bytes/view of the cache at a time")
    p.add_argument("--seed", type=int, help="seed of student init and data order (default 0)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype (auto: bf16 on "
                   "CUDA, fp32 on CPU)")
    p.add_argument("--log-every", type=int, help="steps between console lines / metrics.jsonl records (default 20)")
    p.add_argument("--save-every", type=int, help="steps between checkpoints (default 1000; also saved at the end)")
    p.add_argument("--stop-after", type=int, help="end after this many steps as if preempted (checkpoint saved; "
                   "the schedule still follows --epochs/--steps)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, mid-epoch, "
                   "with the same samples in the same order, on any number of ranks and workers")
    p.add_argument("--on-error", choices=["skip", "fail"], help="unreadable cache chunks or images: stop naming "
                   "them (fail, default) or leave them out of the loss and count them (skip)")
    p.add_argument("--log-samples", action="store_true", help="write the (image, view) of every sample to "
                   "samples-rankN.jsonl (audits, tests)")
    p.add_argument("--config", help="YAML file of these options (names with underscores); flags override it")


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
    from .extract import ExtractConfig, run_extract
    cfg = ExtractConfig(data=args.data, out=args.out, teacher=args.teacher, arch=args.arch, views=args.views,
                        seed=args.seed, target_layer=args.target_layer, mask_ratio=args.mask_ratio,
                        img_size=args.img_size, codec=args.codec, shard_size=args.shard_size,
                        chunk_views=args.chunk_views, batch_size=args.batch_size, workers=args.workers,
                        device=args.device, on_error=args.on_error, overwrite=args.overwrite, pixels=args.pixels)
    s = run_extract(cfg)
    if "cache_views" in s:
        print(f"extracted {s['views']} views in {s['seconds']:.1f} s ({s['views_per_s']:.1f} views/s), "
              f"{s['skipped_images']} images skipped; cache: {s['cache_views']} views, "
              f"{s['cache_bytes'] / 2**20:.1f} MiB, {s['bytes_per_view']:.0f} B/view; "
              f"peak RSS {s['peak_rss_gb']:.2f} GiB" + (f", GPU {s['peak_gpu_gb']:.2f} GiB" if 'peak_gpu_gb' in s else ""))
    return 0


def _run_inspect(args) -> int:
    import json
    from .inspect_cache import format_report, inspect_report
    report = inspect_report(args.cache, args.sample)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _run_train(args) -> int:
    from .config import check_keys, read_yaml
    from .train import TrainConfig, train
    given = vars(args).copy()
    given.pop("command")
    values = {}
    if "config" in given:
        path = given.pop("config")
        values = read_yaml(path)
        check_keys(values, TrainConfig, path)
    values.update(given)
    if not values.get("out"):
        raise UserError("--out is required (on the command line or in --config)")
    summary = train(TrainConfig(**values))
    return 0 if summary else 1


def _run_demo(args) -> int:
    from .demo import DemoConfig, run_demo
    run_demo(DemoConfig(out=args.out, images=args.images, steps=args.steps, batch_size=args.batch_size,
                        workers=args.workers, device=args.device, preset=args.preset,
                        stage2_epochs=args.stage2_epochs))
    return 0


def _run_export(args) -> int:
    from .export import export_run
    r = export_run(args.run, args.out, args.format)
    if r["kind"] == "classifier":
        from .cli_finetune import print_export
        print_export(r)
        return 0
    for note in r["notes"]:
        print(f"note: {note}")
    how = (f"load with timm.create_model('{r['timm_model']}', num_classes=0).load_state_dict(torch.load(path))"
           if r["format"] == "timm" else "fine-tune with MAE's main_finetune.py --finetune path (reads ['model'])")
    print(f"wrote {r['path']}: {r['tensors']} tensors, {r['params'] / 1e6:.1f} M parameters from step {r['step']}; "
          f"{how}")
    return 0


def _stage2_commands() -> dict:
    from .cli_finetune import COMMANDS as stage2
    return stage2


def _run_verify(args) -> int:
    from .cli_finetune import run_verify   # a logits cache goes to verify_logits, a target cache to verify
    return run_verify(args)


COMMANDS = {"demo": (_add_demo, _run_demo), "extract": (_add_extract, _run_extract), "train": (_add_train, _run_train),
            "export": (_add_export, _run_export), "inspect": (_add_inspect, _run_inspect),
            "verify": (lambda sub: _verify().add_parser(sub), lambda args: _run_verify(args))}
COMMANDS.update(_stage2_commands())   # finetune, extract-logits, evaluate (cli_finetune.py)


def _verify():
    from . import verify
    return verify


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
