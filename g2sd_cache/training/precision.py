"""The arithmetic a run's student trains in, from its `--precision` flag and the device."""
from __future__ import annotations

import torch

from g2sd_cache.common.errors import UserError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA (G2SD's fp16 with a loss scaler is `fp16`) and fp32 on CPU, where fp16
    autocast is not supported."""
    resolved = precision if precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu" and resolved == "fp16":
        raise UserError("--precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    return resolved
