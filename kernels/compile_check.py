"""Compile every variant of the fused loss kernels for real NVIDIA targets, without a GPU.

    TRITON_INTERPRET=0 python -m g2sd_cache.kernels.compile_check [--arch 80 90] [--all] [--jobs N]

CI has no GPU and the interpreter runs the kernels' Python, not their compiled code.  This lowers each
variant through Triton's whole pipeline (TTIR -> TTGIR -> LLVM -> PTX) and assembles it with the ``ptxas``
shipped in the triton wheel, for ``GPUTarget("cuda", arch, 32)``: a variant that would fail to compile
on an A100 (sm_80) or H100/H200 (sm_90) fails here.  It also reads ptxas's resource report (registers,
spill bytes, shared memory) for each variant.

Variants (``launch_variants``) mirror what ``fused_smooth_l1._forward`` launches:

* forward: pred dtype (fp32 / bf16 / fp16) x target (fp32 -- the live teacher's, online and replay --
  and the cache codecs fp16 / bf16 / int8 / fp8 / int4) x token mask or not x gradient written (in
  pred's dtype) or not, at the launch config ``_launch_config`` gives the trainer for D = 512 and 768
  (its batches have B * T >= 17 rows: one config per D).  fp8 is compiled as each arch launches it:
  bit decoding on sm_80, native float8e4nv from sm_89 on.
* backward: the in-place gradient scaling for each pred dtype.
* ``--all`` adds what the trainer never launches: the fp32 gradient buffer (``fp32_grad_buffer=True``)
  and its fp32 -> bf16 / fp16 backward, and the smaller tiles ``_launch_config`` picks for inputs of
  fewer than 8 rows (1,354 variants in all, against 294).

Identical variants are compiled once (fp32 preds store their derivative in fp32 with either buffer
setting).  Arguments are specialised as the JIT specialises a trainer launch: 16-byte aligned pointers
(fresh torch tensors), D and the element count divisible by 16; ``n_rows`` = B * 197 is not assumed
divisible by 16.  Each variant costs ~0.25 s of CPU; ``--jobs`` compiles in that many processes.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from . import fused_smooth_l1 as K

#: triton pointer types of the tensors the kernels take
PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "int8": "*i8", "uint8": "*u8", "fp8": "*fp8e4nv"}
PRED_DTYPES = ("fp32", "bf16", "fp16")
#: target name -> (target storage, scale storage or None); fp8 is decided per arch (`_target_kind`)
TARGETS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "fp16": ("fp16", None), "int8": ("int8", "fp32"),
           "fp8": ("fp8", "fp32"), "int4": ("uint8", "fp16")}
WIDTHS = (512, 768)
TRAINER_TOKENS = (17, 197)   # the smallest (micro teacher, 64 px) and the usual (224 px) token counts


@dataclass(frozen=True)
class Variant:
    kernel: str                 # "fwd" or "scale_grad"
    arch: int                   # compute capability as an int: 80, 90
    pred: str                   # fwd: pred dtype; scale_grad: stored derivative dtype
    target: str = ""            # fwd: target name (TARGETS); scale_grad: gradient dtype
    mask: bool = False
    grad: str | None = None     # fwd: dtype of the stored derivative, None = no gradient
    block_rows: int = 0
    block_d: int = 0
    num_warps: int = 8

    def label(self) -> str:
        if self.kernel == "scale_grad":
            return f"sm_{self.arch} scale_grad {self.pred}->{self.target}"
        return (f"sm_{self.arch} fwd pred={self.pred} target={self.target} mask={int(self.mask)} grad={self.grad} "
                f"tile={self.block_rows}x{self.block_d} warps={self.num_warps}")


def _target_kind(target: str, arch: int) -> tuple[int, str]:
    """(TARGET_KIND, target pointer dtype) as `_forward` picks them on a GPU of this arch."""
    storage = TARGETS[target][0]
    if target == "fp8":
        native = (arch // 10, arch % 10) >= K.NATIVE_FP8_CAPABILITY
        return (K._KIND_FP8_NATIVE, "fp8") if native else (K._KIND_FP8_BITS, "uint8")
    kinds = {"int8": K._KIND_INT8, "int4": K._KIND_INT4}
    return kinds.get(target, K._KIND_FLOAT), storage


def launch_configs(width: int, every: bool) -> list[tuple[int, int, int]]:
    """`_launch_config` results for this width: the trainer's (B * T rows, T in TRAINER_TOKENS), or every one."""
    rows = range(1, 9) if every else [b * t for t in TRAINER_TOKENS for b in (1, 2, 64)]
    return sorted({K._launch_config(n, width) for n in rows})


def launch_variants(archs=(80, 90), every: bool = False) -> list[Variant]:
    """Every distinct kernel variant launched for these archs (module docstring); `every` adds --all's."""
    out: dict[tuple, Variant] = {}
    for arch in archs:
        for width in WIDTHS:
            for (rows, bd, warps), pred, target, mask in itertools.product(
                    launch_configs(width, every), PRED_DTYPES, TARGETS, (False, True)):
                for grad in (None, pred) + (("fp32",) if every else ()):
                    v = Variant("fwd", arch, pred, target, mask, grad, rows, bd, warps)
                    out.setdefault(_key(v), v)
        for pred in PRED_DTYPES:
            for grad in (pred,) + (("fp32",) if every else ()):
                v = Variant("scale_grad", arch, grad, pred)
                out.setdefault(_key(v), v)
    return list(out.values())


def _key(v: Variant) -> tuple:
    source = _source_spec(v)
    return (v.kernel, v.arch, tuple(sorted(source[0].items())), tuple(sorted(source[1].items())), v.num_warps)


def _source_spec(v: Variant) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of the launch, as `_forward` / `_scale_grad` make it."""
    div16 = [["tt.divisibility", 16]]
    if v.kernel == "scale_grad":
        sig = {"src_ptr": PTR[v.pred], "dst_ptr": PTR[v.target], "inv_count_ptr": "*fp32", "grad_out_ptr": "*fp32",
               "n_elements": "i32", "BLOCK": "constexpr"}
        return sig, {"BLOCK": K._SCALE_BLOCK}, {(i,): div16 for i in range(5)}
    kind, target_dtype = _target_kind(v.target, v.arch)
    scale = TARGETS[v.target][1]
    sig = {
        "pred_ptr": PTR[v.pred], "target_ptr": PTR[target_dtype],
        "scale_ptr": PTR[scale or "fp32"],        # a dummy fp32 pointer for float targets
        "mask_ptr": PTR["uint8"] if v.mask else "*fp32",
        "grad_ptr": PTR[v.grad or v.pred],        # pred itself when no gradient is written
        "partial_ptr": "*fp32", "n_rows": "i32", "D": "i32", "beta": "fp32", "beta_div": "fp32",
        "TARGET_KIND": "constexpr", "HAS_MASK": "constexpr", "WRITE_GRAD": "constexpr",
        "BLOCK_ROWS": "constexpr", "BLOCK_D": "constexpr", "GROUP": "constexpr",
    }
    constexprs = {"TARGET_KIND": kind, "HAS_MASK": v.mask, "WRITE_GRAD": v.grad is not None,
                  "BLOCK_ROWS": v.block_rows, "BLOCK_D": v.block_d, "GROUP": K.INT4_GROUP}
    attrs = {(i,): div16 for i in range(6)} | {(7,): div16}     # the six pointers, and D
    return sig, constexprs, attrs


_PTXAS = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
          "spill_loads": r"(\d+) bytes spill loads"}


def compile_variant(v: Variant) -> dict:
    """Compile one variant to a cubin. Returns {label, seconds, registers, spill_stores, spill_loads, shared,
    cubin_bytes}; raises what triton raises when it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = K._masked_smooth_l1_fwd_kernel if v.kernel == "fwd" else K._scale_grad_kernel
    sig, constexprs, attrs = _source_spec(v)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):   # ptxas -v's report, printed by triton when dump_ptxas_log is set
        compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", v.arch, 32),
                                  options={"num_warps": v.num_warps})
    out = {"label": v.label(), "seconds": time.perf_counter() - t0, "shared": compiled.metadata.shared,
           "cubin_bytes": len(compiled.asm["cubin"])}
    for name, pattern in _PTXAS.items():
        found = re.findall(pattern, log.getvalue())
        out[name] = max(map(int, found)) if found else None
    return out


def _init_worker(cache_dir: str) -> None:
    import triton
    os.environ["TRITON_CACHE_DIR"] = cache_dir   # fresh: every variant really compiles (and reports ptxas's log)
    triton.knobs.cache.dir = cache_dir
    triton.knobs.nvidia.dump_ptxas_log = True


def compile_all(variants: list[Variant], jobs: int = 1) -> list[dict]:
    """Compile `variants` in `jobs` processes (spawned: they import the kernels with TRITON_INTERPRET=0)."""
    if K._INTERPRET:
        raise RuntimeError("compile_check needs TRITON_INTERPRET=0: with the interpreter on, the kernels are "
                           "Python functions, not compilable Triton kernels")
    import multiprocessing as mp
    with tempfile.TemporaryDirectory(prefix="g2sd-triton-cache-") as cache_dir:
        if jobs <= 1:
            _init_worker(cache_dir)
            return [compile_variant(v) for v in variants]
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(cache_dir,)) as pool:
            return list(pool.map(compile_variant, variants, chunksize=max(1, len(variants) // (4 * jobs))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--all", action="store_true", help="also the variants the trainer never launches")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: all cores)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the per-variant results to PATH")
    args = ap.parse_args(argv)
    variants = launch_variants(tuple(args.arch), every=args.all)
    t0 = time.perf_counter()
    results = compile_all(variants, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": time.perf_counter() - t0, "jobs": args.jobs, "variants": results}, f, indent=1)
    for r in results:
        print(f"{r['label']:90s} regs {r['registers']} spill {r['spill_stores']}/{r['spill_loads']} B "
              f"shared {r['shared']} B  {r['seconds']:.2f} s")
    print(f"{len(results)} variants compiled in {time.perf_counter() - t0:.1f} s with {args.jobs} process(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
