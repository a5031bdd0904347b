"""FLOPs per sample of the models, from `torch.utils.flop_counter` (part of the step section).

- student: forward + backward of the G2SD student on one view's visible patches at the view geometry's
  mask ratio (0.75: 49 of 196 patches), with the product's loss (whose elementwise ops the counter does
  not count: it counts matrix multiplies, convolutions and attention).
- teacher: the forward that makes one view's target (`targets_visible`: encoder on the visible patches,
  the first `target_layer` decoder blocks on all tokens). No backward: the teacher is frozen.

Attention runs through PyTorch's math kernel while counting: the counter has no formula for the fused
CPU attention kernel, so it would leave attention out on CPU; the math kernel's matrix multiplies are the
same FLOPs the fused kernels do.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from g2sd_cache.benchmarks.common import SEED

VIEWS = 2   # samples per count (the figure is per sample; a batch of 2 checks nothing depends on B = 1)


def _views(geometry, n: int = VIEWS) -> tuple[torch.Tensor, torch.Tensor]:
    """n random views: normalised visible patches [n, n_keep, p*p*3] and masks [n, L]."""
    from g2sd_cache.data.views import normalize_patches, random_mask

    g = geometry
    rng = np.random.default_rng(SEED)
    mask = torch.from_numpy(np.stack([random_mask(rng, g.num_patches, g.num_visible) for _ in range(n)]))
    patches = torch.randint(0, 256, (n, g.num_visible, g.patch_size, g.patch_size, 3), dtype=torch.uint8)
    return normalize_patches(patches), mask


def _count(fn) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / VIEWS / 1e9


def student_gflop(student: torch.nn.Module, geometry) -> float:
    """GFLOP per sample of the student's forward + backward (its gradients are cleared afterwards)."""
    from g2sd_cache.kernels import masked_smooth_l1

    patches, mask = (t.to(next(student.parameters()).device) for t in _views(geometry))

    def step():
        pred = student(patches, mask)
        masked_smooth_l1(pred, torch.zeros_like(pred), beta=2.0).backward()

    gflop = _count(step)
    student.zero_grad(set_to_none=True)
    return gflop


def teacher_gflop(teacher: torch.nn.Module, geometry, target_layer: int) -> float:
    """GFLOP per sample of the teacher's target forward."""
    patches, mask = (t.to(next(teacher.parameters()).device) for t in _views(geometry))
    return _count(lambda: teacher.targets_visible(patches, mask, target_layer))


def default_student_gflop(target_dim: int, geometry) -> float:
    """The default student's (train's `--student` default) forward + backward, built here on the CPU."""
    from g2sd_cache.models.mae import DEFAULT_STUDENT, build_student

    return student_gflop(build_student(DEFAULT_STUDENT, target_dim, geometry.img_size, seed=SEED), geometry)
