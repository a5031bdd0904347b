"""The arithmetic a run's student trains in, from its `--precision` flag and the device."""
from __future__ import annotations

from contextlib import nullcontext

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


# The teacher's own arithmetic (extract, replay, online, verify --deep, extract-logits): its error lands in every
# stored target, for a cost paid once, so it is chosen apart from the student's.
TEACHER_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_teacher_precision(precision: str, device: torch.device, auto: str = "fp16") -> str:
    """`auto` is `auto` (fp16: G2SD's stage-1 teacher runs under torch.cuda.amp.autocast, engine_distill.py) on
    CUDA and fp32 on CPU, where fp16 autocast is not supported; stage 2 passes auto="fp32" (its teacher runs
    outside autocast, engine_finetune_dis.py)."""
    if precision not in TEACHER_PRECISIONS:
        raise UserError(f"--teacher-precision {precision}: choose one of {', '.join(TEACHER_PRECISIONS)}")
    resolved = precision if precision != "auto" else (auto if device.type == "cuda" else "fp32")
    if device.type != "cuda" and resolved == "fp16":
        raise UserError("--teacher-precision fp16 needs CUDA; use fp32 (or bf16) on CPU")
    if resolved == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--teacher-precision bf16: this GPU has no bf16; use fp16 or fp32")
    return resolved


def teacher_autocast(precision: str, device: torch.device):
    """A context-manager factory running the teacher in `precision` (a resolved value)."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if amp is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=amp)


def recorded_precision(precision: str) -> str:
    """How a manifest records a resolved teacher precision: fp32, fp16-autocast or bf16-autocast."""
    return precision if precision == "fp32" else f"{precision}-autocast"


def replay_precision(requested: str | None, recorded: str, device: torch.device, auto: str = "fp16") -> str:
    """The arithmetic of a teacher replayed against a cache (verify --deep): `requested` if given, else the one
    the cache records (fp32, fp16-autocast, bf16-autocast) where `device` can run it (fp16 needs CUDA), else fp32."""
    if requested is not None:
        return resolve_teacher_precision(requested, device, auto)
    stored = recorded.split("-")[0]
    return "fp32" if stored == "fp16" and device.type != "cuda" else stored
