"""Fused kernels for G2SD distillation (imported as ``g2sd_cache.kernels``).

``masked_smooth_l1`` is the distillation loss: Triton on CUDA tensors (loss and derivative in one
pass, targets decoded in-kernel from fp32/bf16/fp16 values or int8/fp8/int4 codes), the pure-torch
``masked_smooth_l1_reference`` on CPU.  Set ``TRITON_INTERPRET=1`` before importing this package to run
the Triton kernel on CPU tensors (``backend="triton"``) for tests.  ``python -m
g2sd_cache.kernels.compile_check`` (with ``TRITON_INTERPRET=0``) compiles every variant for sm_80 / sm_90
without a GPU.
"""

from .fused_smooth_l1 import masked_smooth_l1, triton_available
from .reference import CODE_DTYPES, FLOAT_DTYPES, masked_smooth_l1_reference

__all__ = [
    "CODE_DTYPES",
    "FLOAT_DTYPES",
    "masked_smooth_l1",
    "masked_smooth_l1_reference",
    "triton_available",
]
