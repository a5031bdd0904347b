"""The stage-2 sub-commands of `g2sd-cache`: finetune, extract-logits, evaluate (argument parsing only).

Flags come in groups, as timm's generic/train.py: data (the plan), model, optimisation, run, performance. Both
`finetune` and `extract-logits` take the data plan's flags from one function, so a logits cache and the run
that reads it are described the same way. Options default to argparse.SUPPRESS, so a --config file
(`configs/finetune_vit_*.yaml`) fills what the command line does not give.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

FINETUNE_EXAMPLE = ("torchrun --nproc_per_node 8 --no-python g2sd-cache finetune --config configs/finetune_vit_small.yaml "
                    "--data /data/imagenet/train --val /data/imagenet/val --init runs/g2sd-vit-s --logits /cache/in1k-logits "
                    "--out runs/sd-vit-s")


def _default(cls, name: str):
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


def _add_plan_flags(group, cls, seeds_student: bool) -> None:
    """The data plan's flags (sd_config.PlanOptions): they decide every mixed batch."""
    d = lambda name: _default(cls, name)  # noqa: E731
    student = "; also of the student's fresh heads" if seeds_student else ""
    group.add_argument("--data", help="training images: a folder with one sub-folder per class (ImageNet's train/ "
                       "layout); labels are the sorted class folder names (required)")
    group.add_argument("--seed", type=int, help=f"seed of the data plan: every crop, RandAugment op, erasing box, "
                       f"mixup/cutmix draw and the epoch order are a function of (seed, epoch, image or group)"
                       f"{student} (default {d('seed')})")
    group.add_argument("--img-size", type=int, help=f"training and evaluation resolution in pixels (default {d('img_size')})")
    group.add_argument("--group-size", type=int, help=f"mixing group: the samples mixed together (partner of sample i is "
                       f"G-1-i, one lambda per group); G2SD's per-GPU batch, fixed whatever the number of GPUs "
                       f"(default {d('group_size')})")
    group.add_argument("--auto-augment", help=f"timm RandAugment policy (default {d('auto_augment')})")
    group.add_argument("--reprob", type=float, help=f"random erasing probability (default {d('reprob')})")
    group.add_argument("--remode", choices=["pixel", "rand", "const"], help=f"random erasing fill: per-pixel normal "
                       f"noise, per-channel noise or zeros (default {d('remode')})")
    group.add_argument("--recount", type=int, help=f"random erasing boxes per image (default {d('recount')})")
    group.add_argument("--mixup", type=float, help=f"mixup Beta alpha, 0 = off (default {d('mixup')})")
    group.add_argument("--cutmix", type=float, help=f"cutmix Beta alpha, 0 = off (default {d('cutmix')})")
    group.add_argument("--mixup-prob", type=float, help=f"probability that a group is mixed at all (default {d('mixup_prob')})")
    group.add_argument("--mixup-switch-prob", type=float, help=f"probability of cutmix rather than mixup when both "
                       f"are on (default {d('mixup_switch_prob')})")
    group.add_argument("--smoothing", type=float, help=f"label smoothing of the mixed targets (default {d('smoothing')})")


def _add_finetune(sub) -> None:
    from g2sd_cache.models.classifier import CLASSIFIER_PRESETS
    from g2sd_cache.specific.config import FinetuneConfig
    d = lambda name: _default(FinetuneConfig, name)  # noqa: E731
    p = sub.add_parser(
        "finetune", help="stage 2: fine-tune the stage-1 student on labelled images with G2SD's specific distillation",
        argument_default=argparse.SUPPRESS,
        description="G2SD specific distillation (stage 2) with its official recipe as defaults (SD.sh: ViT-S, AdamW "
                    "blr 1e-3 x batch/256, layer decay 0.75, 200 epochs, RandAugment, mixup 0.8 / cutmix 1.0, random "
                    "erasing 0.25, hard distillation on the teacher's argmax). Modes: --logits (the teacher's stored "
                    "predictions: no teacher forward, even if a teacher is named), --teacher alone (the teacher in the loop, "
                    "as the paper), --logits --replay --teacher (replay: logs the agreement of stored and live teacher "
                    "argmax), neither (plain fine-tuning, MAE's "
                    "global-pool classifier, no dist token). Run under `torchrun --nproc_per_node N` for DDP. "
                    f"Example: {FINETUNE_EXAMPLE}")
    data = p.add_argument_group("data")
    _add_plan_flags(data, FinetuneConfig, seeds_student=True)
    data.add_argument("--val", help="validation images: class folders named as the training ones, or webdataset "
                      "tars whose samples carry a .cls class index; top-1/top-5 after every --eval-every epochs "
                      "(default: no validation)")
    data.add_argument("--logits", help="a logits cache from `g2sd-cache extract-logits` of this plan: epoch e trains "
                      "on the plan's epoch e mod K with the stored teacher argmax; a cache of another plan is refused")
    data.add_argument("--replay", action="store_true", help="with --logits and --teacher: also run the teacher every "
                      "step and log how often its argmax agrees with the stored one (costs a teacher forward); "
                      "without it, --logits never runs a teacher")
    model = p.add_argument_group("model")
    model.add_argument("--init", help="the stage-1 student: a `g2sd-cache train` run folder or its `g2sd-cache export` "
                       "file (an MAE encoder checkpoint also works); required unless --resume")
    model.add_argument("--arch", choices=list(CLASSIFIER_PRESETS), help=f"student classifier (default {d('arch')})")
    model.add_argument("--drop-path", type=float, help=f"stochastic depth rate of the student (default {d('drop_path')}, SD.sh)")
    model.add_argument("--teacher", help="the fine-tuned teacher classifier (MAE's mae_finetuned_vit_base.pth layout, "
                       "a timm ViT, or random[:SEED] for trials); run in fp32 on the same mixed input")
    model.add_argument("--teacher-arch", choices=list(CLASSIFIER_PRESETS), help=f"teacher architecture (default "
                       f"{d('teacher_arch')})")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help=f"epochs to train (default {d('epochs')})")
    opt.add_argument("--batch-size", type=int, help="samples per forward pass; must divide --group-size, a group is "
                     "then split into micro-batches (default: the whole group)")
    opt.add_argument("--accum-iter", type=int, help=f"groups per rank per optimizer step; effective batch = group "
                     f"size x accum-iter x ranks (default {d('accum_iter')})")
    opt.add_argument("--blr", type=float, help=f"base lr; lr = blr x effective batch / 256 (default {d('blr')})")
    opt.add_argument("--layer-decay", type=float, help=f"layer-wise lr decay: block i gets lr x decay^(depth + 1 - "
                     f"layer) (default {d('layer_decay')})")
    opt.add_argument("--weight-decay", type=float, help=f"AdamW weight decay, none on biases, norms, tokens and "
                     f"positions (default {d('weight_decay')})")
    opt.add_argument("--min-lr", type=float, help=f"lr at the end of the cosine (default {d('min_lr')})")
    opt.add_argument("--warmup-epochs", type=float, help=f"linear warm-up in epochs (default {d('warmup_epochs')})")
    opt.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value (default: no clipping)")
    run = p.add_argument_group("run")
    run.add_argument("--out", help="run folder: checkpoint.pt, best.pt, metrics.jsonl, tb/, config.yaml (required)")
    run.add_argument("--config", help="YAML file of these options (names with underscores; "
                     "configs/finetune_vit_small.yaml is G2SD's recipe with sources); flags override it")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, mid-epoch, "
                     "at the same group, on any number of ranks")
    run.add_argument("--eval-every", type=int, help=f"epochs between validations (and the last epoch); 0 = never "
                     f"(default {d('eval_every')})")
    run.add_argument("--log-every", type=int, help=f"steps between console lines / metrics.jsonl records (default "
                     f"{d('log_every')}; also at every epoch's end)")
    run.add_argument("--save-every", type=int, help=f"steps between checkpoints (default {d('save_every')}; also at "
                     f"every epoch's end)")
    run.add_argument("--stop-after", type=int, help="end after this many steps as if preempted (checkpoint saved)")
    perf = p.add_argument_group("performance")
    perf.add_argument("--workers", type=int, help=f"DataLoader processes per rank decoding and augmenting images "
                      f"(default {d('workers')}); the data does not depend on it")
    perf.add_argument("--prefetch", type=int, help=f"groups each worker prepares ahead (default {d('prefetch')})")
    perf.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto: this rank's GPU if any)")
    perf.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="student autocast dtype (auto: "
                      "bf16 on CUDA, fp32 on CPU; G2SD used fp16 with a loss scaler)")
    perf.add_argument("--teacher-precision", choices=["auto", "fp32", "fp16", "bf16"], help="the online / replay "
                      f"teacher's arithmetic (default {d('teacher_precision')}: G2SD's stage-2 teacher runs outside "
                      "autocast; auto: the same)")
    perf.add_argument("--eval-batch-size", type=int, help=f"validation batch (default {d('eval_batch_size')})")


def _add_extract_logits(sub) -> None:
    from g2sd_cache.models.classifier import CLASSIFIER_PRESETS
    from g2sd_cache.specific.config import LogitsConfig
    d = lambda name: _default(LogitsConfig, name)  # noqa: E731
    p = sub.add_parser(
        "extract-logits", help="stage 2: run the fine-tuned teacher once over K epochs of mixed batches and cache "
                               "its predictions", argument_default=argparse.SUPPRESS,
        description="Run the fine-tuned teacher (fp32) over the exact mixed batches of epochs 0..K-1 of the stage-2 "
                    "data plan and store its top-k logits (fp16), their classes and the argmax in a zarr cache "
                    "(22 bytes per sample per epoch at k = 5). `finetune --logits CACHE` with the same plan flags "
                    "then trains epoch e on cached epoch e mod K without a teacher. A separate command, not a mode "
                    "of `extract`: its input is a labelled plan and a classifier, its output predictions, and none "
                    "of extract's view, mask or codec flags apply. Rerunning the same command resumes. Example: "
                    "g2sd-cache extract-logits --config configs/finetune_vit_small.yaml --data /data/imagenet/train "
                    "--teacher mae_finetuned_vit_base.pth --out /cache/in1k-logits --cached-epochs 8")
    data = p.add_argument_group("data (must equal the finetune run's)")
    _add_plan_flags(data, LogitsConfig, seeds_student=False)
    model = p.add_argument_group("model")
    model.add_argument("--teacher", help="the fine-tuned teacher classifier (MAE's mae_finetuned_vit_base.pth layout, "
                       "a timm ViT, or random[:SEED] for trials) (required)")
    model.add_argument("--teacher-arch", choices=list(CLASSIFIER_PRESETS), help=f"teacher architecture (default "
                       f"{d('teacher_arch')})")
    cache = p.add_argument_group("cache")
    cache.add_argument("--out", help="logits cache folder to create (or resume) (required)")
    cache.add_argument("--cached-epochs", type=int, help=f"K: epochs of the plan to cache; finetune epoch e reads "
                       f"epoch e mod K, so augmentations repeat every K epochs (default {d('cached_epochs')}; the "
                       f"teacher costs K epochs of forward passes, once)")
    cache.add_argument("--topk", type=int, help=f"logits kept per sample (default {d('topk')}); the argmax is "
                       f"stored besides")
    cache.add_argument("--shard-groups", type=int, help=f"groups per shard, each with all K epochs (default "
                       f"{d('shard_groups')})")
    cache.add_argument("--overwrite", action="store_true", help="replace an existing logits cache at --out")
    cache.add_argument("--teacher-precision", choices=["auto", "fp32", "fp16", "bf16"], help="the teacher's "
                       f"arithmetic (default {d('teacher_precision')}, G2SD's stage-2 teacher; fp16 / bf16 autocast "
                       "need CUDA for fp16); recorded in the manifest")
    cache.add_argument("--config", help="YAML file of these options, e.g. the finetune config (its training options "
                       "are ignored); flags override it")
    perf = p.add_argument_group("performance")
    perf.add_argument("--workers", type=int, help=f"DataLoader processes decoding, augmenting and mixing "
                      f"(default {d('workers')})")
    perf.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto); torchrun splits shards over ranks")


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="top-1 / top-5 of a classifier on labelled images",
        description="Accuracy with G2SD's evaluation transform (resize to S/0.875, centre crop S, bicubic). MODEL is "
                    "a `finetune` run folder (its best.pt, else its checkpoint.pt), either file, an export of one, or "
                    "any ViT classifier `load_classifier` reads (MAE fine-tuned, timm). The distilled student "
                    "averages its two heads. Example: g2sd-cache evaluate runs/sd-vit-s --val /data/imagenet/val")
    p.add_argument("model", help="run folder or weight file")
    p.add_argument("--val", required=True, help="class folders (indices from the training class names the run "
                   "recorded, else from --classes-from, else the folder's own sorted names) or .cls-labelled tars")
    p.add_argument("--classes-from", default=None, help="the training image folder, whose sorted class folders give "
                   "the class indices (for weight files that do not record them)")
    p.add_argument("--last", action="store_true", help="with a run folder: evaluate checkpoint.pt, not best.pt")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU), as G2SD evaluates")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _config_values(args) -> tuple[dict, str | None]:
    from g2sd_cache.specific.config import load_config_values
    given = vars(args).copy()
    given.pop("command")
    path = given.pop("config", None)
    return load_config_values(path, given), path


def _run_finetune(args) -> int:
    from g2sd_cache.specific.finetune import finetune
    from g2sd_cache.specific.config import FinetuneConfig, from_values
    values, path = _config_values(args)
    distilled = bool(values.get("teacher") or values.get("logits"))
    summary = finetune(FinetuneConfig(**from_values(FinetuneConfig, values, path, distilled)))
    return 0 if summary else 1


def _run_extract_logits(args) -> int:
    from g2sd_cache.specific.extract_logits import run_extract_logits
    from g2sd_cache.specific.config import LogitsConfig, from_values
    values, path = _config_values(args)
    s = run_extract_logits(LogitsConfig(**from_values(LogitsConfig, values, path)))
    if "cache_samples" in s:
        print(f"extracted {s['samples']} samples in {s['seconds']:.1f} s ({s['samples_per_s']:.1f} samples/s; teacher "
              f"alone {s['teacher_samples_per_s']:.1f}/s); cache: {s['epochs']} epoch(s) x {s['groups_per_epoch']} "
              f"groups, {s['cache_bytes'] / 2**20:.2f} MiB, {s['bytes_per_sample']:.1f} B/sample")
    return 0


def _run_evaluate(args) -> int:
    import json

    from g2sd_cache.models.classifier import load_classifier
    from g2sd_cache.common.dist import resolve_device
    from g2sd_cache.specific.evaluate import evaluate
    from g2sd_cache.specific.finetuned import read_finetuned
    from g2sd_cache.data.labelled import LabelledFolder
    ft = read_finetuned(args.model, "evaluate", prefer_best=not args.last)
    if ft is not None:
        model, classes, source = ft.model, ft.classes, ft.describe()
    else:
        model, info = load_classifier(args.model, "evaluate")
        classes, source = None, info.source
    if args.classes_from:
        classes = LabelledFolder.scan(args.classes_from).classes
    device = resolve_device(args.device)
    r = evaluate(model.to(device), args.val, classes=classes, batch_size=args.batch_size, workers=args.workers,
                 device=str(device), amp=args.amp)
    if args.json:
        print(json.dumps(r | {"model": source}))
    else:
        print(f"{source} on {args.val}: top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%, loss {r['loss']:.4f} "
              f"({r['n']} images)")
    return 0


COMMANDS = {"finetune": (_add_finetune, _run_finetune), "extract-logits": (_add_extract_logits, _run_extract_logits),
            "evaluate": (_add_evaluate, _run_evaluate)}
