"""The specific-distillation step, defined once: used by `g2sd-cache finetune` and by the benchmark.

`FineTuner`, stage 2's `Trainer` (training/trainer.py), owns the student, AdamW with layer-wise lr decay, the
loss scaler, DDP and autocast.
`step(groups, stored, lr)` is one optimizer step over this rank's mixing groups of the step:

    per group: the teacher's labels for the dist head — the argmax of the live fp32 teacher on the mixed
               images (online), or the stored argmax (cached: no teacher at all); with both (replay) the
               live labels train and their agreement with the stored ones is measured;
               then the student, in micro-batches of the group, under autocast:
               loss = sd_loss(outputs, soft targets, teacher labels)         (specific/loss.py, G2SD's formula)
    AdamW step with lr x lr_scale per parameter group (layer decay), optional gradient clipping.

Normalisation: every group has G samples, so the step's loss is the mean over its groups of each group's
mean loss, as G2SD's (one group per GPU, accum_iter 1; with accumulation it divides by accum_iter). A
micro-batch of b samples contributes (b / G) / groups_on_this_rank of its mean loss; DDP averages ranks.
The teacher always runs on the whole group, so its labels do not depend on the micro-batch size.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from g2sd_cache.models.classifier import build_student, init_from_stage1, layer_decay_groups
from g2sd_cache.common.dist import DistEnv
from g2sd_cache.common.errors import UserError
from g2sd_cache.training.precision import resolve_teacher_precision, teacher_autocast
from g2sd_cache.cache.logits import TeacherPredictions
from g2sd_cache.training.trainer import Trainer
from g2sd_cache.specific.config import FinetuneConfig
from g2sd_cache.specific.loss import sd_loss
from g2sd_cache.specific.plan import MixedGroup


@dataclass
class SDStepResult:
    """One optimizer step on this rank, as device tensors (reading them waits for the device).
    loss / loss_gt / loss_dist: the mean over this rank's groups; agree / compared: samples whose live
    teacher argmax equals the stored one, and samples compared (replay only); max_logit_err: the largest
    |stored top-k value - live logit| (replay only)."""

    loss: torch.Tensor
    loss_gt: torch.Tensor
    loss_dist: torch.Tensor
    agree: torch.Tensor
    compared: int
    max_logit_err: torch.Tensor


class FineTuner(Trainer):
    """Stage 2's trainer (training/trainer.py): the classifier student, AdamW with layer-wise lr decay, the
    teacher's labels and the step; see the module docstring."""

    def __init__(self, cfg: FinetuneConfig, num_classes: int, teacher: torch.nn.Module | None, env: DistEnv,
                 load_init: bool = True):
        self.cfg, self.teacher = cfg, teacher
        student = build_student(cfg.arch, num_classes, cfg.img_size, distilled=cfg.distilled,
                                drop_path_rate=cfg.drop_path, seed=cfg.seed)
        self.teacher_autocast = teacher_autocast(resolve_teacher_precision(cfg.teacher_precision, env.device,
                                                                           auto="fp32"), env.device)
        if load_init:
            init_from_stage1(student, cfg.init, "--init")
        student.to(env.device)
        # G2SD: AdamW(param_groups_lrd(...)) with torch's default betas; no decay on 1-D tensors and tokens.
        super().__init__(student, layer_decay_groups(student, cfg.weight_decay, cfg.layer_decay), env,
                         cfg.precision, cfg.clip_grad)

    # -- teacher labels ---------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_labels(self, images: torch.Tensor, stored: TeacherPredictions | None):
        """images: [G, 3, S, S] on the device. Returns (labels [G] int64 or None, agree, compared, max err)."""
        device = self.env.device
        zero = torch.zeros((), device=device)
        if self.teacher is None:
            return (None if stored is None else stored.argmax.to(device, non_blocking=True)), zero, 0, zero
        with self.teacher_autocast():               # G2SD: fp32, outside autocast, on the whole group
            logits = self.teacher(images).float()
        live = logits.argmax(dim=1)
        if stored is None:
            return live, zero, 0, zero
        argmax, indices = stored.argmax.to(device), stored.indices.to(device)
        err = (logits.gather(1, indices) - stored.values.to(device)).abs().max()
        return live, (live == argmax).sum(), live.numel(), err

    # -- one optimizer step -----------------------------------------------------------------------
    def step(self, groups: list[MixedGroup], stored: list[TeacherPredictions | None], lr: float) -> SDStepResult:
        device = self.env.device
        g = self.cfg.group_size
        b = self.cfg.micro_batch
        micro = [(i, s) for i in range(len(groups)) for s in range(0, g, b)]
        losses, gts, dists = [], [], []
        agree, compared, max_err = torch.zeros((), device=device), 0, torch.zeros((), device=device)
        labels_of: dict[int, torch.Tensor | None] = {}
        for m, (i, start) in enumerate(micro):
            group = groups[i]
            if start == 0:
                images_all = group.images.to(device, non_blocking=True)
                labels_of[i], a, c, e = self.teacher_labels(images_all, stored[i])
                agree, compared, max_err = agree + a, compared + c, torch.maximum(max_err, e)
            images = images_all[start:start + b]
            targets = group.targets[start:start + b].to(device, non_blocking=True)
            labels = None if labels_of[i] is None else labels_of[i][start:start + b]
            last = m == len(micro) - 1
            sync = nullcontext() if (self.env.world == 1 or last) else self.model.no_sync()
            with sync:
                with self.autocast():
                    outputs = self.model(images)
                loss, parts = sd_loss(outputs, targets, labels)
                share = (images.shape[0] / g) / len(groups)
                self.scaler.scale(loss * share).backward()
            losses.append(loss.detach() * share)
            gts.append(parts["loss_gt"] * share)
            dists.append(parts.get("loss_dist", torch.zeros((), device=device)) * share)
        self.optimizer_step(lr)
        return SDStepResult(torch.stack(losses).sum(), torch.stack(gts).sum(), torch.stack(dists).sum(), agree,
                            compared, max_err)

    def load_student(self, weights: dict) -> None:
        """A checkpoint's weights; ones that do not fit this student (keys, shapes) are a one-line UserError, as
        for `train --resume`."""
        expected = self.student.state_dict()
        missing, unexpected = [k for k in expected if k not in weights], [k for k in weights if k not in expected]
        shapes = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or shapes:
            what = "; ".join(f"{name} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for name, keys in
                             (("missing", missing), ("unexpected", unexpected), ("other shape", shapes)) if keys)
            raise UserError(f"--resume: the checkpoint does not match this student ({what}); resume with the arch "
                            f"it was trained with, or start a new run in another --out")
        self.student.load_state_dict(weights)

    def load_optimizer(self, state: dict) -> None:
        # The optimizer's saved groups carry the old weight decay and lr scales; a resume may change them.
        fresh = [(g["weight_decay"], g["lr_scale"]) for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"--resume: the checkpoint's optimizer state does not match this student's parameters "
                            f"({e}); start a new run in another --out") from None
        for group, (decay, scale) in zip(self.optimizer.param_groups, fresh):
            group["weight_decay"], group["lr_scale"] = decay, scale
