"""Loss benchmark: fused Triton masked smooth-L1 vs the torch reference (eager and torch.compile).

Forward + backward of ``masked_smooth_l1`` on ViT-style shapes (T=197 tokens, D=512, B in {64, 256}),
bf16 predictions against bf16 targets, int8 targets with a per-token fp32 scale and int4 targets (two
codes per byte, fp16 scale per 32 channels).  The backward gets a GradScaler-sized ``grad_output``
(65536 x 0.93 / 2, what the trainer passes), the hot path of the kernel's backward.

Methods: ``triton_fused`` (the default: the forward stores l'(d) in pred's dtype), ``triton_fused_fp32buf``
(``fp32_grad_buffer=True``: stored in fp32, 4 more bytes per element moved), ``torch_eager`` and
``torch_compile`` (the reference).

Figures per (B, target dtype, method):

* ``time_ms``: median over repeats of one forward+backward (``torch.autograd.grad`` of the loss
  w.r.t. pred, so no gradient accumulation is timed).  On CUDA every repeat is bracketed by CUDA
  events; the GPU is first kept busy with ``torch.cuda._sleep`` while the host enqueues all repeats,
  so the events measure device time rather than Python launch overhead, and a 256 MiB buffer is
  zeroed before each repeat (outside the events) so the inputs do not sit in L2.
* ``GBps``: the bytes an ideal fused pass moves -- pred read, target read (+ its scale), the
  gradient written in pred's dtype -- divided by ``time_ms``.  (The kernel moves more: the forward
  writes l'(d) and the backward reads it back and writes the gradient; this figure is the ideal.)
* ``frac_of_copy``: ``GBps`` over the device-to-device copy bandwidth measured in the same process
  (``dst.copy_(src)`` of a large buffer, read + write bytes).
* ``peak_mem_MiB``: ``torch.cuda.max_memory_allocated()`` minus the allocation before one step,
  i.e. what the step needs on top of its inputs (its returned gradient included).

On CPU only the torch reference is timed (wall clock); the kernel needs a GPU.

``--precision`` adds the gradient's precision (``run_grad_precision``): relative L2 error of the fp16
and bf16 gradient against an fp64 gradient at [64, 197, 512] with the GradScaler-sized grad_output,
for the reference and both kernel buffers -- on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (the
interpreter truncates fp32 -> bf16 where a GPU rounds to nearest, so its bf16 figures are higher).

Usage::

    python benchmarks/loss.py [--quick] [--device cuda|cpu] [--json out.json] [--precision]
    TRITON_INTERPRET=1 python benchmarks/loss.py --device cpu --precision   # ~2 min on one core

``run_loss_benchmark(device, quick)`` returns the same figures as a dict; benchmarks/throughput.py runs
it as its loss section (benchmarks/sections/loss.py imports it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from g2sd_cache.benchmarks.report import fmt

# Timing. How benchmarks/loss.py times a step: device time between CUDA events with the host enqueueing ahead (the GPU first kept busy, L2 flushed between repeats), wall clock on CPU, peak memory on top of the inputs, and the device-to-device copy bandwidth the kernel is compared with. Times in ms, medians over repeats.

def time_cuda(fn, repeats, warmup, flush):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    # keep the GPU busy (~1 ms per repeat at ~2 GHz) while the host enqueues every repeat, so the
    # events time device work, not Python launch gaps
    torch.cuda._sleep(int(2_000_000 * repeats))
    for i in range(repeats):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def time_cpu(fn, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mem_mib(fn, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def copy_bandwidth_GBps(device, nbytes, repeats):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    ms = statistics.median(times)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


T_TOKENS = 197
D_MODEL = 512
BETA = 2.0
#: the trainer's grad_output: GradScaler's 65536 x a per-step factor (local / global selected count x world)
#: / accumulation steps
GRAD_OUTPUT = 65536.0 * 0.93 / 2
TARGET_KINDS = ("bfloat16", "int8", "int4")


def _kernels():
    try:
        import g2sd_cache.kernels as kernels
    except ImportError as exc:  # pragma: no cover - only without the package installed
        raise SystemExit(f"benchmarks/loss.py needs the g2sd_cache package installed (pip install -e .): {exc}")
    return kernels


def _make_inputs(B, target_kind, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (B, T_TOKENS, D_MODEL)
    target_f = torch.randn(shape, generator=g) * 2.0
    pred = (target_f + torch.randn(shape, generator=g) * 2.0).to(device=device, dtype=torch.bfloat16)
    if target_kind == "int8":
        scale = target_f.abs().amax(dim=-1) / 127.0
        target = torch.round(target_f / scale[..., None]).clamp(-127, 127).to(torch.int8)
        return pred.requires_grad_(), target.to(device), scale.to(device)
    if target_kind == "int4":
        from g2sd_cache.cache import codecs

        target, scale = codecs.encode(codecs.CODECS["int4"], target_f, torch.arange(B, dtype=torch.int64))
        return pred.requires_grad_(), target.to(device), scale.to(device)
    return pred.requires_grad_(), target_f.to(device=device, dtype=torch.bfloat16), None


def _ideal_bytes(pred, target, scale):
    n = pred.numel() * pred.element_size()
    extra = 0 if scale is None else scale.numel() * scale.element_size()
    return 2 * n + target.numel() * target.element_size() + extra


def _step_fn(loss_fn, pred, target, scale):
    grad_output = torch.tensor(GRAD_OUTPUT, device=pred.device)

    def step():
        loss = loss_fn(pred, target, scale=scale, beta=BETA)
        (grad,) = torch.autograd.grad(loss, pred, grad_outputs=grad_output)
        return grad

    return step


def run_loss_benchmark(device=None, quick: bool = False) -> dict:
    """Benchmark the loss on ``device`` ("cuda", "cuda:N" or "cpu"; default: cuda when available).

    Returns ``{"device", "device_name", "torch", "triton", "config", "copy_GBps", "results",
    "notes"}``; each entry of ``results`` has B, T, D, pred_dtype, target_dtype, method, time_ms,
    GBps, frac_of_copy, peak_mem_MiB (None where it does not apply) and, when a method failed,
    error (the method is then skipped, not fatal).
    """
    kernels = _kernels()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    batches = [64] if quick else [64, 256]
    if not on_cuda:
        batches = [8] if quick else [64, 256]
    repeats = (10 if quick else 50) if on_cuda else (3 if quick else 5)
    warmup = 3 if on_cuda else 1
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "config": {"T": T_TOKENS, "D": D_MODEL, "B": batches, "beta": BETA, "repeats": repeats,
                   "pred_dtype": "bfloat16", "target_dtypes": list(TARGET_KINDS), "grad_output": GRAD_OUTPUT,
                   "quick": quick},
        "copy_GBps": None,
        "results": [],
        "notes": [],
    }

    methods = {"torch_eager": kernels.masked_smooth_l1_reference}
    if on_cuda:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            report["notes"].append("TRITON_INTERPRET=1 is set: the Triton kernel would run interpreted; skipped")
        elif not kernels.triton_available():
            report["notes"].append("triton is not installed: kernel skipped")
        else:
            methods = {
                "triton_fused": lambda *a, **k: kernels.masked_smooth_l1(*a, backend="triton", **k),
                "triton_fused_fp32buf": lambda *a, **k: kernels.masked_smooth_l1(
                    *a, backend="triton", fp32_grad_buffer=True, **k),
                **methods,
            }
        methods["torch_compile"] = torch.compile(kernels.masked_smooth_l1_reference, dynamic=False)
        report["copy_GBps"] = copy_bandwidth_GBps(device, (256 if quick else 1024) * 2**20, repeats)
        flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    else:
        report["notes"].append("CPU: only the torch reference is timed; the fused Triton kernel needs a CUDA GPU")

    for B in batches:
        for target_kind in TARGET_KINDS:
            pred, target, scale = _make_inputs(B, target_kind, device)
            nbytes = _ideal_bytes(pred, target, scale)
            ref_grad = None
            for name, fn in methods.items():
                row = {"B": B, "T": T_TOKENS, "D": D_MODEL, "pred_dtype": "bfloat16",
                       "target_dtype": target_kind, "method": name, "ideal_bytes": nbytes,
                       "time_ms": None, "GBps": None, "frac_of_copy": None, "peak_mem_MiB": None}
                step = _step_fn(fn, pred, target, scale)
                try:
                    grad = step()  # also compiles / warms up
                    if name == "torch_eager":
                        ref_grad = grad.float()
                    else:
                        row["_grad"] = grad.float()
                    del grad
                    if on_cuda:
                        row["time_ms"] = time_cuda(step, repeats, warmup, flush)
                        row["peak_mem_MiB"] = peak_mem_mib(step, device)
                    else:
                        row["time_ms"] = time_cpu(step, repeats, warmup)
                    row["GBps"] = nbytes / (row["time_ms"] * 1e-3) / 1e9
                    if report["copy_GBps"]:
                        row["frac_of_copy"] = row["GBps"] / report["copy_GBps"]
                except Exception as exc:  # keep the other methods' figures
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                report["results"].append(row)
            # gradient agreement with the eager reference, as a sanity check of the timed runs
            for row in report["results"]:
                g = row.pop("_grad", None)
                if g is not None and ref_grad is not None:
                    row["max_abs_grad_diff_vs_eager"] = (g - ref_grad).abs().max().item()
            del pred, target, scale, ref_grad
    return report


def run_grad_precision(device=None, shape=(64, T_TOKENS, D_MODEL)) -> dict:
    """Relative L2 error of the gradient w.r.t. fp16 / bf16 predictions against fp64, with grad_output =
    GRAD_OUTPUT, fp32 targets (as online G2SD) and all tokens selected: 1 / N_sel = 1.5e-7 at the default
    shape.  Methods: the torch reference, and the Triton kernel with either buffer (on CUDA tensors, or on
    CPU when TRITON_INTERPRET=1 was set before the import).  Also the fraction of gradient elements that
    came out zero and the number of distinct magnitudes (a collapsed gradient has a handful).

    Returns {"device", "shape", "grad_output", "interpreted", "results": [{pred_dtype, method, rel_err,
    zero_frac, distinct_magnitudes}]}."""
    kernels = _kernels()
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    methods = {"torch_reference": kernels.masked_smooth_l1_reference}
    if kernels.triton_available() and (device.type == "cuda" or interpreted):
        methods["triton_fused"] = lambda p, t: kernels.masked_smooth_l1(p, t, beta=BETA, backend="triton")
        methods["triton_fused_fp32buf"] = lambda p, t: kernels.masked_smooth_l1(
            p, t, beta=BETA, backend="triton", fp32_grad_buffer=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    target = torch.randn(shape, generator=g)
    out = {"device": str(device), "shape": list(shape), "grad_output": GRAD_OUTPUT, "interpreted": interpreted,
           "results": []}
    for dtype in (torch.float16, torch.bfloat16):
        pred = target + torch.randn(shape, generator=g) * 3.0
        pred = pred.to(dtype)
        d = pred.double() - target.double()
        exact = torch.where(d.abs() < BETA, d / BETA, torch.sign(d)) * (GRAD_OUTPUT / d.numel())
        for name, fn in methods.items():
            p = pred.to(device).requires_grad_()
            loss = fn(p, target.to(device)) if name != "torch_reference" else fn(p, target.to(device), beta=BETA)
            (grad,) = torch.autograd.grad(loss, p, grad_outputs=torch.tensor(GRAD_OUTPUT, device=device))
            grad = grad.double().cpu()
            out["results"].append({
                "pred_dtype": str(dtype).replace("torch.", ""), "method": name,
                "rel_err": float((grad - exact).norm() / exact.norm()),
                "zero_frac": float((grad == 0).double().mean()),
                "distinct_magnitudes": int(grad.abs().unique().numel()),
            })
            del p, grad
    return out


def format_precision(prec: dict) -> str:
    lines = [f"Gradient precision vs fp64 at {prec['shape']}, grad_output {prec['grad_output']:.0f} "
             f"({prec['device']}{', Triton interpreter' if prec['interpreted'] else ''})", "",
             "| pred | method | rel. error | zeros | distinct magnitudes |", "|---|---|---:|---:|---:|"]
    for r in prec["results"]:
        lines.append(f"| {r['pred_dtype']} | {r['method']} | {r['rel_err']:.2e} | {100 * r['zero_frac']:.2f} % | "
                     f"{r['distinct_magnitudes']} |")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    lines = [
        f"Loss benchmark on {report['device_name']} ({report['device']}), torch {report['torch']}, "
        f"triton {report['triton']}; T={report['config']['T']}, D={report['config']['D']}, bf16 pred, "
        f"forward+backward, median of {report['config']['repeats']}",
    ]
    if report["copy_GBps"]:
        lines.append(f"device-to-device copy bandwidth: {report['copy_GBps']:.0f} GB/s")
    lines += [
        "",
        "| B | target | method | time (ms) | GB/s | of copy BW | peak mem (MiB) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]

    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['B']} | {r['target_dtype']} | {r['method']} | error: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['B']} | {r['target_dtype']} | {r['method']} | {fmt(r['time_ms'], '.3f')} | "
            f"{fmt(r['GBps'], '.0f' if (r['GBps'] or 0) >= 100 else '.2f')} | {fmt(None if r['frac_of_copy'] is None else 100 * r['frac_of_copy'], '.0f')}"
            f"{'' if r['frac_of_copy'] is None else '%'} | {fmt(r['peak_mem_MiB'], '.1f')} |"
        )
    for note in report["notes"]:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and smaller batches")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--precision", action="store_true", help="also measure the fp16/bf16 gradient's error "
                    "against fp64 at [64, 197, 512] (on CPU: set TRITON_INTERPRET=1 to include the kernel)")
    args = ap.parse_args(argv)
    report = run_loss_benchmark(args.device, quick=args.quick)
    print(format_markdown(report))
    if args.precision:
        report["grad_precision"] = run_grad_precision(args.device)
        print("\n" + format_precision(report["grad_precision"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
