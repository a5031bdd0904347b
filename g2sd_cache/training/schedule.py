"""The learning-rate schedule (MAE / G2SD): linear warm-up, then half-cycle cosine to `min_lr`."""
from __future__ import annotations

import math


def get_lr(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based). A pure function, so a resumed run agrees."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(blr: float, effective_batch: int) -> float:
    """MAE's linear scaling rule: lr = blr * effective batch / 256."""
    return blr * effective_batch / 256
