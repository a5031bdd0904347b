"""`g2sd-cache finetune` and `g2sd-cache extract-logits`: their flags (defaults from FinetuneConfig and
LogitsConfig) and the lines they print.

Flags come in groups, as timm's train.py: data (the plan), model, optimisation, run, performance. Both commands
take the data plan's flags from one function, so a logits cache and the run that reads it are described the
same way. A --config file (`configs/finetune_vit_*.yaml`, G2SD's recipe) is screened by
`specific.config.file_values` and fills what the command line does not give.
"""
from __future__ import annotations

from g2sd_cache.cli.command import Command
from g2sd_cache.common.config import config_from_args, set_dataclass_defaults
from g2sd_cache.specific.config import FinetuneConfig, LogitsConfig, MODE_CLAIMS, check_mode, file_values

FINETUNE_EXAMPLE = ("torchrun --nproc_per_node 8 --no-python g2sd-cache finetune --config configs/finetune_vit_small.yaml "
                    "--data /data/imagenet/train --val /data/imagenet/val --init runs/g2sd-vit-s --logits /cache/in1k-logits "
                    "--out runs/sd-vit-s")


def _add_plan_flags(group, seeds_student: bool) -> None:
    """The data plan's flags (specific/config.py PlanOptions): they decide every mixed batch."""
    student = "; also of the student's fresh heads" if seeds_student else ""
    group.add_argument("--data", help="training images: a folder with one sub-folder per class (ImageNet's train/ "
                       "layout); labels are the sorted class folder names (required)")
    group.add_argument("--seed", type=int, help="seed of the data plan: every crop, RandAugment op, erasing box, "
                       "mixup/cutmix draw and the epoch order are a function of (seed, epoch, image or group)"
                       f"{student} (default %(default)s)")
    group.add_argument("--img-size", type=int, help="training and evaluation resolution in pixels (default %(default)s)")
    group.add_argument("--group-size", type=int, help="mixing group: the samples mixed together (partner of sample i is "
                       "G-1-i, one lambda per group); G2SD's per-GPU batch, fixed whatever the number of GPUs "
                       "(default %(default)s)")
    group.add_argument("--auto-augment", help="timm RandAugment policy (default %(default)s)")
    group.add_argument("--reprob", type=float, help="random erasing probability (default %(default)s)")
    group.add_argument("--remode", choices=["pixel", "rand", "const"], help="random erasing fill: per-pixel normal "
                       "noise, per-channel noise or zeros (default %(default)s)")
    group.add_argument("--recount", type=int, help="random erasing boxes per image (default %(default)s)")
    group.add_argument("--mixup", type=float, help="mixup Beta alpha, 0 = off (default %(default)s)")
    group.add_argument("--cutmix", type=float, help="cutmix Beta alpha, 0 = off (default %(default)s)")
    group.add_argument("--mixup-prob", type=float, help="probability that a group is mixed at all (default %(default)s)")
    group.add_argument("--mixup-switch-prob", type=float, help="probability of cutmix rather than mixup when both "
                       "are on (default %(default)s)")
    group.add_argument("--smoothing", type=float, help="label smoothing of the mixed targets (default %(default)s)")
    group.add_argument("--on-error", choices=["skip", "fail"], help="unreadable images (truncated, not an image): use "
                       "the next readable image of the same mixing group in its place and list it (skip), or stop "
                       "naming it (fail) (default %(default)s)")


def add_finetune(sub):
    from g2sd_cache.models.classifier import CLASSIFIER_PRESETS
    p = sub.add_parser(
        "finetune", help="stage 2: fine-tune the stage-1 student on labelled images with G2SD's specific distillation",
        description="G2SD specific distillation (stage 2) with its official recipe as defaults (SD.sh: ViT-S, AdamW "
                    "blr 1e-3 x batch/256, layer decay 0.75, 200 epochs, RandAugment, mixup 0.8 / cutmix 1.0, random "
                    "erasing 0.25, hard distillation on the teacher's argmax). Modes: --logits (the teacher's stored "
                    "predictions: no teacher forward, even if a teacher is named), --teacher alone (the teacher in the loop, "
                    "as the paper), --logits --replay --teacher (replay: logs the agreement of stored and live teacher "
                    "argmax), neither (plain fine-tuning, MAE's "
                    "global-pool classifier, no dist token). Run under `torchrun --nproc_per_node N` for DDP. "
                    f"Example: {FINETUNE_EXAMPLE}")
    data = p.add_argument_group("data")
    _add_plan_flags(data, seeds_student=True)
    data.add_argument("--val", help="validation images: class folders named as the training ones, or webdataset "
                      "tars whose samples carry a .cls class index; top-1/top-5 after every --eval-every epochs "
                      "(default: no validation)")
    data.add_argument("--logits", help="a logits cache from `g2sd-cache extract-logits` of this plan: epoch e trains "
                      "on the plan's epoch e mod K with the stored teacher argmax; a cache of another plan is refused; "
                      "a URL (s3://, gs://) is copied whole to --local-cache first (it is small), each file checked")
    data.add_argument("--local-cache", help="--logits is a URL: node-local folder the logits cache is copied to, "
                      "shared by the node's ranks and reused by later runs (default: a per-user folder in the system's "
                      "temp directory)")
    data.add_argument("--replay", action="store_true", help="with --logits and --teacher: also run the teacher every "
                      "step and log how often its argmax agrees with the stored one (costs a teacher forward); "
                      "without it, --logits never runs a teacher")
    model = p.add_argument_group("model")
    model.add_argument("--init", help="the stage-1 student: a `g2sd-cache train` run folder or its `g2sd-cache export` "
                       "file (an MAE encoder checkpoint also works); required unless --resume")
    model.add_argument("--arch", choices=list(CLASSIFIER_PRESETS), help="student classifier (default %(default)s)")
    model.add_argument("--drop-path", type=float, help="stochastic depth rate of the student (default %(default)s, SD.sh)")
    model.add_argument("--teacher", help="the fine-tuned teacher classifier (MAE's mae_finetuned_vit_base.pth layout, "
                       "a timm ViT, or random[:SEED] for trials); run in fp32 on the same mixed input")
    model.add_argument("--teacher-arch", choices=list(CLASSIFIER_PRESETS), help="teacher architecture (default "
                       "%(default)s)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help="epochs to train (default %(default)s)")
    opt.add_argument("--batch-size", type=int, help="samples per forward pass; must divide --group-size, a group is "
                     "then split into micro-batches (default: the whole group)")
    opt.add_argument("--accum-iter", type=int, help="groups per rank per optimizer step; effective batch = group "
                     "size x accum-iter x ranks (default %(default)s)")
    opt.add_argument("--blr", type=float, help="base lr; lr = blr x effective batch / 256 (default %(default)s)")
    opt.add_argument("--layer-decay", type=float, help="layer-wise lr decay: block i gets lr x decay^(depth + 1 - "
                     "layer) (default %(default)s)")
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay, none on biases, norms, tokens and "
                     "positions (default %(default)s)")
    opt.add_argument("--min-lr", type=float, help="lr at the end of the cosine (default %(default)s)")
    opt.add_argument("--warmup-epochs", type=float, help="linear warm-up in epochs (default %(default)s)")
    opt.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value (default: no clipping)")
    run = p.add_argument_group("run")
    run.add_argument("--out", help="run folder: checkpoint.pt, best.pt, metrics.jsonl, tb/, config.yaml (required)")
    run.add_argument("--config", help="YAML file of these options (names with underscores; "
                     "configs/finetune_vit_small.yaml is G2SD's recipe with sources); flags override it")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, mid-epoch, "
                     "at the same group, on any number of ranks")
    run.add_argument("--eval-every", type=int, help="epochs between validations (and the last epoch); 0 = never "
                     "(default %(default)s)")
    run.add_argument("--log-every", type=int, help="steps between console lines / metrics.jsonl records (default "
                     "%(default)s; also at every epoch's end)")
    run.add_argument("--save-every", type=int, help="steps between checkpoints (default %(default)s; also at "
                     "every epoch's end)")
    run.add_argument("--stop-after", type=int, help="end after this many steps as if preempted (checkpoint saved)")
    perf = p.add_argument_group("performance")
    perf.add_argument("--workers", type=int, help="DataLoader processes per rank decoding and augmenting images "
                      "(default %(default)s); the data does not depend on it")
    perf.add_argument("--prefetch", type=int, help="groups each worker prepares ahead (default %(default)s)")
    perf.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto: this rank's GPU if any)")
    perf.add_argument("--dist-timeout", type=float, help="minutes a collective (barrier, all-reduce) waits for the "
                      "other ranks before it fails instead of hanging (default %(default)s)")
    perf.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="student autocast dtype (auto: "
                      "bf16 on CUDA, fp32 on CPU; G2SD used fp16 with a loss scaler)")
    perf.add_argument("--teacher-precision", choices=["auto", "fp32", "fp16", "bf16"], help="the online / replay "
                      "teacher's arithmetic (default %(default)s: G2SD's stage-2 teacher runs outside autocast)")
    perf.add_argument("--eval-batch-size", type=int, help="validation batch (default %(default)s)")
    set_dataclass_defaults(p, FinetuneConfig)
    return p


def add_extract_logits(sub):
    from g2sd_cache.models.classifier import CLASSIFIER_PRESETS
    p = sub.add_parser(
        "extract-logits", help="stage 2: run the fine-tuned teacher once over K epochs of mixed batches and cache "
                               "its predictions", description="Run the fine-tuned teacher (fp32) over the exact mixed batches of epochs 0..K-1 of the stage-2 "
                    "data plan and store its top-k logits (fp16), their classes and the argmax in a zarr cache "
                    "(22 bytes per sample per epoch at k = 5). `finetune --logits CACHE` with the same plan flags "
                    "then trains epoch e on cached epoch e mod K without a teacher. A separate command, not a mode "
                    "of `extract`: its input is a labelled plan and a classifier, its output predictions, and none "
                    "of extract's view, mask or codec flags apply. Rerunning the same command resumes. Example: "
                    "g2sd-cache extract-logits --config configs/finetune_vit_small.yaml --data /data/imagenet/train "
                    "--teacher mae_finetuned_vit_base.pth --out /cache/in1k-logits --cached-epochs 8")
    data = p.add_argument_group("data (must equal the finetune run's)")
    _add_plan_flags(data, seeds_student=False)
    model = p.add_argument_group("model")
    model.add_argument("--teacher", help="the fine-tuned teacher classifier (MAE's mae_finetuned_vit_base.pth layout, "
                       "a timm ViT, or random[:SEED] for trials) (required)")
    model.add_argument("--teacher-arch", choices=list(CLASSIFIER_PRESETS), help="teacher architecture (default "
                       "%(default)s)")
    cache = p.add_argument_group("cache")
    cache.add_argument("--out", help="logits cache folder or fsspec URL (s3://bucket/prefix, gs://...) to create (or "
                       "resume); a URL gets each shard uploaded as it is finished, its shard.json last (required)")
    cache.add_argument("--staging", help="--out is a URL: local folder where shards are written before their upload "
                       "(default: a folder in the system's temp directory)")
    cache.add_argument("--lease-s", type=float, help="--out is a URL: seconds of the lock's lease on the store, "
                       "renewed while extract-logits runs (default %(default)s)")
    cache.add_argument("--cached-epochs", type=int, help="K: epochs of the plan to cache; finetune epoch e reads "
                       "epoch e mod K, so augmentations repeat every K epochs (default %(default)s; the "
                       "teacher costs K epochs of forward passes, once)")
    cache.add_argument("--topk", type=int, help="logits kept per sample (default %(default)s); the argmax is "
                       "stored besides")
    cache.add_argument("--shard-groups", type=int, help="groups per shard, each with all K epochs (default "
                       "%(default)s)")
    cache.add_argument("--overwrite", action="store_true", help="replace an existing logits cache at --out")
    cache.add_argument("--teacher-precision", choices=["auto", "fp32", "fp16", "bf16"], help="the teacher's "
                       "arithmetic (default %(default)s, G2SD's stage-2 teacher; fp16 needs CUDA); recorded in the "
                       "manifest")
    cache.add_argument("--config", help="YAML file of these options, e.g. the finetune config (its training options "
                       "are ignored); flags override it")
    perf = p.add_argument_group("performance")
    perf.add_argument("--workers", type=int, help="DataLoader processes decoding, augmenting and mixing "
                      "(default %(default)s)")
    perf.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto); torchrun splits shards over ranks")
    perf.add_argument("--dist-timeout", type=float, help="minutes a collective (barrier, all-reduce) waits for the "
                      "other ranks before it fails instead of hanging (default %(default)s)")
    set_dataclass_defaults(p, LogitsConfig)
    return p


def finetune_config(args) -> FinetuneConfig:
    cfg = config_from_args(FinetuneConfig, args)
    check_mode({k: getattr(args, k) for k in MODE_CLAIMS if hasattr(args, k)}, cfg.distilled, args.config)
    return cfg


def run_finetune(args) -> int:
    from g2sd_cache.specific.finetune import finetune
    summary = finetune(finetune_config(args))
    return 0 if summary else 1


def run_extract_logits(args) -> int:
    from g2sd_cache.specific.extract_logits import run_extract_logits as extract
    s = extract(config_from_args(LogitsConfig, args))
    if "cache_samples" in s:
        print(f"extracted {s['samples']} samples in {s['seconds']:.1f} s ({s['samples_per_s']:.1f} samples/s; teacher "
              f"alone {s['teacher_samples_per_s']:.1f}/s); cache: {s['epochs']} epoch(s) x {s['groups_per_epoch']} "
              f"groups, {s['cache_bytes'] / 2**20:.2f} MiB, {s['bytes_per_sample']:.1f} B/sample" +
              (f"; {len(s['unreadable'])} unreadable image(s) replaced in their groups" if s.get("unreadable") else ""))
    return 0


FINETUNE = Command("finetune", add_finetune, run_finetune, config=FinetuneConfig,
                   file_keys=lambda values, path: file_values(FinetuneConfig, values, path))
EXTRACT_LOGITS = Command("extract-logits", add_extract_logits, run_extract_logits, config=LogitsConfig,
                         file_keys=lambda values, path: file_values(LogitsConfig, values, path))
