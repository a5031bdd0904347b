"""Per-sample augmentation of the specific stage, as a pure function of (seed, epoch, image index).

The transform is timm's training transform exactly as G2SD builds it (`util/datasets.py` ->
`timm.data.create_transform`): RandomResizedCrop (scale 0.08-1, bicubic) -> horizontal flip 0.5 ->
RandAugment `rand-m9-mstd0.5-inc1` -> to tensor + ImageNet mean/std -> RandomErasing (p 0.25, per-pixel
normal noise, one box). We call timm's objects; we do not re-implement any op.

Randomness. timm's transforms draw from process-global generators: Python's `random` (crop box, RandAugment
gate, magnitude and sign, erasing box), numpy's legacy global state (RandAugment's choice of ops) and torch's
default CPU generator (flip, erasing noise). We *seed around* them: for each sample, the key
(seed, epoch, index) goes through numpy's SeedSequence (the same keyed derivation that feeds the Philox views
of stage 1) to three seeds, the three global generators are seeded from them, timm's transform runs, and the
previous global states are restored. So a sample is a function of its key alone (given the library versions,
which the plan records): any rank, worker or resume renders the same pixels, and nobody else's random stream
is disturbed. A lock keeps two threads of one process from interleaving; separate processes (DataLoader
workers) have their own globals. We chose this over re-implementing the draws because RandAugment's draws are
spread through timm's op machinery (the sign of an op's magnitude is drawn inside its level function), and a
re-implementation would have to copy those tables; seeding around keeps timm the single source of the recipe.
"""
from __future__ import annotations

import random
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment, posterize

from g2sd_cache.data.views import IMAGENET_MEAN, IMAGENET_STD

SAMPLE_TAG = 0x73616D  # keeps the per-sample keys apart from the plan's order and mixing keys


@dataclass(frozen=True)
class AugmentRecipe:
    """G2SD's per-sample training augmentation (main_finetune_dis.py defaults, SD.sh's --reprob)."""

    img_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)     # timm's RandomResizedCrop default (G2SD passes none)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    interpolation: str = "bicubic"
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1


def build_train_transform(recipe: AugmentRecipe) -> Callable[[Image.Image], torch.Tensor]:
    """timm's training transform for `recipe`: PIL RGB image -> float32 [3, S, S], normalised, erased.
    Colour jitter stays off (G2SD passes color_jitter=None, and timm disables it under RandAugment anyway)."""
    transform = create_transform(
        input_size=recipe.img_size, is_training=True, scale=recipe.scale, ratio=recipe.ratio, hflip=recipe.hflip,
        color_jitter=None, auto_augment=recipe.auto_augment, interpolation=recipe.interpolation,
        re_prob=recipe.re_prob, re_mode=recipe.re_mode, re_count=recipe.re_count,
        mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.aug_fn is posterize:
                    op.aug_fn = posterize_any_bits
    return transform


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, also for 0 bits. `PosterizeIncreasing` keeps 4 - int(4 * m / 10) bits, so a drawn
    magnitude of 10 (9 + 0.5 * N(0, 1) >= 10 about 2 % of the time, then clipped) asks for 0 bits. Older Pillow
    returned a black image for that (every bit masked off), which is what G2SD's runs saw; current Pillow raises
    instead (bits must be 1-8), which would stop training about once every 660 images. We return the black image."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


_GLOBAL_RNG_LOCK = threading.RLock()


@contextmanager
def seeded_global_rngs(*key: int) -> Iterator[None]:
    """Seed Python's `random`, numpy's global RandomState and torch's default CPU generator from `key`
    (non-negative ints); restore their previous states on exit. Never touches CUDA generators."""
    words = [int(w) for w in np.random.SeedSequence(list(key)).generate_state(8, dtype=np.uint32)]
    with _GLOBAL_RNG_LOCK:
        saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        random.seed(words[0] << 96 | words[1] << 64 | words[2] << 32 | words[3])
        np.random.seed(np.array(words[4:6], dtype=np.uint32))
        torch.default_generator.manual_seed(words[6] << 32 | words[7])
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


class SampleAugmenter:
    """augmenter(img, epoch, index) -> float32 [3, S, S]: sample `index`'s augmented view in `epoch`."""

    def __init__(self, recipe: AugmentRecipe, seed: int):
        self.recipe = recipe
        self.seed = seed
        self.transform = build_train_transform(recipe)

    def __call__(self, img: Image.Image, epoch: int, index: int) -> torch.Tensor:
        with seeded_global_rngs(self.seed, epoch, index, SAMPLE_TAG):
            return self.transform(img)
