"""benchmarks/study.py's data and evaluation: the training / held-out split of the images (from --data or
generated), the held-out views rendered once, and a trained student's G2SD loss and cosine on them against
the live teacher's float32 targets."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from g2sd_cache.common.checkpoint import load_checkpoint
from g2sd_cache.common.errors import UserError
from g2sd_cache.kernels import masked_smooth_l1
from g2sd_cache.models.mae import MAETeacher, build_student, load_student_state
from g2sd_cache.data.sources import FolderSource, open_source
from g2sd_cache.data.views import ViewGeometry, decode_image, normalize_patches, render_view, sample_view, visible_patches

from g2sd_cache.benchmarks.common import generate_images
from g2sd_cache.benchmarks.fidelity.setup import BETA, EVAL_SEED, EVAL_VIEW_BASE, SPLIT_SEED, Plan, StudyConfig, log


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
