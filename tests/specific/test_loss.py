"""The specific-distillation loss against G2SD's formula, written out independently in numpy."""
import numpy as np
import pytest
import torch

from g2sd_cache.specific.loss import sd_loss
from g2sd_cache.specific.mix import MixParams, apply_mix


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def official_loss(cls_logits, dist_logits, soft_targets, teacher_logits) -> float:
    """engine_finetune_dis.py: (SoftTargetCrossEntropy(outputs, targets) + cross_entropy(distill_pred,
    teacher_out.argmax(-1))) / 2, with SoftTargetCrossEntropy = mean_i sum_c -t_ic log softmax(z_i)_c."""
    loss_gt = np.mean(np.sum(-soft_targets * _log_softmax(cls_logits), axis=1))
    hard = teacher_logits.argmax(axis=1)
    loss_dist = np.mean(-_log_softmax(dist_logits)[np.arange(len(hard)), hard])
    return (loss_gt + loss_dist) / 2


def _case(seed: int, n: int = 6, classes: int = 9):
    g = torch.Generator().manual_seed(seed)
    cls_logits, dist_logits, teacher = (torch.randn(n, classes, generator=g) * 3 for _ in range(3))
    labels = torch.randint(0, classes, (n,), generator=g)
    _, targets = apply_mix(torch.zeros(n, 1, 2, 2), labels, MixParams(0.37, False), classes, 0.1)
    return cls_logits, dist_logits, teacher, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distillation_loss_equals_the_official_formula(seed):
    cls_logits, dist_logits, teacher, targets = _case(seed)
    loss, parts = sd_loss((cls_logits, dist_logits), targets, teacher.argmax(-1))
    want = official_loss(cls_logits.numpy(), dist_logits.numpy(), targets.numpy(), teacher.numpy())
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert ((parts["loss_gt"] + parts["loss_dist"]) / 2).item() == pytest.approx(want, rel=1e-6)
    assert not parts["loss_gt"].requires_grad


def test_low_precision_logits_are_reduced_in_float32():
    cls_logits, dist_logits, teacher, targets = _case(3)
    half = (cls_logits.bfloat16(), dist_logits.bfloat16())
    loss, _ = sd_loss(half, targets, teacher.argmax(-1))
    want = official_loss(half[0].float().numpy(), half[1].float().numpy(), targets.numpy(), teacher.numpy())
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want, rel=1e-6)


def test_both_heads_get_gradients():
    cls_logits, dist_logits, teacher, targets = _case(4)
    cls_logits.requires_grad_(), dist_logits.requires_grad_()
    sd_loss((cls_logits, dist_logits), targets, teacher.argmax(-1))[0].backward()
    assert cls_logits.grad.abs().sum() > 0 and dist_logits.grad.abs().sum() > 0


def test_plain_finetuning_loss_is_soft_target_cross_entropy():
    cls_logits, _, _, targets = _case(5)
    loss, parts = sd_loss(cls_logits, targets)
    want = np.mean(np.sum(-targets.numpy() * _log_softmax(cls_logits.numpy()), axis=1))
    assert loss.item() == pytest.approx(want, rel=1e-6) and set(parts) == {"loss_gt"}


def test_mismatched_inputs_are_refused():
    cls_logits, dist_logits, teacher, targets = _case(6)
    with pytest.raises(ValueError, match="needs the teacher"):
        sd_loss((cls_logits, dist_logits), targets)
    with pytest.raises(ValueError, match="no distillation head"):
        sd_loss(cls_logits, targets, teacher.argmax(-1))
