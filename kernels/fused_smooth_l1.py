"""Fused masked smooth-L1 distillation loss: one Triton pass for the loss *and* its derivative.

Math
----
Per element (fp32 everywhere, whatever the storage dtypes)::

    t      = target                      float targets (fp32 / bf16 / fp16)
           = code.float() * scale[row]   int8 or float8_e4m3fn codes, per-token fp32 scale
           = (n - 7.5) * scale[row, c // 32]   int4: nibble n of byte c // 2 (low nibble for even c),
                                         fp16 scale per group of 32 channels (g2sd_cache.cache.codecs)
    d      = pred - t
    l(d)   = 0.5 * d * d / beta          if |d| < beta
           = |d| - 0.5 * beta            otherwise          (beta == 0: plain L1)
    l'(d)  = d / beta                    if |d| < beta
           = sign(d)                     otherwise

    N_sel  = (#selected tokens) * D      (all B*T tokens when token_mask is None)
    loss   = sum_{selected rows, all D} l(d) / max(N_sel, 1)
    dL/dpred[r, :] = l'(d[r, :]) / max(N_sel, 1)   for selected rows r, 0 for the others

The loss is linear in its per-element terms, so its gradient depends only on the element itself and
on the normaliser ``1 / N_sel``.  Like Liger-Kernel's losses, the forward kernel therefore writes the
raw derivative ``l'(d)`` while it has ``pred`` and ``target`` in registers; the backward pass is one
elementwise multiply, ``grad_pred = l'(d) * (inv_count * grad_output)`` (see "Gradient precision").

Layout
------
``pred``/``target`` are viewed as [N = B*T, D] rows.  Each program owns ``BLOCK_ROWS`` consecutive
rows and walks D in chunks of ``BLOCK_D`` columns (a single chunk unless D > 4096).  Unselected
(masked-out) rows are never read -- their loads are masked off -- and get a zero gradient.  Every
program writes one fp32 partial sum into ``partials[pid]``; the loss is ``partials.sum() *
(1 / N_sel)`` in torch.  Both levels of the reduction have a fixed order (Triton's in-register
tree reduction for a fixed config, then torch's deterministic sum over a fixed-size buffer), and
there are no atomics, so two runs give bitwise-equal loss and gradient.

``N_sel`` comes from ``token_mask.sum() * D`` and ``1 / N_sel`` is computed on the device (fp64,
then fp32), applied to the loss in torch and read by the backward kernel through a pointer: nothing
in forward or backward calls ``.item()`` or otherwise synchronises on CUDA.

Row offsets are formed as ``row.to(int64) * D`` so B*T*D beyond 2**31 elements is fine.

Block-size rule (``_launch_config``)
-----------------------------------
* ``BLOCK_D = min(next_pow2(D), 4096)``: a row (or a 4096-wide chunk of it) is one vector of the
  tile; D=500 -> 512 (2% idle lanes), D=512 -> 512, D=768 -> 1024.
* ``BLOCK_ROWS = clamp(4096 // BLOCK_D, 1, next_pow2(N))``: tiles of ~4096 elements, enough bytes in
  flight per program for a memory-bound pass without spilling (D=512 -> 8 rows per program, i.e.
  6304 programs for B=256, T=197), and no pointlessly large tiles for tiny inputs.
* ``num_warps = 8`` for a 4096-element tile (16 elements = 32 bytes of bf16 per thread per
  tensor, two 16-byte vector loads), ``4`` for smaller tiles (small D times few rows), ``2`` below
  512 elements.

float8_e4m3fn targets
---------------------
Triton's native fp8e4nv conversion needs sm_89+ on NVIDIA GPUs.  On those GPUs the kernel loads
the codes as fp8 and converts them natively; elsewhere (older GPUs, and by default in the Triton
interpreter) it views the codes as uint8 and decodes the e4m3fn bits with integer arithmetic and a
bitcast (exact, NaN code 0x7F/0xFF included).  The interpreter can run both paths; its native fp8
conversion only mis-decodes the NaN codes, which a teacher cache never holds.

int4 targets
------------
The target is uint8 [N, ceil(D/2)]; the kernel loads the byte of each column (``col // 2``; the two
columns of a byte hit the same address, which the cache serves) and shifts out its nibble, and loads
the column's fp16 group scale the same way (``col // 32``).  ``(n - 7.5) * scale`` is exact in fp32,
so the kernel sees the same target values as ``codecs.decode``.

Gradient precision (why the forward stores ``l'(d)``, and in which dtype)
--------------------------------------------------------------------------
``1 / N_sel`` is tiny (197 x 512 targets at batch 64: 1.5e-7, fp16's subnormal range), and GradScaler's
factor (65536 x the trainer's per-step factor / accumulation) only arrives as ``grad_output`` in the
backward.  Storing ``l'(d) / N_sel`` in fp16 therefore rounded every gradient element to a few multiples
of 6e-8 before it was scaled (measured at [64, 197, 512]: 16.7 % relative error against fp64, 10 % zeros).
The forward stores the raw derivative instead: ``|l'(d)| <= 1``, its sign exact, ``d / beta`` rounded once.
The backward computes ``inv_count * grad_output`` and the product with ``l'(d)`` in fp32 and rounds once
to ``pred.dtype``; with ``grad_output != 1`` this is the hot path, not an edge case.

The stored derivative is in ``pred.dtype`` by default, float32 when the caller passes
``fp32_grad_buffer=True``.  Default: the pass is memory-bound, and the buffer's bytes are its time: with
a bf16 prediction and int8 targets the default moves 5 + 4 = 9 bytes per element (forward reads pred and
target and writes l'; backward reads and writes the gradient in place), the fp32 buffer 7 + 6 = 13 (+44 %),
and holds 4 instead of 2 bytes per element from forward to backward.  The price is a second rounding,
and it is small because half the elements sit in the exact ``sign(d)`` branch or close to it: relative
gradient error against fp64 at [64, 197, 512] with grad_output = 65536 x 0.93 / 2
(``TRITON_INTERPRET=1 python benchmarks/loss.py --device cpu --precision``): fp16 3.6e-4 (fp32 buffer
and torch reference 3.5e-4; before this design 1.7e-1, with 10 % zeros); bf16 2.1e-3 when rounding to
nearest as a GPU does (fp32 buffer and torch 1.9e-3), 4.9e-3 under the interpreter, which truncates
fp32 -> bf16 (4.3e-3 with the fp32 buffer).
``benchmarks/loss.py`` times both buffers on a GPU (``triton_fused``, ``triton_fused_fp32buf``); no GPU has
run it yet, so the default rests on the byte count above.

Backward
--------
One elementwise kernel, ``out = stored * (inv_count * grad_output)``; ``inv_count`` and ``grad_output``
are device tensors read through pointers, so nothing synchronises with the host.  With the default
buffer ``out`` *is* the stored buffer (scaled in place and handed to autograd), so a second backward
through the same graph (``retain_graph=True``) is refused with a clear error instead of silently
returning a gradient scaled twice; the fp32 buffer is left intact, and backward may run again.
"""

from __future__ import annotations

import contextlib
import os

import torch

from g2sd_cache.cache.codecs import INT4_GROUP
from .reference import masked_smooth_l1_reference, validate_inputs

try:  # the package must stay importable where Triton is missing (CPU-only / non-Linux installs)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None

__all__ = ["masked_smooth_l1", "triton_available"]

#: ``triton.jit`` decides between compiled and interpreted kernels when the function is decorated,
#: i.e. when this module is imported: record what it saw.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Test hook: force the float8 decode path ("native" or "bits"); None picks per device.
_FP8_DECODE: str | None = None

_FLOAT8 = getattr(torch, "float8_e4m3fn", None)

# TARGET_KIND constexpr values
_KIND_FLOAT, _KIND_INT8, _KIND_FP8_NATIVE, _KIND_FP8_BITS, _KIND_INT4 = 0, 1, 2, 3, 4

#: compute capability from which NVIDIA GPUs convert float8e4nv natively (older ones decode the bits)
NATIVE_FP8_CAPABILITY = (8, 9)

_MAX_BLOCK_D = 4096
_TILE = 4096
_SCALE_BLOCK = 4096


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _e4m3fn_bits_to_fp32(b):
        # b: int32 in [0, 255], the bits of a float8_e4m3fn code: s eeee mmm, bias 7, no inf,
        # NaN = s1111111.  Normal codes: shift eeee mmm into the fp32 exponent/mantissa fields and
        # rebias the exponent (+120 = 127 - 7).  Subnormals (eeee == 0): m * 2**-9.
        em = b & 0x7F
        bits = tl.where(em == 0x7F, 0x7FC00000, (em << 20) + (120 << 23))
        mag = bits.to(tl.float32, bitcast=True)
        mag = tl.where(em < 8, (em & 7).to(tl.float32) * 0.001953125, mag)
        return tl.where(b >= 0x80, -mag, mag)

    @triton.jit
    def _masked_smooth_l1_fwd_kernel(
        pred_ptr,  # [N, D] contiguous, fp32/bf16/fp16
        target_ptr,  # [N, D] contiguous, float, int8, fp8e4nv or uint8 (fp8 bits); int4: uint8 [N, ceil(D/2)]
        scale_ptr,  # codes only: [N] fp32; int4: [N, ceil(D/GROUP)] fp16
        mask_ptr,  # [N] uint8 (token_mask viewed as uint8; only when HAS_MASK)
        grad_ptr,  # [N, D] contiguous: l'(d), in pred's dtype or fp32 (only when WRITE_GRAD)
        partial_ptr,  # [num_programs] fp32
        n_rows,
        D,
        beta,
        beta_div,  # beta, or 1.0 when beta == 0 (the quadratic branch is then never taken)
        TARGET_KIND: tl.constexpr,
        HAS_MASK: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_D: tl.constexpr,
        GROUP: tl.constexpr,  # int4: channels per scale
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < n_rows
        if HAS_MASK:
            row_sel = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
        else:
            row_sel = row_ok
        row_off = rows.to(tl.int64) * D  # 64-bit element offsets
        if TARGET_KIND == 4:
            code_off = rows.to(tl.int64) * ((D + 1) // 2)  # packed bytes per row
            scale_off = rows.to(tl.int64) * ((D + GROUP - 1) // GROUP)  # groups per row
        elif TARGET_KIND != 0:
            s = tl.load(scale_ptr + rows, mask=row_sel, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            offs = row_off[:, None] + cols[None, :]
            ld = row_sel[:, None] & col_ok[None, :]
            # convert to fp32 right after the load (bf16 arithmetic is not supported everywhere,
            # and the Triton interpreter needs it)
            p = tl.load(pred_ptr + offs, mask=ld, other=0.0).to(tl.float32)
            if TARGET_KIND == 0:
                t = tl.load(target_ptr + offs, mask=ld, other=0.0).to(tl.float32)
            elif TARGET_KIND == 1:
                t = tl.load(target_ptr + offs, mask=ld, other=0).to(tl.float32) * s[:, None]
            elif TARGET_KIND == 2:
                # no `other`: casting a constant to fp8 fails in the interpreter; masked lanes are
                # discarded by the tl.where below
                t = tl.load(target_ptr + offs, mask=ld).to(tl.float32) * s[:, None]
            elif TARGET_KIND == 3:
                b = tl.load(target_ptr + offs, mask=ld, other=0).to(tl.int32)
                t = _e4m3fn_bits_to_fp32(b) * s[:, None]
            else:
                b = tl.load(target_ptr + code_off[:, None] + (cols // 2)[None, :], mask=ld, other=0).to(tl.int32)
                n = (b >> ((cols & 1) * 4)[None, :]) & 15
                sg = tl.load(scale_ptr + scale_off[:, None] + (cols // GROUP)[None, :], mask=ld, other=0.0)
                t = (n.to(tl.float32) - 7.5) * sg.to(tl.float32)
            d = p - t
            ad = tl.abs(d)
            inside = ad < beta
            loss = tl.where(inside, 0.5 * d * d / beta_div, ad - 0.5 * beta)
            acc += tl.sum(tl.where(ld, loss, 0.0), axis=1)
            if WRITE_GRAD:
                # the raw derivative, |l'(d)| <= 1: the normaliser and grad_output come in the backward
                sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
                g = tl.where(ld, tl.where(inside, d / beta_div, sgn), 0.0)
                # unselected rows inside the tensor get an explicit 0
                st = row_ok[:, None] & col_ok[None, :]
                tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=st)
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))

    @triton.jit
    def _scale_grad_kernel(src_ptr, dst_ptr, inv_count_ptr, grad_out_ptr, n_elements, BLOCK: tl.constexpr):
        # dst = src * (inv_count * grad_output): fp32 arithmetic, one rounding to dst's dtype (dst may be src)
        factor = tl.load(inv_count_ptr) * tl.load(grad_out_ptr).to(tl.float32)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n_elements
        g = tl.load(src_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(dst_ptr + offs, (g * factor).to(dst_ptr.dtype.element_ty), mask=m)


def _launch_config(n_rows: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps) -- see the module docstring for the rule."""
    block_d = min(triton.next_power_of_2(max(D, 1)), _MAX_BLOCK_D)
    block_rows = max(1, min(_TILE // block_d, triton.next_power_of_2(max(n_rows, 1))))
    tile = block_rows * block_d
    num_warps = 8 if tile >= 4096 else (4 if tile >= 512 else 2)
    return block_rows, block_d, num_warps


def _use_native_fp8(device: torch.device) -> bool:
    if _FP8_DECODE is not None:
        if _FP8_DECODE not in ("native", "bits"):
            raise ValueError(f"_FP8_DECODE must be 'native', 'bits' or None, got {_FP8_DECODE!r}")
        return _FP8_DECODE == "native"
    if _INTERPRET or device.type != "cuda" or torch.version.hip is not None:
        return False  # (ROCm GPUs use other fp8 variants natively: decode the bits there too)
    return torch.cuda.get_device_capability(device) >= NATIVE_FP8_CAPABILITY


def _check_triton_usable(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError("masked_smooth_l1(backend='triton') needs the triton package, which is not installed")
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if not _INTERPRET:
            raise RuntimeError(
                "masked_smooth_l1(backend='triton') on CPU tensors needs TRITON_INTERPRET=1 in the "
                "environment before g2sd_cache.kernels is imported; use CUDA tensors or backend='torch'"
            )
        return
    raise RuntimeError(f"masked_smooth_l1(backend='triton') does not support {device.type} tensors")


def _device_guard(device: torch.device):
    """Launch on the tensors' GPU even when it is not the current device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward(pred, target, scale, token_mask, beta: float, grad_dtype: torch.dtype | None):
    """Launch the fused pass.  Returns (loss fp32 0-d, l'(d) [B, T, D] in grad_dtype or None (no gradient
    wanted), inv_count fp32 [1] = 1 / max(N_sel, 1) on the device)."""
    B, T, D = pred.shape
    n_rows = B * T
    device = pred.device

    if token_mask is not None:
        count = token_mask.sum() * D  # int64, stays on the device
        inv_count = (1.0 / count.clamp_min(1).to(torch.float64)).to(torch.float32).reshape(1)
    else:
        inv_count = torch.full((1,), 1.0 / max(n_rows * D, 1), dtype=torch.float32, device=device)
    if pred.numel() == 0:
        loss = torch.zeros((), dtype=torch.float32, device=device)
        grad = torch.zeros((B, T, D), dtype=grad_dtype, device=device) if grad_dtype is not None else None
        return loss, grad, inv_count

    pred2 = pred.contiguous()
    target2 = target.contiguous()
    if target.dtype == torch.int8:
        kind = _KIND_INT8
    elif target.dtype == torch.uint8:
        kind = _KIND_INT4
    elif _FLOAT8 is not None and target.dtype == _FLOAT8:
        if _use_native_fp8(device):
            kind = _KIND_FP8_NATIVE
        else:
            kind = _KIND_FP8_BITS
            target2 = target2.view(torch.uint8)
    else:
        kind = _KIND_FLOAT
    mask2 = token_mask.contiguous().view(torch.uint8) if token_mask is not None else None

    block_rows, block_d, num_warps = _launch_config(n_rows, D)
    n_programs = triton.cdiv(n_rows, block_rows)
    partials = torch.empty(n_programs, dtype=torch.float32, device=device)
    grad = torch.empty((B, T, D), dtype=grad_dtype, device=device) if grad_dtype is not None else None

    with _device_guard(device):
        _masked_smooth_l1_fwd_kernel[(n_programs,)](
            pred2,
            target2,
            scale.contiguous() if kind != _KIND_FLOAT else inv_count,  # dummy pointer when unused
            mask2 if mask2 is not None else inv_count,
            grad if grad is not None else pred2,
            partials,
            n_rows,
            D,
            float(beta),
            float(beta) if beta > 0 else 1.0,
            TARGET_KIND=kind,
            HAS_MASK=mask2 is not None,
            WRITE_GRAD=grad is not None,
            BLOCK_ROWS=block_rows,
            BLOCK_D=block_d,
            GROUP=INT4_GROUP,
            num_warps=num_warps,
        )
    loss = (partials.sum() * inv_count).reshape(())
    return loss, grad, inv_count


def _scale_grad(stored: torch.Tensor, out: torch.Tensor, inv_count: torch.Tensor,
                grad_output: torch.Tensor) -> torch.Tensor:
    """out = stored * (inv_count * grad_output) (fp32, one rounding to out's dtype); out may be stored."""
    go = grad_output.detach().reshape(1).to(device=stored.device, dtype=torch.float32)
    n = stored.numel()
    if n:
        with _device_guard(stored.device):
            _scale_grad_kernel[(triton.cdiv(n, _SCALE_BLOCK),)](stored, out, inv_count, go, n, BLOCK=_SCALE_BLOCK,
                                                                num_warps=8)
    return out


class _MaskedSmoothL1Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, scale, token_mask, beta, grad_dtype):
        loss, stored, inv_count = _forward(pred, target, scale, token_mask, beta, grad_dtype)
        if stored is not None:
            ctx.save_for_backward(stored, inv_count)
            ctx.pred_dtype = pred.dtype
            ctx.grad_consumed = False
        else:
            ctx.mark_non_differentiable(loss)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        stored, inv_count = ctx.saved_tensors
        in_place = stored.dtype == ctx.pred_dtype
        if in_place and ctx.grad_consumed:
            raise RuntimeError(
                "masked_smooth_l1 (triton backend) scales its stored gradient in place and supports one "
                "backward per forward; pass fp32_grad_buffer=True or use backend='torch' to backpropagate "
                "twice (retain_graph=True)"
            )
        ctx.grad_consumed = True
        out = stored if in_place else torch.empty_like(stored, dtype=ctx.pred_dtype)
        return _scale_grad(stored, out, inv_count, grad_output), None, None, None, None, None


def masked_smooth_l1(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    beta: float = 2.0,
    backend: str = "auto",
    fp32_grad_buffer: bool = False,
) -> torch.Tensor:
    """Mean smooth-L1 between ``pred`` and the (possibly quantised) ``target`` over selected tokens.

    Args:
        pred: [B, T, D] float32 / bfloat16 / float16 student output.
        target: [B, T, D] float32 / bfloat16 / float16 values, or int8 / float8_e4m3fn codes, or int4 codes
            packed two per byte: uint8 [B, T, ceil(D/2)] (``g2sd_cache.cache.codecs``, codec "int4").
        scale: codes only (value = code.float() * scale): [B, T] float32 for int8 / float8; for int4
            [B, T, ceil(D/32)] float16 (value = (nibble - 7.5) * scale of the channel's group).
            Forbidden with float targets.
        token_mask: [B, T] bool, tokens to include (None: all).  All-false gives loss 0, grad 0.
        beta: smooth-L1 threshold (>= 0), as in ``F.smooth_l1_loss``.
        backend: "auto" (Triton for CUDA tensors, torch reference otherwise), "triton" or "torch".
        fp32_grad_buffer: Triton only: keep the derivative the forward stores for the backward in float32
            instead of pred's dtype: the gradient is rounded once instead of twice, for 4 more bytes moved
            and 2 more held per element with bf16/fp16 preds (module docstring, "Gradient precision").

    Returns:
        0-d float32 loss.  Its gradient w.r.t. ``pred`` is in ``pred.dtype``; ``target`` and
        ``scale`` are data and get no gradient.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"masked_smooth_l1: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not isinstance(fp32_grad_buffer, bool):
        raise ValueError(f"masked_smooth_l1: fp32_grad_buffer must be True or False, got {fp32_grad_buffer!r}")
    validate_inputs(pred, target, scale, token_mask, beta)
    if backend == "auto":
        use_triton = pred.device.type == "cuda" and triton is not None
    elif backend == "triton":
        _check_triton_usable(pred.device)
        use_triton = True
    else:
        use_triton = False
    if not use_triton:
        return masked_smooth_l1_reference(pred, target, scale=scale, token_mask=token_mask, beta=beta)
    grad_dtype = None
    if torch.is_grad_enabled() and pred.requires_grad:
        grad_dtype = torch.float32 if fp32_grad_buffer else pred.dtype
    return _MaskedSmoothL1Triton.apply(pred, target, scale, token_mask, float(beta), grad_dtype)
