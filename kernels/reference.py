"""Pure-torch reference for the masked smooth-L1 distillation loss.

This is the ground truth the Triton kernel is tested against and the implementation used on CPU
(``backend="auto"`` with CPU tensors).  Everything here is ordinary torch ops, so autograd, CPU,
CUDA and ``torch.compile`` all work; it never synchronises with the device (no ``.item()``, no
boolean indexing), so it is also a fair eager / compiled baseline in the benchmark.

Definition (``beta > 0``; ``beta == 0`` is plain L1 as in ``F.smooth_l1_loss``)::

    t      = target                       (float targets)
           = code.float() * scale[b, t]   (int8 / float8_e4m3fn codes)
           = (n - 7.5) * scale[b, t, c // 32]   (int4: uint8 target [B, T, ceil(D/2)], nibble n of channel c:
                                                 low nibble of byte c // 2 for even c, high for odd c)
    d      = pred.float() - t
    l(d)   = 0.5 * d**2 / beta            if |d| < beta
           = |d| - 0.5 * beta             otherwise
    loss   = sum_{selected tokens, all D} l(d) / max(1, n_selected_tokens * D)

The loss is float32 (0-d); the gradient w.r.t. ``pred`` comes back in ``pred.dtype``; ``target``
and ``scale`` never receive a gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from g2sd_cache.cache.codecs import CODECS, INT4_GROUP
from g2sd_cache.cache.codecs import decode as decode_codes

__all__ = [
    "FLOAT_DTYPES",
    "CODE_DTYPES",
    "decode_target",
    "masked_smooth_l1_reference",
    "validate_inputs",
]

#: dtypes accepted for ``pred`` (and for float ``target``).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: quantised target code dtypes; int8 / float8_e4m3fn require a per-token float32 ``scale`` [B, T];
#: uint8 means int4 codes packed two per byte ([B, T, ceil(D/2)]) with a float16 ``scale`` [B, T, ceil(D/32)].
CODE_DTYPES = tuple(
    dt for dt in (torch.int8, getattr(torch, "float8_e4m3fn", None), torch.uint8) if dt is not None
)
INT4 = CODECS["int4"]


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def validate_inputs(pred, target, scale, token_mask, beta) -> None:
    """Raise a one-line ``ValueError`` for any shape / dtype / device mismatch."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError("masked_smooth_l1: pred and target must be torch.Tensors")
    if pred.dim() != 3:
        raise ValueError(
            f"masked_smooth_l1: pred must be 3-D [B, T, D], got shape {tuple(pred.shape)}"
        )
    if pred.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"masked_smooth_l1: pred dtype must be one of {_dtype_names(FLOAT_DTYPES)}, got {pred.dtype}"
        )
    B, T, D = pred.shape
    is_int4 = target.dtype == torch.uint8
    want = (B, T, INT4.code_width(D)) if is_int4 else tuple(pred.shape)
    if tuple(target.shape) != want:
        what = f"int4 codes need [B, T, ceil(D/2)] = {list(want)}" if is_int4 else f"!= pred shape {tuple(pred.shape)}"
        raise ValueError(f"masked_smooth_l1: target shape {tuple(target.shape)} {what}")
    if target.device != pred.device:
        raise ValueError(
            f"masked_smooth_l1: target is on {target.device} but pred is on {pred.device}"
        )
    is_code = target.dtype in CODE_DTYPES
    if not is_code and target.dtype not in FLOAT_DTYPES:
        raise ValueError(
            "masked_smooth_l1: target dtype must be one of "
            f"{_dtype_names(FLOAT_DTYPES + CODE_DTYPES)}, got {target.dtype}"
        )
    if is_code:
        scale_dtype, scale_shape = (torch.float16, (B, *INT4.scale_shape(T, D))) if is_int4 else (torch.float32, (B, T))
        layout = f"int4 (uint8) codes need a float16 scale [B, T, ceil(D/{INT4_GROUP})]" if is_int4 else \
            f"{target.dtype} target codes need a float32 scale of shape [B, T]"
        if scale is None:
            raise ValueError(f"masked_smooth_l1: {layout}")
        if not isinstance(scale, torch.Tensor):
            raise ValueError("masked_smooth_l1: scale must be a torch.Tensor")
        if scale.dtype != scale_dtype:
            raise ValueError(f"masked_smooth_l1: scale must be {str(scale_dtype)[6:]}, got {scale.dtype} ({layout})")
        if tuple(scale.shape) != scale_shape:
            raise ValueError(f"masked_smooth_l1: scale shape {tuple(scale.shape)} != {list(scale_shape)} ({layout})")
        if scale.device != pred.device:
            raise ValueError(
                f"masked_smooth_l1: scale is on {scale.device} but pred is on {pred.device}"
            )
    elif scale is not None:
        raise ValueError(
            f"masked_smooth_l1: scale is only valid with int8/float8/int4 target codes, not a {target.dtype} target"
        )
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor):
            raise ValueError("masked_smooth_l1: token_mask must be a torch.Tensor or None")
        if token_mask.dtype != torch.bool:
            raise ValueError(f"masked_smooth_l1: token_mask must be bool, got {token_mask.dtype}")
        if tuple(token_mask.shape) != (B, T):
            raise ValueError(
                f"masked_smooth_l1: token_mask shape {tuple(token_mask.shape)} != [B, T] = {(B, T)}"
            )
        if token_mask.device != pred.device:
            raise ValueError(
                f"masked_smooth_l1: token_mask is on {token_mask.device} but pred is on {pred.device}"
            )
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise ValueError(f"masked_smooth_l1: beta must be a Python number, got {type(beta).__name__}")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"masked_smooth_l1: beta must be finite and >= 0, got {beta}")


def decode_target(target: torch.Tensor, scale: torch.Tensor | None, width: int) -> torch.Tensor:
    """Target values [B, T, width] in float32, detached: ``target.float()``, ``code.float() * scale[..., None]``,
    or int4 codes unpacked and scaled per group (``g2sd_cache.cache.codecs.decode``)."""
    if target.dtype == torch.uint8:
        return decode_codes(INT4, target.detach(), scale.detach(), width)
    t = target.detach().float()
    if scale is not None:
        t = t * scale.detach().unsqueeze(-1)
    return t


def masked_smooth_l1_reference(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    beta: float = 2.0,
) -> torch.Tensor:
    """Torch reference of :func:`g2sd_cache.kernels.masked_smooth_l1` (same contract).

    Unselected tokens are zeroed in *both* operands with ``torch.where`` (so ``d == 0`` there: zero
    loss and zero gradient, and NaN/inf garbage in unselected rows cannot leak into the result);
    the count of selected elements stays on the device, so nothing here synchronises.
    """
    validate_inputs(pred, target, scale, token_mask, beta)
    p = pred.float()
    t = decode_target(target, scale, pred.shape[-1])
    if token_mask is None:
        if p.numel() == 0:
            return p.sum()  # 0.0, keeps the graph; F.smooth_l1_loss(mean) of nothing is NaN
        return F.smooth_l1_loss(p, t, reduction="mean", beta=float(beta))
    m = token_mask.unsqueeze(-1)
    p = torch.where(m, p, 0.0)
    t = torch.where(m, t, 0.0)
    total = F.smooth_l1_loss(p, t, reduction="sum", beta=float(beta))
    count = token_mask.sum() * pred.shape[-1]  # int64 on device
    return total / count.clamp_min(1)
