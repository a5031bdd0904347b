"""The G2SD distillation step, defined once: used by `g2sd-cache train` and by the benchmark.

- `TrainConfig`: the frozen configuration of a training run (built in cli/main.py, saved as config.yaml).
- `prepare(cfg, env) -> Setup`: what the configuration implies before the first step — the cache, the
  source images (when they are needed), the teacher (online and replay), the view geometry, the epoch size.
- `Distiller`: stage 1's `Trainer` (training/trainer.py: student, optimizer, loss scaler, DDP, autocast).
  `step(batches, lr)` is one optimizer step over a step's micro-batches: `begin_step` -> `micro_step` per
  micro-batch -> `optimizer_step`.

Where a micro-batch's target comes from decides the mode: the stored codes (cached: no teacher at all),
the live teacher on a fresh view (online, the paper), or the live teacher on the cached view (replay, which
also measures how far the stored targets are from the live ones). Stored codes go into the fused loss as they
are, except a low-rank cache's (pcaR), which are decoded on the device first (a [T, R] x [R, D] matmul).

**One normalisation per optimizer step.** The loss of a step is the sum of smooth-L1 over the selected
elements of all its micro-batches on all ranks, divided by the selected count of the whole step (all
ranks). Every selected token has the same number of elements, so this is the mean over the step's valid
samples: micro-batch m (mean loss l_m over its v_m valid samples) contributes v_m / V x l_m, where V is the
step's valid count summed over ranks (one all-reduce before the first backward, no host sync), times the
world size to undo DDP's average of the ranks' gradients. So every valid sample weighs 1 / V however the
step is cut into micro-batches and ranks, and an all-invalid micro-batch (stand-ins) changes nothing.
The logged loss is the same quantity.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay

from g2sd_cache.cache import codecs
from g2sd_cache.cache.local_mirror import LocalCacheConfig, default_folder, parse_size
from g2sd_cache.cache.reader import Cache, open_cache
from g2sd_cache.cache.remote import is_remote
from g2sd_cache.common.dist import DIST_TIMEOUT_MIN, DistEnv
from g2sd_cache.common.config import check_seed
from g2sd_cache.common.errors import UserError
from g2sd_cache.kernels import masked_smooth_l1
from g2sd_cache.cache.manifest_checks import source_problem
from g2sd_cache.models.mae import (DEFAULT_STUDENT, STUDENT_PRESETS, TEACHER_PRESETS, G2SDStudent, MAETeacher, build_student,
                     build_teacher, load_student_state)
from g2sd_cache.training.precision import TEACHER_PRECISIONS, resolve_teacher_precision, teacher_autocast
from g2sd_cache.training.trainer import Trainer
from g2sd_cache.data.sources import FolderSource, Source, TarSource, open_source
from g2sd_cache.generic.stream import Batch
from g2sd_cache.data.views import ViewGeometry, normalize_patches, replay_versions


@dataclass(frozen=True)
class TrainConfig:
    out: str
    data: str | None = None
    cache: str | None = None
    teacher: str | None = None
    arch: str = "mae_vit_base_patch16"
    student: str = DEFAULT_STUDENT
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 64
    accum_iter: int = 1
    blr: float = 1.5e-4
    min_lr: float = 2.5e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 10.0
    warmup_steps: int | None = None
    clip_grad: float | None = None
    loss_tokens: str = "all"
    beta: float = 2.0
    target_layer: int = 4
    mask_ratio: float = 0.75
    img_size: int = 224
    workers: int = 4
    prefetch: int = 2
    shuffle_window: int = 16384
    shuffle_span: int = 0                   # rows whose blocks are shuffled together (0: the whole epoch; generic/plan.py)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    teacher_precision: str = "auto"   # online / replay teacher: auto = fp16 autocast on CUDA (G2SD's), fp32 on CPU
    log_every: int = 20
    save_every: int = 1000
    stop_after: int | None = None
    resume: bool = False
    on_error: str = "fail"
    log_samples: bool = False
    local_cache: str | None = None          # --cache is a URL: node-local folder of its shard files (None: a per-user temp folder)
    local_cache_limit: str | None = None    # bytes that folder may hold, e.g. "200GB" (None: no limit)
    prefetch_files: int = 16                # shard files downloaded ahead of the reader
    download_threads: int = 8               # parallel GETs per process
    dist_timeout: float = DIST_TIMEOUT_MIN   # minutes a collective waits for the other ranks

    # The run's length when neither --epochs nor --steps is given (G2SD's); not a field, so that giving both
    # stays a mistake the config can see.
    DEFAULT_EPOCHS = 300

    # What the epoch order depends on (with the global batch, checked separately): a resume must keep them. The
    # cache is compared by its content fingerprint (train.py), not by how its path is spelled.
    ORDER = ("seed", "shuffle_window", "shuffle_span")
    # What a checkpoint written before an ORDER field existed trained with (that field's then fixed behaviour).
    ORDER_BEFORE = {"shuffle_span": 0}

    @property
    def run_epochs(self) -> int | None:
        """Epochs to train: --epochs, else DEFAULT_EPOCHS unless --steps sets the length."""
        return None if self.steps is not None else self.epochs or self.DEFAULT_EPOCHS

    @property
    def mode(self) -> str:
        return "replay" if self.cache and self.teacher else "cached" if self.cache else "online"

    def validate(self) -> None:
        if not self.cache and not self.teacher:
            raise UserError("give --cache CACHE (cached G2SD), --teacher CKPT (online G2SD) or both (replay check)")
        if not self.cache and not self.data:
            raise UserError("online G2SD needs --data (the image folder the teacher and student see)")
        if self.student not in STUDENT_PRESETS:
            raise UserError(f"unknown --student {self.student}; choose one of: {', '.join(STUDENT_PRESETS)}")
        if self.arch not in TEACHER_PRESETS:
            raise UserError(f"unknown --arch {self.arch}; choose one of: {', '.join(TEACHER_PRESETS)}")
        if self.epochs is not None and self.steps is not None:
            raise UserError("give --epochs or --steps, not both")
        for name in ("batch_size", "accum_iter", "log_every", "save_every", "shuffle_window", "prefetch"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.shuffle_span < 0:
            raise UserError("--shuffle-span must be 0 (the whole epoch) or a number of views")
        for name in ("epochs", "steps", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if not (math.isfinite(self.blr) and self.blr > 0):
            raise UserError(f"--blr {self.blr}: the base learning rate must be a positive finite number")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr):
            raise UserError(f"--min-lr {self.min_lr}: must be a finite number >= 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"--weight-decay {self.weight_decay}: must be a finite number >= 0")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise UserError(f"--warmup-epochs {self.warmup_epochs}: must be a finite number >= 0")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"--warmup-steps {self.warmup_steps}: must be 0 or more")
        if self.clip_grad is not None and not (math.isfinite(self.clip_grad) and self.clip_grad > 0):
            raise UserError(f"--clip-grad {self.clip_grad}: must be a positive finite number")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise UserError(f"--beta {self.beta}: must be a finite number >= 0")
        if self.workers < 0:
            raise UserError("--workers must be 0 or more")
        if self.loss_tokens not in ("all", "masked", "visible"):
            raise UserError(f"--loss-tokens {self.loss_tokens}: choose all, masked or visible")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise UserError(f"--precision {self.precision}: choose auto, bf16, fp16 or fp32")
        if self.teacher_precision not in TEACHER_PRECISIONS:
            raise UserError(f"--teacher-precision {self.teacher_precision}: choose one of "
                            f"{', '.join(TEACHER_PRECISIONS)}")
        if self.on_error not in ("skip", "fail"):
            raise UserError(f"--on-error {self.on_error}: choose skip or fail")
        check_seed(self.seed)
        if not self.cache:   # online: the views' geometry comes from these flags (with a cache, from its manifest)
            ViewGeometry(img_size=self.img_size, patch_size=TEACHER_PRESETS[self.arch].patch_size,
                         mask_ratio=self.mask_ratio).check()
        if self.prefetch_files < 0 or self.download_threads < 1:
            raise UserError("--prefetch-files must be 0 or more and --download-threads at least 1")
        parse_size(self.local_cache_limit)


# ----------------------------------------------------------------------------------------------
# Set-up

@dataclass
class Setup:
    """Everything a run derives from its configuration before the first step."""

    source: Source | None          # None: a pixel cache trained without --data
    cache: Cache | None
    teacher: MAETeacher | None
    geometry: ViewGeometry
    target_layer: int
    target_dim: int
    unit_sizes: list[int]          # rows of each plan unit (cache shard, or the image folder)
    block: int                     # rows read together (the cache's inner chunk)
    whole_units: bool              # tar units: read whole, in order
    views_per_image: int | None    # K of the cache; None online
    notes: list[str]               # set-up remarks for the console (rank 0 prints them)

    @property
    def epoch_size(self) -> int:
        return sum(self.unit_sizes)


def prepare(cfg: TrainConfig, env: DistEnv) -> Setup:
    notes: list[str] = []
    cache = teacher = None
    source = open_source(cfg.data) if cfg.data else None
    if cfg.cache:
        local = None
        if is_remote(cfg.cache):
            local = LocalCacheConfig(cfg.local_cache or default_folder(), parse_size(cfg.local_cache_limit),
                                     cfg.prefetch_files, cfg.download_threads)
        cache = open_cache(cfg.cache, local)
        if local is not None:
            notes.append(f"reading {cfg.cache} through the node-local copy in {local.folder}" +
                         (f" (at most {cfg.local_cache_limit})" if local.limit else " (no size limit)"))
            notes += _span_advice(cfg, cache, local.limit)
        m = cache.manifest
        if m.views == 0:
            raise UserError(f"cache {cfg.cache} holds no views (all {len(m.skipped)} inputs were unreadable): there is "
                            f"nothing to train on; re-extract from readable images")
        if source is None and not cache.has_pixels:
            raise UserError(f"cache {cfg.cache} was extracted with --pixels none, so training reads the images: "
                            f"pass --data with the dataset it was extracted from ({m.source.root})")
        mismatch = source_problem(m, source, cfg.data) if source is not None else None
        if mismatch:
            raise UserError(mismatch)
        geometry = m.geometry
        target_layer, target_dim = m.target_layer, m.target_dim
        ignored = _flags_ignored_with_a_cache(cfg)
        if ignored:
            notes.append(f"note: {', '.join(ignored)} come from the cache's manifest with --cache; the flags are ignored")
        if cache.has_pixels:
            notes.append("reading the views' stored pixels: no image is opened" +
                         (" (--data is only checked against the cache's listing)" if source is not None else ""))
            if cache.jpeg_decoder == "cuda" and cache.jpeg_device == "cpu":
                notes.append("warning: the cache's JPEGs were decoded for the teacher by the GPU's decoder (nvjpeg); "
                             "with no GPU here they are decoded by libjpeg-turbo, whose rounding may differ slightly")
        elif m.versions != replay_versions():
            notes.append(f"warning: the cache was made with {m.versions}; this machine has {replay_versions()}: "
                         f"replayed crops may differ slightly from what the teacher saw")
    else:
        if not isinstance(source, FolderSource):
            raise UserError("online G2SD needs an image folder as --data (tar shards carry no image count); "
                            "extract a cache from the tars and train with --cache")
        geometry = ViewGeometry(img_size=cfg.img_size, patch_size=TEACHER_PRESETS[cfg.arch].patch_size,
                                mask_ratio=cfg.mask_ratio)
        target_layer, target_dim = cfg.target_layer, TEACHER_PRESETS[cfg.arch].decoder_embed_dim
        depth = TEACHER_PRESETS[cfg.arch].decoder_depth
        if not 1 <= target_layer <= depth:
            raise UserError(f"--target-layer {target_layer}: must be between 1 and {depth}")
    if cfg.teacher:
        arch = cache.manifest.teacher.arch if cache else cfg.arch
        teacher, info = build_teacher(cfg.teacher, arch, geometry.img_size)
        made = cache.manifest.teacher if cache else None
        if made and info.sha256 != made.sha256:
            raise UserError(f"--teacher {cfg.teacher} is not the teacher that made the cache ({made.source}, sha256 "
                            f"{made.sha256[:12]}...); replay needs the same weights")
        teacher.to(env.device)
    student_patch = STUDENT_PRESETS[cfg.student].patch_size
    if student_patch != geometry.patch_size:
        raise UserError(f"student {cfg.student} has patch size {student_patch} but the views use "
                        f"{geometry.patch_size}; choose a student with the teacher's patch size")
    if cache:
        unit_sizes, block = list(cache.shard_images), cache.manifest.chunk_views
    else:
        unit_sizes, block = [len(source)], 64
    whole_units = isinstance(source, TarSource) and not (cache and cache.has_pixels)
    return Setup(source, cache, teacher, geometry, target_layer, target_dim, unit_sizes, block, whole_units,
                 views_per_image=cache.views_per_image if cache else None, notes=notes)


def _span_advice(cfg: TrainConfig, cache, limit: int | None) -> list[str]:
    """A local copy smaller than an epoch's share of the cache: what --shuffle-span keeps it fetching once."""
    share = sum(f.size for s in range(len(cache.manifest.shards)) for f in cache.view_files(s, 0))
    if limit is None or limit >= share or cache.manifest.views == 0:
        return []
    per_view = share / max(1, sum(cache.shard_images))
    fits = max(1, int(limit / 3 / per_view))      # two spans (read, prefetched) and one shard of slack
    if cfg.shuffle_span == 0:
        return [f"note: --local-cache-limit {cfg.local_cache_limit} is below an epoch's share of the cache "
                f"({share / 2**30:.2f} GiB): the whole-epoch shuffle reads every shard throughout the epoch, so files "
                f"are fetched more than once; --shuffle-span {fits} would fetch each once"]
    if cfg.shuffle_span > fits:
        return [f"note: --shuffle-span {cfg.shuffle_span} views need about {3 * cfg.shuffle_span * per_view / 2**30:.2f}"
                f" GiB of local copy to fetch each file once; --local-cache-limit {cfg.local_cache_limit} holds "
                f"{fits} views' worth"]
    return []


def _flags_ignored_with_a_cache(cfg: TrainConfig) -> list[str]:
    """View and target flags set away from their defaults, which a cache's manifest overrides."""
    defaults = TrainConfig(out="")
    return [f"--{k.replace('_', '-')}" for k in ("target_layer", "mask_ratio", "img_size", "arch")
            if getattr(cfg, k) != getattr(defaults, k)]


# ----------------------------------------------------------------------------------------------
# The step

@dataclass
class StepResult:
    """One optimizer step, as device tensors (reading them would wait for the device):
    loss: this rank's share of the step's global mean loss (the ranks' shares sum to it);
    replay_rel_sum / replay_batches: relative RMS error of cached vs live targets, summed over this rank's
    micro-batches that had valid samples, and their count; replay_max_abs: the largest absolute error."""

    loss: torch.Tensor
    replay_rel_sum: torch.Tensor
    replay_batches: int
    replay_max_abs: torch.Tensor
    skipped: int                     # samples of this rank's micro-batches that could not be read


class Distiller(Trainer):
    """Stage 1's trainer (training/trainer.py): the G2SD student, AdamW with MAE's betas, and the step; see the
    module docstring."""

    def __init__(self, cfg: TrainConfig, setup: Setup, env: DistEnv):
        self.cfg, self.setup = cfg, setup
        device = env.device
        student: G2SDStudent = build_student(cfg.student, setup.target_dim, setup.geometry.img_size,
                                             seed=cfg.seed).to(device)
        # The official recipe (timm's add_weight_decay, no skip list): decay every parameter with >= 2 dims,
        # the cls and mask tokens included; biases and norms are not decayed.
        groups = param_groups_weight_decay(student, cfg.weight_decay, no_weight_decay_list=())
        super().__init__(student, groups, env, cfg.precision, cfg.clip_grad, betas=(0.9, 0.95))
        # the teacher's arithmetic is its own choice (its targets are LayerNorm-ed in fp32 either way)
        self.teacher_precision = resolve_teacher_precision(cfg.teacher_precision, device) if setup.teacher is not None \
            else None
        self.teacher_autocast = teacher_autocast(self.teacher_precision or "fp32", device)
        self._weights: list[torch.Tensor] = []
        # A low-rank cache's basis [R + 1, D], on the device once: its codes are decoded right before the loss.
        self.basis = setup.cache.basis.to(device) if setup.cache is not None and setup.cache.basis is not None else None

    # -- one optimizer step ------------------------------------------------------------------------
    def step(self, batches: list[Batch], lr: float) -> StepResult:
        """The whole optimizer step over `batches` (this rank's micro-batches of the step)."""
        self.begin_step(batches)
        losses, rels, n_rel, maxes = [], [], 0, []
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            loss, rel, max_abs = self.micro_step(batch, self._weights[i], sync=last)
            losses.append(loss)
            if rel is not None:
                rels.append(rel)
                maxes.append(max_abs)
                n_rel += 1
        self.optimizer_step(lr)
        zero = torch.zeros((), device=self.env.device)
        return StepResult(loss=torch.stack(losses).sum(), replay_rel_sum=torch.stack(rels).sum() if rels else zero,
                          replay_batches=n_rel, replay_max_abs=torch.stack(maxes).max() if maxes else zero,
                          skipped=sum(len(b.errors) for b in batches))

    def begin_step(self, batches: list[Batch]) -> None:
        """Each micro-batch's share of the step's loss: v_m / V (see the module docstring)."""
        local = torch.tensor([int(b.valid.sum()) for b in batches], dtype=torch.float32)
        total = local.sum().to(self.env.device)
        if self.env.world > 1:
            dist.all_reduce(total)
        self._weights = list((local.to(self.env.device) / total.clamp_min(1)).unbind())

    def micro_step(self, batch: Batch, share: torch.Tensor, sync: bool = True):
        """Forward and backward of one micro-batch whose mean loss is `share` of the step's loss. Gradients are
        all-reduced across ranks only when `sync`. Returns (its contribution to the step's loss, replay
        relative error or None, max abs error or None)."""
        device = self.env.device
        patches = normalize_patches(batch.device_patches(device))
        mask = batch.mask.to(device, non_blocking=True)
        valid = batch.valid.to(device, non_blocking=True)
        scale = None
        rel = max_abs = None
        s = self.setup
        if s.teacher is not None:
            with self.teacher_autocast():
                target = s.teacher.targets_visible(patches, mask, s.target_layer)
            if batch.codes is not None and bool(batch.valid.any()):   # replay: cached vs live targets
                cached = codecs.decode(s.cache.codec, batch.codes.to(device), None if batch.scale is None
                                       else batch.scale.to(device), basis=self.basis)
                ok = valid[:, None, None]
                err = (cached - target) * ok
                rel = err.pow(2).sum().sqrt() / (target * ok).pow(2).sum().sqrt().clamp_min(1e-12)
                max_abs = err.abs().max()
        else:
            target = batch.codes.to(device, non_blocking=True)
            scale = batch.scale.to(device, non_blocking=True) if batch.scale is not None else None
            if self.basis is not None:   # low rank: codes x scale @ basis + centre ([T, R] x [R, D]), float32
                target, scale = codecs.decode(s.cache.codec, target, scale, basis=self.basis), None
        sync_ctx = nullcontext() if (self.env.world == 1 or sync) else self.model.no_sync()
        with sync_ctx:
            with self.autocast():
                pred = self.model(patches, mask)
            loss = masked_smooth_l1(pred, target, scale=scale, beta=self.cfg.beta,
                                    token_mask=token_mask(self.cfg.loss_tokens, mask, valid, bool(batch.valid.all())))
            weighted = loss * share
            # x world: DDP averages the ranks' gradients, the step's loss is their sum
            self.scaler.scale(weighted * self.env.world).backward()
        return weighted.detach(), rel, max_abs

    def load_student(self, weights: dict) -> None:
        # A student whose head read decoder_norm's output (mae.OLD_HEAD_PREFIX) cannot resume: one line.
        load_student_state(self.student, weights, refuse_old_head=True)


def token_mask(loss_tokens: str, mask: torch.Tensor, valid: torch.Tensor, all_valid: bool) -> torch.Tensor | None:
    """[B, 1 + L] bool of the tokens the loss averages over (cls counts as visible), or None for all.
    `all_valid` comes from the CPU copy of `valid`, so deciding costs no device sync."""
    if loss_tokens == "all" and all_valid:
        return None
    cls = torch.ones_like(mask[:, :1])
    tokens = {"all": torch.ones_like(mask), "masked": mask, "visible": ~mask}[loss_tokens]
    tokens = torch.cat([cls & (loss_tokens != "masked"), tokens], dim=1)
    return tokens & valid[:, None]
