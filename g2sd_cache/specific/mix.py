"""Mixup / CutMix over one mixing group, with the draws made explicit.

Semantics are timm's `Mixup` in G2SD's configuration (mode 'batch', mixup alpha 0.8, cutmix alpha 1.0,
prob 1.0, switch prob 0.5, label smoothing 0.1, correct_lam, no cutmix_minmax): one (lambda, mixup-or-cutmix,
box) per group; sample i is mixed with sample G-1-i (timm's `x.flip(0)`); targets are
`lam * smooth(y) + (1 - lam) * smooth(y.flip(0))`.

timm draws these parameters from numpy's global generator once per GPU batch, so they depend on the number
of GPUs. Here `draw_mix` takes them, in timm's order, from a generator the caller keys by
(seed, epoch, group), and `apply_mix` applies them: the parameters are a few numbers per group that a cache
can record and a trainer can check, without any image. The arithmetic is timm's, step for step, so a group
mixes to the same bits wherever it is computed on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from timm.data.mixup import mixup_target


@dataclass(frozen=True)
class MixRecipe:
    """G2SD's SD.sh: --mixup 0.8 --cutmix 1.0; main_finetune_dis.py defaults for the rest."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass(frozen=True)
class MixParams:
    """One group's mixing. lam: each sample's own weight (1.0 = not mixed); box (y0, y1, x0, x1): the region
    pasted from the partner when cutmix (lam is then the exact unpasted area fraction)."""

    lam: float
    cutmix: bool
    box: tuple[int, int, int, int] | None = None


def draw_mix(recipe: MixRecipe, rng: np.random.Generator, img_size: int) -> MixParams:
    """The parameters of one group, drawn from `rng` in the order timm's Mixup draws them."""
    if not recipe.active or rng.random() >= recipe.prob:
        return MixParams(1.0, False)
    if recipe.mixup_alpha > 0 and recipe.cutmix_alpha > 0:
        cutmix = bool(rng.random() < recipe.switch_prob)
    else:
        cutmix = recipe.cutmix_alpha > 0
    alpha = recipe.cutmix_alpha if cutmix else recipe.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if lam == 1.0:  # timm returns before drawing a box: nothing is mixed
        return MixParams(1.0, cutmix)
    if not cutmix:
        return MixParams(lam, False)
    cy, cx = int(rng.integers(0, img_size)), int(rng.integers(0, img_size))
    box, lam = cutmix_box(lam, img_size, img_size, cy, cx)
    return MixParams(lam, True, box)


def cutmix_box(lam: float, height: int, width: int, cy: int, cx: int) -> tuple[tuple[int, int, int, int], float]:
    """timm's CutMix box for `lam` centred at (cy, cx), clipped to the image, and the corrected lambda
    (1 - pasted area / image area). returns ((y0, y1, x0, x1), lam)."""
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    y0, y1 = min(max(cy - cut_h // 2, 0), height), min(max(cy + (cut_h + 1) // 2, 0), height)
    x0, x1 = min(max(cx - cut_w // 2, 0), width), min(max(cx + (cut_w + 1) // 2, 0), width)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


def apply_mix(images: torch.Tensor, labels: torch.Tensor, params: MixParams, num_classes: int,
              label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """images: [G, 3, H, W] float (G even); labels: [G] int64.
    returns (mixed images [G, 3, H, W], soft targets [G, num_classes] float32); `images` is not modified."""
    if images.shape[0] % 2:
        raise ValueError(f"a mixing group needs an even number of samples, got {images.shape[0]}")
    mixed = images.clone()
    if params.cutmix and params.box is not None:
        y0, y1, x0, x1 = params.box
        mixed[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
    elif params.lam != 1.0:
        partner = images.flip(0).mul_(1.0 - params.lam)
        mixed.mul_(params.lam).add_(partner)
    return mixed, mixup_target(labels, num_classes, params.lam, label_smoothing)
