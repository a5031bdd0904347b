"""`g2sd-cache train`: its flags (defaults from `TrainConfig`)."""
from __future__ import annotations

from g2sd_cache.cli.command import Command
from g2sd_cache.common.config import config_from_args, set_dataclass_defaults
from g2sd_cache.generic.train import TrainConfig

REQUIRED = ("out",)


def add(sub):
    from g2sd_cache.models.mae import STUDENT_PRESETS, TEACHER_PRESETS
    p = sub.add_parser(
        "train", help="train a G2SD student from the cache (or online with the teacher, the baseline)",
        description="G2SD generic distillation. --cache: cached (no teacher forward, and with a pixel cache no image "
                    "decoding: the product); --teacher: online G2SD as in the paper (the baseline); both: replay the "
                    "cached views through the live teacher and log the target discrepancy (the verification). Run "
                    "under `torchrun --nproc_per_node N` for DDP. Example: g2sd-cache train --cache /cache/in1k-b16 "
                    "--out runs/s16 --config configs/g2sd_vit_small_from_vit_base.yaml")
    data = p.add_argument_group("data")
    data.add_argument("--cache", help="a cache written by `g2sd-cache extract`: a folder, or a URL (s3://, gs://) "
                      "read through a node-local copy (--local-cache)")
    data.add_argument("--local-cache", help="--cache is a URL: node-local folder its shard files are downloaded to "
                      "and read from, shared by the node's ranks (default: a per-user folder in the temp directory, "
                      "printed)")
    data.add_argument("--local-cache-limit", help="--cache is a URL: most bytes the local copy may hold, e.g. 200GB "
                      "(default: no limit); files the rest of the epoch does not need are evicted first")
    data.add_argument("--prefetch-files", type=int, help="--cache is a URL: shard files downloaded ahead of the "
                      "reader (default %(default)s)")
    data.add_argument("--download-threads", type=int, help="--cache is a URL: parallel downloads per rank (default "
                      "%(default)s)")
    data.add_argument("--data", help="image folder or tar shards: required online, and for caches extracted with "
                      "--pixels none; optional with a pixel cache (then only checked against the cache's listing)")
    data.add_argument("--out", help="run directory: checkpoint.pt, metrics.jsonl, tb/, config.yaml (required); a new "
                      "or empty folder, or one of train's own runs")
    data.add_argument("--shuffle-window", type=int, help="views shuffled together in the epoch order (default "
                      "%(default)s); reads stay within about window x bytes/view of the cache at a time")
    data.add_argument("--shuffle-span", type=int, help="views whose blocks are shuffled together: 0 (default) the "
                      "whole epoch; N: the epoch is read span by span, each span whole shards holding >= N views, so "
                      "a --cache URL's local copy needs about 2 spans of the epoch's files (--local-cache-limit), "
                      "not the epoch's share, to fetch each byte once; part of the data order (kept on --resume)")
    data.add_argument("--on-error", choices=["skip", "fail"], help="unreadable cache chunks or images: stop naming "
                      "them (fail) or leave them out of the loss and count them (skip) (default %(default)s)")
    model = p.add_argument_group("model")
    model.add_argument("--student", choices=list(STUDENT_PRESETS), help="student preset (default %(default)s)")
    model.add_argument("--teacher", help="MAE checkpoint (or random[:SEED]) for online or replay mode")
    model.add_argument("--arch", choices=list(TEACHER_PRESETS), help="teacher architecture for online mode "
                       "(default %(default)s; replay takes the cache's)")
    model.add_argument("--target-layer", type=int, help="online mode: teacher decoder block of the target (default "
                       "%(default)s)")
    model.add_argument("--mask-ratio", type=float, help="online mode: fraction of patches hidden (default %(default)s)")
    model.add_argument("--img-size", type=int, help="online mode: crop size (default %(default)s)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help=f"epochs to train (default {TrainConfig.DEFAULT_EPOCHS}, G2SD's); "
                     f"epoch e uses cached view e mod K")
    opt.add_argument("--steps", type=int, help="optimizer steps to train instead of --epochs")
    opt.add_argument("--batch-size", type=int, help="micro-batch per rank (default %(default)s)")
    opt.add_argument("--accum-iter", type=int, help="micro-batches per optimizer step (default %(default)s); the "
                     "global batch is batch-size x accum-iter x ranks")
    opt.add_argument("--blr", type=float, help="base lr; lr = blr x global batch / 256 (default %(default)s)")
    opt.add_argument("--min-lr", type=float, help="lr at the end of the cosine (default %(default)s, G2SD's)")
    opt.add_argument("--weight-decay", type=float, help="AdamW weight decay on every parameter with 2 or more "
                     "dimensions, cls and mask tokens included; none on biases and norms (default %(default)s, as "
                     "G2SD)")
    opt.add_argument("--warmup-epochs", type=float, help="linear warm-up length in epochs (default %(default)s); with "
                     "--steps, a warm-up longer than the run is refused")
    opt.add_argument("--warmup-steps", type=int, help="linear warm-up length in optimizer steps (overrides "
                     "--warmup-epochs)")
    opt.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value (default: no clipping, as "
                     "MAE)")
    opt.add_argument("--loss-tokens", choices=["all", "masked", "visible"], help="tokens the smooth-L1 averages over "
                     "(default %(default)s, G2SD's; visible includes cls)")
    opt.add_argument("--beta", type=float, help="smooth-L1 beta (default %(default)s, G2SD's)")
    run_ = p.add_argument_group("run")
    run_.add_argument("--seed", type=int, help="seed of student init and data order (default %(default)s)")
    run_.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, "
                      "mid-epoch, with the same samples in the same order, on any number of ranks and workers")
    run_.add_argument("--stop-after", type=int, help="end after this many steps as if preempted (checkpoint saved; "
                      "the schedule still follows --epochs/--steps)")
    run_.add_argument("--log-every", type=int, help="steps between console lines / metrics.jsonl records (default "
                      "%(default)s)")
    run_.add_argument("--save-every", type=int, help="steps between checkpoints (default %(default)s; also saved at "
                      "the end)")
    run_.add_argument("--log-samples", action="store_true", help="write the (image, view, key) of every sample to "
                      "samples-rankN.jsonl (audits, tests)")
    run_.add_argument("--config", help="YAML file of these options (names with underscores); flags override it")
    perf = p.add_argument_group("performance")
    perf.add_argument("--workers", type=int, help="DataLoader processes per rank decoding images (image path only: "
                      "online, replay without pixels, --pixels none caches; default %(default)s). The data order "
                      "does not depend on it")
    perf.add_argument("--prefetch", type=int, help="steps read ahead of the optimizer (and samples per worker on the "
                      "image path; default %(default)s)")
    perf.add_argument("--device", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    perf.add_argument("--dist-timeout", type=float, help="minutes a collective (barrier, all-reduce) waits for the "
                      "other ranks before it fails instead of hanging (default %(default)s)")
    perf.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="autocast dtype (auto: bf16 on "
                      "CUDA, fp32 on CPU). fp16 is G2SD's (with a loss scaler); bf16 needs none (default %(default)s)")
    perf.add_argument("--teacher-precision", choices=["auto", "fp32", "fp16", "bf16"], help="the online / replay "
                      "teacher's arithmetic, apart from the student's (default %(default)s: fp16 autocast on CUDA as "
                      "G2SD, fp32 on CPU)")
    set_dataclass_defaults(p, TrainConfig, required=REQUIRED)
    return p


def run(args) -> int:
    from g2sd_cache.generic import train as train_module
    summary = train_module.train(config_from_args(TrainConfig, args, required=REQUIRED))
    return 0 if summary else 1


COMMAND = Command("train", add, run, config=TrainConfig)
