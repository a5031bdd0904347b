"""Frozen configurations of the specific stage: `finetune` and `extract-logits` (their flags: cli/finetune.py).

Both commands share the data plan's options (`PlanOptions`): a logits cache is only valid for the plan that
made it, so the options that decide the plan have one definition, one set of flags and one set of defaults.
Option names are the keys of `configs/finetune_vit_*.yaml` (G2SD's recipe, each value with its source); the
defaults are the same values, so `--config` and no `--config` give the official recipe.

A few recipe keys in those files name choices this implementation does not let you change (the optimizer,
timm's batch-mode mixing, ...): `from_values` accepts them when they hold the supported value and refuses
anything else in one line (`FIXED`, `file_values`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from g2sd_cache.models.classifier import CLASSIFIER_PRESETS
from g2sd_cache.common.config import check_seed
from g2sd_cache.common.dist import DIST_TIMEOUT_MIN
from g2sd_cache.common.errors import UserError
from g2sd_cache.training.precision import TEACHER_PRECISIONS
from g2sd_cache.specific.augment import AugmentRecipe, build_train_transform
from g2sd_cache.specific.mix import MixRecipe
from g2sd_cache.specific.plan import SDRecipe

# Recipe keys of configs/finetune_vit_*.yaml with the only value supported here.
FIXED = {"optimizer": "adamw", "adam_betas": [0.9, 0.999], "head_init_std": 2e-5,
         "color_jitter": None, "cutmix_minmax": None, "mixup_mode": "batch"}


@dataclass(frozen=True)
class PlanOptions:
    """What decides every mixed training batch (sd_plan.SDPlan): data, seed, augmentation, mixing, group."""

    data: str = ""
    seed: int = 0
    img_size: int = 224
    group_size: int = 128
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    on_error: str = "skip"   # unreadable images: replaced in their group and listed (skip), or stop (fail)

    # The fields that decide the plan (a resume or a logits cache must keep them).
    PLAN = ("data", "seed", "img_size", "group_size", "auto_augment", "reprob", "remode", "recount", "mixup",
            "cutmix", "mixup_prob", "mixup_switch_prob", "smoothing")

    def recipe(self) -> SDRecipe:
        return SDRecipe(
            augment=AugmentRecipe(img_size=self.img_size, auto_augment=self.auto_augment, re_prob=self.reprob,
                                  re_mode=self.remode, re_count=self.recount),
            mix=MixRecipe(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix, prob=self.mixup_prob,
                          switch_prob=self.mixup_switch_prob, label_smoothing=self.smoothing),
            group_size=self.group_size)

    def validate_plan(self) -> None:
        if not self.data:
            raise UserError("--data is required: the training image folder, one sub-folder per class")
        check_seed(self.seed)
        if self.img_size < 16 or self.img_size % 16:
            raise UserError(f"--img-size {self.img_size}: must be a positive multiple of the patch size 16")
        if self.group_size < 2 or self.group_size % 2:
            raise UserError(f"--group-size {self.group_size}: must be even and at least 2 (mixup pairs sample i "
                            f"with sample G-1-i)")
        for name in ("reprob", "mixup_prob", "mixup_switch_prob", "smoothing"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise UserError(f"--{name.replace('_', '-')} {value}: must be between 0 and 1")
        for name in ("mixup", "cutmix"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserError(f"--{name} {getattr(self, name)}: the Beta distribution's alpha must be >= 0 (0: off)")
        if self.remode not in ("pixel", "rand", "const"):
            raise UserError(f"--remode {self.remode}: choose pixel, rand or const (timm's RandomErasing modes)")
        if self.recount < 1:
            raise UserError("--recount must be at least 1")
        if self.on_error not in ("skip", "fail"):
            raise UserError(f"--on-error {self.on_error}: choose skip or fail")
        try:
            build_train_transform(self.recipe().augment)
        except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
            raise UserError(f"--auto-augment {self.auto_augment}: not a timm augmentation policy ({e}); e.g. "
                            f"rand-m9-mstd0.5-inc1 (G2SD's), original, v0 or augmix-m5") from None

    def check_teacher_arch(self, arch: str) -> None:
        if arch not in CLASSIFIER_PRESETS:
            raise UserError(f"unknown --teacher-arch {arch}; choose one of: {', '.join(CLASSIFIER_PRESETS)}")


@dataclass(frozen=True)
class LogitsConfig(PlanOptions):
    """`g2sd-cache extract-logits`: the teacher's predictions on the mixed batches of epochs 0..K-1."""

    out: str = ""
    teacher: str = ""
    teacher_arch: str = "vit_base_patch16"
    cached_epochs: int = 1
    topk: int = 5
    shard_groups: int = 256
    teacher_precision: str = "fp32"   # G2SD's stage-2 teacher runs outside autocast (engine_finetune_dis.py:51)
    workers: int = 4
    device: str = "auto"
    overwrite: bool = False
    dist_timeout: float = DIST_TIMEOUT_MIN   # minutes a collective waits for the other ranks
    staging: str | None = None         # --out is a URL: local folder where shards are written before upload
    lease_s: float = 120.0             # --out is a URL: the lock's lease, renewed every third of it

    # Fields that decide the cache's content besides the plan; a rerun with any of them changed is refused.
    CONTENT = (*PlanOptions.PLAN, "teacher_arch", "cached_epochs", "topk", "shard_groups", "teacher_precision")

    def validate(self) -> None:
        self.validate_plan()
        if not self.out:
            raise UserError("--out is required: the folder of the logits cache")
        if not self.teacher:
            raise UserError("--teacher is required: the fine-tuned teacher classifier (or random[:SEED] for trials)")
        self.check_teacher_arch(self.teacher_arch)
        for name in ("cached_epochs", "topk", "shard_groups"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.workers < 0:
            raise UserError("--workers must be 0 or more")
        check_teacher_precision(self.teacher_precision)


@dataclass(frozen=True)
class FinetuneConfig(PlanOptions):
    """`g2sd-cache finetune`: G2SD's specific distillation (with a teacher or a logits cache), or plain
    fine-tuning (neither). Defaults: SD.sh / main_finetune_dis.py (see configs/finetune_vit_small.yaml)."""

    out: str = ""
    init: str = ""
    val: str | None = None
    teacher: str | None = None
    teacher_arch: str = "vit_base_patch16"
    teacher_precision: str = "fp32"    # online / replay teacher (G2SD's: fp32, outside autocast)
    logits: str | None = None
    local_cache: str | None = None     # --logits is a URL: node-local folder it is copied to (None: per-user temp)
    replay: bool = False               # with --logits and --teacher: also run the teacher, log the agreement
    arch: str = "vit_small_patch16"
    drop_path: float = 0.0
    epochs: int = 200
    batch_size: int | None = None      # forward micro-batch; None = the group
    accum_iter: int = 1
    blr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    clip_grad: float | None = None
    precision: str = "auto"
    eval_every: int = 1
    eval_batch_size: int = 128
    workers: int = 4
    prefetch: int = 2
    device: str = "auto"
    log_every: int = 20
    save_every: int = 1000
    stop_after: int | None = None
    resume: bool = False
    dist_timeout: float = DIST_TIMEOUT_MIN   # minutes a collective waits for the other ranks

    # What the model and the data order depend on: a resume must keep them (the schedule may change).
    # (The images are compared by their listing's fingerprint and the teacher by its weights' sha256, so a moved
    # folder, teacher file or logits cache resumes.)
    FIXED_ON_RESUME = (*(k for k in PlanOptions.PLAN if k != "data"), "arch", "drop_path", "batch_size")

    @property
    def distilled(self) -> bool:
        return bool(self.teacher or self.logits)

    @property
    def mode(self) -> str:
        """cached (--logits: no teacher forward, even when a teacher is named, e.g. by a recipe config), replay
        (--logits --replay --teacher: logs agreement), online (teacher in the loop), plain (neither)."""
        if self.logits:
            return "replay" if self.replay else "cached"
        return "online" if self.teacher else "plain"

    def mode_line(self) -> str:
        """The run's first line: what it will do each step, so a costly mode is never a surprise."""
        return {"cached": f"mode: cached - the teacher's stored predictions from {self.logits}; no teacher forward"
                          + (f" ({self.teacher} is not run: add --replay to also run it and log the agreement)"
                             if self.teacher else ""),
                "replay": f"mode: replay - stored predictions from {self.logits} AND the live teacher {self.teacher} "
                          f"every step (measures their agreement; costs a teacher forward per sample)",
                "online": f"mode: online - the teacher {self.teacher} runs on every mixed group (the paper's G2SD)",
                "plain": "mode: plain fine-tuning (no teacher, no logits cache)"}[self.mode]

    @property
    def micro_batch(self) -> int:
        return self.batch_size or self.group_size

    def validate(self) -> None:
        self.validate_plan()
        if not self.out:
            raise UserError("--out is required: the run folder")
        if not self.init and not self.resume:
            raise UserError("--init is required: the stage-1 student (a `g2sd-cache train` run folder or its "
                            "`g2sd-cache export` file)")
        if self.arch not in CLASSIFIER_PRESETS:
            raise UserError(f"unknown --arch {self.arch}; choose one of: {', '.join(CLASSIFIER_PRESETS)}")
        self.check_teacher_arch(self.teacher_arch)
        check_teacher_precision(self.teacher_precision)
        if self.replay and not (self.logits and self.teacher):
            raise UserError("--replay runs the live teacher next to the logits cache: it needs both --logits and "
                            "--teacher")
        if self.micro_batch < 1 or self.group_size % self.micro_batch:
            raise UserError(f"--batch-size {self.batch_size} must divide --group-size {self.group_size}: a mixing "
                            f"group is split into equal micro-batches")
        for name in ("epochs", "accum_iter", "eval_batch_size", "log_every", "save_every", "prefetch"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.stop_after is not None and self.stop_after < 1:
            raise UserError("--stop-after must be at least 1")
        if self.eval_every < 0:
            raise UserError("--eval-every must be 0 (never) or more")
        if self.workers < 0:
            raise UserError("--workers must be 0 or more")
        for name in ("blr", "layer_decay"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a positive finite number")
        for name in ("min_lr", "weight_decay", "warmup_epochs", "drop_path"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a finite number >= 0")
        if self.drop_path >= 1:
            raise UserError(f"--drop-path {self.drop_path}: must be below 1")
        if self.clip_grad is not None and not (math.isfinite(self.clip_grad) and self.clip_grad > 0):
            raise UserError(f"--clip-grad {self.clip_grad}: must be a positive finite number")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise UserError(f"--precision {self.precision}: choose auto, bf16, fp16 or fp32")


def check_teacher_precision(value: str) -> None:
    if value not in TEACHER_PRECISIONS:
        raise UserError(f"--teacher-precision {value}: choose one of {', '.join(TEACHER_PRECISIONS)}")


def file_values(cls: type, values: dict, path: str) -> dict:
    """A --config file's mapping screened for `cls` (FinetuneConfig or LogitsConfig).

    FIXED recipe keys must hold their supported value and are then dropped. Keys of FinetuneConfig that `cls`
    lacks (training options in a finetune config given to extract-logits) are dropped; anything else unknown is
    refused with the list of valid keys. For FinetuneConfig the mode claims `distilled` / `global_pool` stay in
    the mapping: whether they hold depends on the flags too (--teacher, --logits), so `check_mode` judges them
    once the command line is parsed."""
    values = dict(values)
    where = f"config {path}"
    for key, want in FIXED.items():
        if key in values:
            got = values.pop(key)
            if not _same(got, want):
                raise UserError(f"{where}: {key} {got!r} is not supported; this implementation uses G2SD's {want!r}")
    claims = {key: values.pop(key) for key in MODE_CLAIMS if key in values}
    known = {f.name for f in dataclasses.fields(cls)}
    training_only = {f.name for f in dataclasses.fields(FinetuneConfig)} - known
    unknown = sorted(set(values) - known - training_only)
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return {k: v for k, v in values.items() if k in known} | (claims if cls is FinetuneConfig else {})


# Recipe keys that state the mode of a finetune config: they must agree with --teacher / --logits.
MODE_CLAIMS = ("distilled", "global_pool")


def check_mode(claims: dict, distilled: bool, path: str | None) -> None:
    """Refuse a config whose `distilled` / `global_pool` contradict the mode (`distilled`: a teacher or a logits
    cache is given)."""
    for key, want in (("distilled", distilled), ("global_pool", not distilled)):
        if key in claims and bool(claims[key]) != want:
            raise UserError(_mode_mismatch(key, bool(claims[key]), distilled, f"config {path}"))


def _same(got, want) -> bool:
    if isinstance(want, list):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))
    if isinstance(want, float):
        return isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-9)
    return got == want


def _mode_mismatch(key: str, got: bool, distilled: bool, where: str) -> str:
    if key == "distilled":
        given = "a teacher or logits cache is given" if distilled else "neither --teacher nor --logits is given"
        return (f"{where} sets distilled: {str(got).lower()} but {given}; pass --teacher CKPT or --logits CACHE to "
                f"distil, or neither for plain fine-tuning (and drop distilled)")
    student = ("the distilled student classifies from its cls and dist tokens" if distilled
               else "plain fine-tuning uses MAE's global-pool classifier")
    return f"{where} sets global_pool: {str(got).lower()}, but {student}: drop global_pool"
