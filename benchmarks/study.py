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
    CODEC-kK          a cache of --codec-views K views in every other codec of g2sd_cache.codecs.CODECS

and measures each trained student on a held-out split of images that no arm trained on, with fresh views
(view indices no arm used) through the live teacher: the G2SD loss (smooth-L1, beta 2, all tokens) against the
teacher's float32 targets and the mean cosine between the student's prediction and the target per token.
Every arm is repeated for --seeds seeds (student initialisation, data order and views all follow the seed;
the held-out views do not), and its gap to online is taken within each seed, then averaged: the spread is
that of the paired differences.

Nothing here trains or extracts on its own: caches come from `g2sd_cache.extract.run_extract`, students from
`g2sd_cache.train.train` (cached arms with `cache=`, the online arm with `teacher=` and `data=`), read back
from the run's checkpoint. For a seed s, extract's view v of an image is the view online G2SD trains on in
epoch v (both are `views.sample_view(s, image, v)`), so cached-kK replays the views of online's first K epochs
(the batches differ: a cache's epoch order runs over its shards, online's over the folder listing).

Profiles: the default (micro teacher and student, small generated images, CPU, a few minutes) is a proxy —
a random micro teacher's targets are not real MAE features — that shows the shape of the trade-off and
checks the tool; `--teacher CKPT --arch ... --student ... --data DIR --device cuda` measures the real thing.
`--quick` is a smoke run for the tests.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from g2sd_cache import codecs
from g2sd_cache.checkpoint import load_checkpoint
from g2sd_cache.dist import resolve_device
from g2sd_cache.errors import UserError
from g2sd_cache.extract import ExtractConfig, run_extract
from g2sd_cache.kernels import masked_smooth_l1
from g2sd_cache.models import (DEFAULT_STUDENT, STUDENT_PRESETS, TEACHER_PRESETS, MAETeacher, build_student,
                               build_teacher, load_student_state)
from g2sd_cache.runlog import METRICS
from g2sd_cache.sources import FolderSource, open_source
from g2sd_cache.synthetic import jpeg_bytes, synthetic_image
from g2sd_cache.train import TrainConfig, train
from g2sd_cache.views import ViewGeometry, decode_image, normalize_patches, render_view, sample_view, visible_patches

BETA = 2.0                      # G2SD's smooth-L1 threshold, for training and the held-out loss alike
DEFAULT_CODEC = ExtractConfig.codec
SPLIT_SEED = 0x5EED             # which images are held out: fixed, so every seed evaluates on the same images
EVAL_SEED = 0x6576              # the held-out views: fixed, the same for every arm and seed
EVAL_VIEW_BASE = 1 << 30        # held-out view indices start here, far past any epoch a run trains


# ------------------------------------------------------------------------------------------------
# Profiles: defaults sized to the models; every field can be overridden by its flag.

@dataclass(frozen=True)
class Profile:
    name: str
    arch: str
    student: str
    img_size: int
    train_images: int | None    # None: every image of --data that is not held out
    heldout_images: int
    eval_views: int             # fresh views per held-out image
    epochs: int                 # each arm trains epochs x ceil(train_images / batch) steps
    batch_size: int
    blr: float
    warmup_epochs: float
    workers: int
    chunk_views: int
    source_px: tuple[int, int]  # side range of generated images (without --data)
    views: tuple[int, ...] = (1, 2, 4, 8)   # the K of the cached arms
    threads: int | None = 1     # torch CPU threads (None: torch's default). Micro models' ops are so small that
                                # a second thread only adds synchronisation, 10x slower on a busy 2-core machine


PROFILES = {
    # micro teacher and student, 96 px crops of small generated images: minutes on 2 CPU cores. 64 epochs, so
    # that every cached view is seen many times (epochs / K >= 8), as in G2SD's 300 epochs with a few views
    "micro": Profile("micro", "test_mae_micro_patch16", "test_vit_micro_patch16_dec32d1b", img_size=96,
                     train_images=256, heldout_images=64, eval_views=4, epochs=64, batch_size=32, blr=2e-2,
                     warmup_epochs=2.0, workers=0, chunk_views=32, source_px=(128, 224)),
    # the test's smoke run: every arm and code path, seconds per arm
    "quick": Profile("quick", "test_mae_micro_patch16", "test_vit_micro_patch16_dec32d1b", img_size=64,
                     train_images=32, heldout_images=16, eval_views=2, epochs=2, batch_size=16, blr=5e-3,
                     warmup_epochs=0.5, workers=0, chunk_views=16, source_px=(80, 128), views=(1, 2)),
    # a real MAE teacher and a G2SD student at 224 px: G2SD's recipe (blr, batch scaling), but 32 epochs (each
    # of K = 8 views seen 4 times) with 1 warm-up epoch
    "full": Profile("full", "mae_vit_base_patch16", DEFAULT_STUDENT, img_size=224, train_images=None,
                    heldout_images=1000, eval_views=2, epochs=32, batch_size=256, blr=1.5e-4, warmup_epochs=1.0,
                    workers=min(8, os.cpu_count() or 1), chunk_views=64, source_px=(320, 640), threads=None),
}


def choose_profile(quick: bool, arch: str | None) -> Profile:
    if quick:
        return PROFILES["quick"]
    return PROFILES["full"] if arch is not None and not arch.startswith("test_") else PROFILES["micro"]


# ------------------------------------------------------------------------------------------------
# Arms

@dataclass(frozen=True)
class Arm:
    name: str           # "online", "cached-k4", "int8-k2"
    views: int | None   # K; None online
    codec: str | None   # None online

    @property
    def online(self) -> bool:
        return self.views is None


def make_arms(ks: list[int], codec_k: int, codec_names: list[str]) -> list[Arm]:
    """online, cached-kK (default codec) for every K, then every codec at `codec_k`. The default codec at
    `codec_k` is cached-k{codec_k} itself when that K is in `ks`, so it is not trained twice."""
    arms = [Arm("online", None, None)] + [Arm(f"cached-k{k}", k, DEFAULT_CODEC) for k in ks]
    for name in codec_names:
        if name == DEFAULT_CODEC and codec_k in ks:
            continue
        arms.append(Arm(f"{name}-k{codec_k}", codec_k, name))
    return arms


# ------------------------------------------------------------------------------------------------
# Data: generated or given images, split once into a training and a held-out folder

def generate_images(root: Path, count: int, sides: tuple[int, int]) -> Path:
    """`count` seeded synthetic JPEGs (g2sd_cache.synthetic) of random size in `sides`, in 4 class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 4:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(*sides)), int(rng.integers(*sides)))
        (folder / f"img{i:06d}.jpg").write_bytes(jpeg_bytes(synthetic_image(1_000_003 + i, size)))
    return root


def split_images(source: FolderSource, work: Path, n_train: int | None, n_heldout: int) -> tuple[Path, Path]:
    """Hard-link (or copy, across file systems) a seeded random choice of `n_heldout` images into
    work/heldout and `n_train` of the others (all if None) into work/train; the same images on every run."""
    n = len(source)
    if n_heldout < 1 or n_heldout >= n:
        raise UserError(f"--heldout-images {n_heldout}: --data has {n} images; hold out at least 1 and leave "
                        f"some to train on")
    n_train = n - n_heldout if n_train is None else n_train
    if n_train < 1 or n_train > n - n_heldout:
        raise UserError(f"--train-images {n_train}: --data has {n} images and {n_heldout} are held out, so at most "
                        f"{n - n_heldout} can be trained on; lower --train-images or --heldout-images")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    parts = {"heldout": order[:n_heldout], "train": order[n_heldout:n_heldout + n_train]}
    for part, picks in parts.items():
        for i in sorted(picks):
            key = source.keys[i]
            dst = work / part / key
            dst.parent.mkdir(parents=True, exist_ok=True)
            src = os.path.join(source.root, key)
            try:
                os.link(src, dst)
            except OSError:     # another file system, or links not allowed: copy
                shutil.copyfile(src, dst)
    return work / "train", work / "heldout"


@dataclass
class HeldOut:
    """Fresh views of the held-out images, rendered once: patches [V, n_keep, p, p, 3] uint8 and
    mask [V, L] bool (True = hidden), the same for every arm and seed."""

    patches: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.mask)


def render_heldout(folder: Path, geometry: ViewGeometry, views_per_image: int) -> HeldOut:
    source = FolderSource.scan(str(folder))
    patches, masks = [], []
    for index, key in enumerate(source.keys):
        img = decode_image(source.read(key))
        for j in range(views_per_image):
            view = sample_view(EVAL_SEED, index, EVAL_VIEW_BASE + j, img.size, geometry)
            mask = torch.from_numpy(view.mask.copy())
            pixels = render_view(img, view.crop, view.flip, geometry.img_size)
            patches.append(visible_patches(pixels[None], mask[None], geometry.patch_size)[0])
            masks.append(mask)
    return HeldOut(torch.stack(patches), torch.stack(masks))


# ------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(student: torch.nn.Module, teacher: MAETeacher, heldout: HeldOut, target_layer: int, batch: int,
             device: torch.device) -> tuple[float, float]:
    """(mean G2SD loss, mean per-token cosine) of `student` against the live teacher's float32 targets over the
    held-out views. Every view has the same number of tokens, so per-batch means weigh by views."""
    student.eval()
    loss_sum = cos_sum = 0.0
    for a in range(0, len(heldout), batch):
        x = normalize_patches(heldout.patches[a:a + batch].to(device))
        mask = heldout.mask[a:a + batch].to(device)
        target = teacher.targets_visible(x, mask, target_layer)           # [B, T, D] float32
        pred = student.forward_visible(x, mask).float()                   # [B, T, D]
        loss_sum += float(masked_smooth_l1(pred, target, beta=BETA)) * len(x)
        cos_sum += float(F.cosine_similarity(pred, target, dim=-1).mean(dim=1).sum())
    return loss_sum / len(heldout), cos_sum / len(heldout)


def trained_student(run: Path, device: torch.device) -> torch.nn.Module:
    """The student of a finished `train` run, from its checkpoint."""
    ckpt = load_checkpoint(run)
    student = build_student(ckpt["student"], ckpt["target_dim"], ckpt["img_size"])
    load_student_state(student, ckpt["model"])
    return student.to(device)


# ------------------------------------------------------------------------------------------------
# One arm at one seed: extract (cached arms), train, evaluate

@dataclass(frozen=True)
class StudyConfig:
    """The study's options, the profile's defaults filled in (built from the flags in `config_from_args`)."""

    profile: Profile
    data: str | None
    teacher: str
    arch: str
    student: str
    views: tuple[int, ...]
    codec_views: int
    codecs: tuple[str, ...]
    seeds: int
    train_images: int | None
    heldout_images: int
    eval_views: int
    epochs: int
    batch_size: int
    blr: float
    warmup_epochs: float
    img_size: int
    target_layer: int
    workers: int
    threads: int | None
    device: str
    workdir: str | None
    keep: bool

    @property
    def geometry(self) -> ViewGeometry:
        return ViewGeometry(img_size=self.img_size, patch_size=TEACHER_PRESETS[self.arch].patch_size)

    def validate(self) -> None:
        if self.arch not in TEACHER_PRESETS:
            raise UserError(f"unknown --arch {self.arch}; choose one of: {', '.join(TEACHER_PRESETS)}")
        if self.student not in STUDENT_PRESETS:
            raise UserError(f"unknown --student {self.student}; choose one of: {', '.join(STUDENT_PRESETS)}")
        teacher, student = TEACHER_PRESETS[self.arch], STUDENT_PRESETS[self.student]
        if student.patch_size != teacher.patch_size:
            raise UserError(f"--student {self.student} has patch size {student.patch_size} but --arch {self.arch} "
                            f"has {teacher.patch_size}; choose a student with the teacher's patch size")
        for name in self.codecs:
            codecs.get_codec(name)
        for flag, value in (("--seeds", self.seeds), ("--epochs", self.epochs), ("--batch-size", self.batch_size),
                            ("--codec-views", self.codec_views), ("--views", min(self.views)),
                            ("--eval-views", self.eval_views), ("--heldout-images", self.heldout_images),
                            ("--train-images", 1 if self.train_images is None else self.train_images),
                            ("--threads", 1 if self.threads is None else self.threads)):
            if value < 1:
                raise UserError(f"{flag} must be at least 1")
        if self.img_size < teacher.patch_size or self.img_size % teacher.patch_size:
            raise UserError(f"--img-size {self.img_size}: must be a multiple of the patch size {teacher.patch_size}")
        if not 1 <= self.target_layer <= teacher.decoder_depth:
            raise UserError(f"--target-layer {self.target_layer}: must be between 1 and {teacher.decoder_depth}")
        if not (math.isfinite(self.blr) and self.blr > 0):
            raise UserError(f"--blr {self.blr}: must be a positive finite number")
        if not (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs):
            raise UserError(f"--warmup-epochs {self.warmup_epochs}: must be between 0 and --epochs {self.epochs}")
        if self.workers < 0:
            raise UserError("--workers must be 0 or more")


@dataclass(frozen=True)
class Plan:
    """What the split decided: the folders, and the run length every arm shares."""

    work: Path
    train_dir: Path
    heldout_dir: Path
    train_images: int
    steps_per_epoch: int
    steps: int
    warmup_steps: int


def quietly(log: Path, fn, *args):
    """Run a product entry point with its console output (progress bars, per-step lines) sent to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return fn(*args)


# The arrays that describe a view (the same bytes whatever the codec); every other array holds the codec's codes
# and scales, whatever a codec calls them.
VIEW_ARRAYS = ("pixels", "mask", "crop", "flip", "source_index", "key")


def target_bytes_per_view(cache: Path) -> float:
    """Bytes per view of the stored targets (the codec's codes and scales, zarr metadata left out) on disk."""
    manifest = json.loads((cache / "manifest.json").read_text())
    total = sum(size for shard in manifest["shards"] for rel, size in shard["files"].items()
                if "/" in rel and rel.split("/")[0] not in VIEW_ARRAYS and not rel.endswith("zarr.json"))
    return total / manifest["views"]


def run_arm(arm: Arm, seed: int, cfg: StudyConfig, plan: Plan, teacher: MAETeacher, heldout: HeldOut,
            device: torch.device) -> dict:
    """Extract the arm's cache (cached arms), train the student with `train`, evaluate it on the held-out views.
    Returns {"train_loss", "heldout_loss", "heldout_cosine", "bytes_per_view" (None online), "train_s", "extract_s"}."""
    tag = f"{arm.name}-seed{seed}"
    log = plan.work / "logs" / f"{tag}.log"
    run, cache = plan.work / "runs" / tag, plan.work / "caches" / tag
    g = cfg.geometry
    common = dict(out=str(run), student=cfg.student, steps=plan.steps, warmup_steps=plan.warmup_steps,
                  batch_size=cfg.batch_size, blr=cfg.blr, seed=seed, workers=cfg.workers, device=cfg.device,
                  log_every=plan.steps_per_epoch, save_every=plan.steps, on_error="fail", beta=BETA)
    result: dict = {"bytes_per_view": None, "extract_s": 0.0}
    try:
        if arm.online:
            train_cfg = TrainConfig(data=str(plan.train_dir), teacher=cfg.teacher, arch=cfg.arch, img_size=g.img_size,
                                    mask_ratio=g.mask_ratio, target_layer=cfg.target_layer, **common)
        else:
            ex = quietly(log, run_extract, ExtractConfig(
                data=str(plan.train_dir), out=str(cache), teacher=cfg.teacher, arch=cfg.arch, views=arm.views,
                seed=seed, target_layer=cfg.target_layer, mask_ratio=g.mask_ratio, img_size=g.img_size,
                codec=arm.codec, chunk_views=cfg.profile.chunk_views, batch_size=cfg.batch_size, workers=cfg.workers,
                device=cfg.device, on_error="fail"))
            if ex["cache_images"] != plan.train_images:
                raise UserError(f"the cache holds {ex['cache_images']} of {plan.train_images} training images")
            result.update(bytes_per_view=target_bytes_per_view(cache), extract_s=ex["seconds"])
            train_cfg = TrainConfig(cache=str(cache), **common)
        summary = quietly(log, train, train_cfg)
    except UserError as e:
        raise UserError(f"{tag}: {e} (its output: {log})") from e
    if summary["stopped_early"] or summary["steps"] != plan.steps:
        raise UserError(f"{tag}: training stopped at step {summary['steps']} of {plan.steps} (interrupted?); "
                        f"nothing was measured for it")
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    result["train_loss"] = records[-1]["loss"]       # the mean over the last epoch (log_every = one epoch)
    result["train_s"] = summary["seconds"]
    result["heldout_loss"], result["heldout_cosine"] = evaluate(
        trained_student(run, device), teacher, heldout, cfg.target_layer, cfg.batch_size, device)
    if not cfg.keep:          # both were made by this study in its own work folder; the logs stay
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------
# Aggregation over seeds

def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def summarise(arms: list[Arm], per_seed: dict[str, list[dict]]) -> list[dict]:
    """The JSON's "arms": each arm's metrics over seeds and its gap to online, paired seed by seed."""
    online = per_seed["online"]
    rows = []
    for arm in arms:
        res = per_seed[arm.name]
        rows.append({
            "name": arm.name, "views": arm.views, "codec": arm.codec,
            "bytes_per_view": res[0]["bytes_per_view"],
            "heldout_loss": mean_std([r["heldout_loss"] for r in res]),
            "heldout_cosine": mean_std([r["heldout_cosine"] for r in res]),
            "train_loss": mean_std([r["train_loss"] for r in res]),
            "gap_to_online": mean_std([r["heldout_loss"] - o["heldout_loss"] for r, o in zip(res, online)]),
        })
    return rows


# ------------------------------------------------------------------------------------------------
# Reports

def _pm(stat: dict, fmt: str) -> str:
    """mean ± std (std without a sign)."""
    return format(stat["mean"], fmt) + (f" ± {format(stat['std'], fmt.lstrip('+'))}" if stat["std"] is not None else "")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def table(report: dict) -> str:
    cfg = report["config"]
    online = next(a for a in report["arms"] if a["name"] == "online")["heldout_loss"]["mean"]
    lines = [f"## What the cache costs the student ({cfg['profile']} profile: {cfg['teacher']} {cfg['arch']} -> "
             f"{cfg['student']}, {cfg['train_images']} training / {cfg['heldout_images']} held-out images, "
             f"{cfg['steps']} steps of {cfg['batch_size']} = {cfg['epochs']} epochs, seeds {cfg['seeds']})",
             "",
             "| arm | K | codec | target bytes/view | held-out loss | held-out cosine | train loss | "
             "gap to online | gap / online |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in report["arms"]:
        gap = a["gap_to_online"]
        lines.append("| " + " | ".join([
            a["name"], str(a["views"] or "fresh"), a["codec"] or "—",
            f"{a['bytes_per_view']:,.0f}" if a["bytes_per_view"] is not None else "—",
            _pm(a["heldout_loss"], ".5f"), _pm(a["heldout_cosine"], ".4f"), _pm(a["train_loss"], ".5f"),
            _pm(gap, "+.5f"), _pm({k: None if v is None else 100 * v / online for k, v in gap.items()}, "+.2f") + " %"]) + " |")
    lines += ["", f"untrained student (same initialisation): held-out loss "
                  f"{_pm(cfg['untrained_student']['heldout_loss'], '.5f')}, cosine "
                  f"{_pm(cfg['untrained_student']['heldout_cosine'], '.4f')}. "
                  f"± is the standard deviation over seeds; the gap is paired seed by seed. "
                  f"Runtime {_duration(cfg['runtime_s'])}."]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Two panels: each arm's held-out loss relative to online (the paired gap, % of online's loss, ± its std
    over seeds) against K, and against the stored target bytes per view at --codec-views K. The gap is plotted
    rather than the loss itself because the seeds' spread of the loss (mostly the initialisation, shared by
    every arm of a seed) would hide differences the pairing resolves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, cfg = report["arms"], report["config"]
    online = next(a for a in arms if a["name"] == "online")["heldout_loss"]["mean"]
    rel = lambda a: 100 * a["gap_to_online"]["mean"] / online            # noqa: E731
    rel_std = lambda a: 100 * (a["gap_to_online"]["std"] or 0) / online  # noqa: E731
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax in (a1, a2):
        ax.axhline(0, color="C3", label=f"online (fresh views), loss {online:.4g}")
        ax.set_ylabel("held-out loss − online's (% of online)")
    cached = sorted((a for a in arms if a["name"].startswith("cached-k")), key=lambda a: a["views"])
    if cached:
        a1.errorbar([a["views"] for a in cached], [rel(a) for a in cached], yerr=[rel_std(a) for a in cached],
                    marker="o", capsize=3, label=f"cached, {cfg['default_codec']}")
        a1.set_xscale("log", base=2)
        a1.set_xticks([a["views"] for a in cached], [str(a["views"]) for a in cached])
    a1.set_xlabel("cached views per image K")
    a1.set_title("Held-out loss vs views per image")
    at_k = [a for a in arms if a["views"] == cfg["codec_views"]]
    a2.errorbar([a["bytes_per_view"] for a in at_k], [rel(a) for a in at_k], yerr=[rel_std(a) for a in at_k],
                marker="o", capsize=3, linestyle="none", label=f"cached, K = {cfg['codec_views']}")
    for x in sorted({a["bytes_per_view"] for a in at_k}):   # codecs of one size share a point's label
        same = [a for a in at_k if a["bytes_per_view"] == x]
        a2.annotate(", ".join(a["codec"] for a in same), (x, max(rel(a) for a in same)), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    a2.set_xlabel("stored target bytes per view")
    a2.set_title("Held-out loss vs bytes per view")
    for ax in (a1, a2):
        ax.legend(fontsize=8)
    fig.suptitle(f"{cfg['arch']} -> {cfg['student']}: {cfg['steps']} steps ({cfg['epochs']} epochs of "
                 f"{cfg['train_images']} images), held-out {cfg['heldout_images']} images; ± std of the paired gap "
                 f"over {len(cfg['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------

def prepare_data(cfg: StudyConfig, work: Path) -> Plan:
    """The training and held-out folders (from --data, or generated), and the run length of every arm."""
    if cfg.data:
        source = open_source(cfg.data)
        if not isinstance(source, FolderSource):
            raise UserError(f"--data {cfg.data}: the study needs an image folder (online G2SD reads images by "
                            f"index); unpack the tars into a folder")
    else:
        # the full profile trains on all of --data; generated, it makes 1024 training images unless told
        n = (cfg.train_images or 1024) + cfg.heldout_images
        log(f"generating {n} synthetic images in {work / 'images'}")
        source = FolderSource.scan(str(generate_images(work / "images", n, cfg.profile.source_px)))
    train_dir, heldout_dir = split_images(source, work, cfg.train_images, cfg.heldout_images)
    n_train = len(FolderSource.scan(str(train_dir)))
    steps_per_epoch = -(-n_train // cfg.batch_size)
    return Plan(work, train_dir, heldout_dir, n_train, steps_per_epoch, steps=cfg.epochs * steps_per_epoch,
                warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)))


def run_study(cfg: StudyConfig) -> dict:
    """Every arm at every seed; returns the report ({"arms": [...], "config": {...}}, the --json schema)."""
    t_start = time.perf_counter()
    cfg.validate()
    device = resolve_device(cfg.device)
    with _torch_threads(cfg.threads if device.type == "cpu" else None):
        return _run_study(cfg, device, t_start)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's CPU threads set to `n` (None: unchanged) for the block, then restored."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_study(cfg: StudyConfig, device: torch.device, t_start: float) -> dict:
    arms = make_arms(list(cfg.views), cfg.codec_views, list(cfg.codecs))
    seeds = list(range(cfg.seeds))
    if max(cfg.views + (cfg.codec_views,)) > cfg.epochs:
        log(f"note: K = {max(cfg.views + (cfg.codec_views,))} is more than the {cfg.epochs} epochs: some cached views "
            f"are never used, and that arm trains on the same views as online")

    teacher, info = build_teacher(cfg.teacher, cfg.arch, cfg.img_size)   # a wrong checkpoint fails before any work
    teacher.to(device)
    with _work_folder(cfg.workdir) as work:
        plan = prepare_data(cfg, work)
        heldout = render_heldout(plan.heldout_dir, cfg.geometry, cfg.eval_views)
        log(f"{cfg.profile.name} profile on {device}: {cfg.arch} ({info.source}) -> {cfg.student}, {plan.train_images} "
            f"training images, {len(heldout)} held-out views; {len(arms)} arms x {len(seeds)} seeds, {plan.steps} "
            f"steps of {cfg.batch_size} each")
        untrained = [evaluate(build_student(cfg.student, teacher.shape.decoder_embed_dim, cfg.img_size, seed=seed)
                              .to(device), teacher, heldout, cfg.target_layer, cfg.batch_size, device)
                     for seed in seeds]
        per_seed: dict[str, list[dict]] = {arm.name: [] for arm in arms}
        for seed in seeds:
            for arm in arms:
                t0 = time.perf_counter()
                r = run_arm(arm, seed, cfg, plan, teacher, heldout, device)
                per_seed[arm.name].append(r)
                log(f"seed {seed} {arm.name:>10}: held-out loss {r['heldout_loss']:.5f}, cosine "
                    f"{r['heldout_cosine']:.4f}, train loss {r['train_loss']:.5f} ({time.perf_counter() - t0:.0f} s)")

    return {"arms": summarise(arms, per_seed), "config": {
        "profile": cfg.profile.name, "teacher": info.source, "arch": cfg.arch, "student": cfg.student,
        "data": cfg.data or "synthetic", "train_images": plan.train_images, "heldout_images": len(heldout) // cfg.eval_views,
        "eval_views_per_image": cfg.eval_views, "img_size": cfg.img_size, "mask_ratio": cfg.geometry.mask_ratio,
        "target_layer": cfg.target_layer, "beta": BETA, "epochs": cfg.epochs, "steps": plan.steps,
        "batch_size": cfg.batch_size, "blr": cfg.blr, "warmup_steps": plan.warmup_steps, "seeds": seeds,
        "views": list(cfg.views), "codec_views": cfg.codec_views, "codecs": list(cfg.codecs),
        "default_codec": DEFAULT_CODEC, "device": str(device), "threads": torch.get_num_threads(),
        "untrained_student": {"heldout_loss": mean_std([u[0] for u in untrained]),
                              "heldout_cosine": mean_std([u[1] for u in untrained])},
        "seconds_per_arm": {name: statistics.fmean(r["train_s"] + r["extract_s"] for r in res)
                            for name, res in per_seed.items()},
        "runtime_s": time.perf_counter() - t_start, "torch": torch.__version__,
    }}


@contextlib.contextmanager
def _work_folder(path: str | None):
    """--workdir (new or empty; kept), else a temporary folder removed at the end."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix="g2sd-study-") as tmp:
            yield Path(tmp)
        return
    work = Path(path)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise UserError(f"--workdir {path} exists and is not an empty folder; give a new or empty one")
    work.mkdir(parents=True, exist_ok=True)
    yield work


def log(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


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
    ap.add_argument("--teacher", default="random", help="MAE checkpoint with its decoder, or random / random:SEED "
                    "(default: random)")
    ap.add_argument("--arch", help=f"teacher preset; a non-test one selects the full profile ({_profiles('arch')})")
    ap.add_argument("--student", help=f"student preset ({_profiles('student')})")
    ap.add_argument("--views", type=int, nargs="+", metavar="K", help=f"the K of the cached arms ({_profiles('views')})")
    ap.add_argument("--codec-views", type=int, default=2, metavar="K", help="the K at which every codec is compared "
                    "(default: 2)")
    ap.add_argument("--codecs", nargs="+", choices=list(codecs.CODECS), help="codecs to compare (default: all)")
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
        device=args.device, workdir=args.workdir, keep=args.keep)


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
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        log(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        log(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
