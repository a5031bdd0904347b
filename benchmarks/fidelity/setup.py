"""benchmarks/study.py's set-up: the constants every arm shares, the profiles (defaults sized to the models),
the study's configuration (`StudyConfig`, validated) and the plan the data split decides (`Plan`)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from g2sd_cache.cache import codecs
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import ExtractConfig
from g2sd_cache.models.mae import DEFAULT_STUDENT, STUDENT_PRESETS, TEACHER_PRESETS
from g2sd_cache.data.views import ViewGeometry

import g2sd_cache.benchmarks.common as bench_common

log = partial(bench_common.log, tag="study")

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
    arms: tuple[str, ...] = ()      # extra arms "CODEC:PIXELS:K" (e.g. int8:jpeg:8)
    pixel_quality: int = 90         # the JPEG quality of jpeg arms

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
        seen = set()
        for spec in self.arms:
            if parse_arm(spec) in seen:
                raise UserError(f"--arms {spec} is given twice; give each arm once")
            seen.add(parse_arm(spec))


def parse_arm(spec: str) -> tuple[str, str, int]:
    """--arms CODEC:PIXELS:K -> (codec, pixels, K), or a one-line UserError."""
    from g2sd_cache.cache.pixel_codecs import PIXEL_MODES
    parts = spec.split(":")
    if len(parts) != 3 or parts[1] not in PIXEL_MODES or parts[1] == "none" or not parts[2].isdigit() or int(parts[2]) < 1:
        raise UserError(f"--arms {spec}: expected CODEC:PIXELS:K with PIXELS visible or jpeg and K >= 1 (e.g. int8:jpeg:8)")
    codecs.get_codec(parts[0])
    return parts[0], parts[1], int(parts[2])


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
