"""The specific stage's loss: DeiT's hard distillation, as G2SD's engine_finetune_dis.py computes it.

    loss = ( SoftTargetCE(cls_logits, mixed smoothed labels) + CE(dist_logits, argmax of the teacher) ) / 2

The teacher's argmax is taken on the same mixed input the student sees (live, or read from a logits cache).
Without a teacher (plain fine-tuning, MAE's recipe) the loss is the soft-target cross-entropy alone.
Both terms are computed in float32 whatever the logits' dtype, as autocast does for log-softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

_soft_ce = SoftTargetCrossEntropy()


def sd_loss(outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor,
            teacher_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """outputs: the student's training-mode output — (cls_logits [N, C], dist_logits [N, C]) for the distilled
    student, logits [N, C] for plain fine-tuning; targets: [N, C] soft labels (sd_mix.apply_mix);
    teacher_labels: [N] int64, the teacher's argmax per sample (required with a distilled student).
    returns (loss, parts) with parts['loss_gt'] and, when distilling, parts['loss_dist'] (detached)."""
    if isinstance(outputs, (tuple, list)):
        if teacher_labels is None:
            raise ValueError("a distilled student's loss needs the teacher's labels (argmax)")
        cls_logits, dist_logits = outputs
        loss_gt = _soft_ce(cls_logits.float(), targets.float())
        loss_dist = F.cross_entropy(dist_logits.float(), teacher_labels)
        return (loss_gt + loss_dist) / 2, {"loss_gt": loss_gt.detach(), "loss_dist": loss_dist.detach()}
    if teacher_labels is not None:
        raise ValueError("teacher labels were given but the student has no distillation head")
    loss_gt = _soft_ce(outputs.float(), targets.float())
    return loss_gt, {"loss_gt": loss_gt.detach()}
