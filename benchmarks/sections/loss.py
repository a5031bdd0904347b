"""Loss section: benchmarks/loss.py (`run_loss_benchmark`; see its docstring for what each figure means).

On CPU only the torch reference is timed; on CUDA the fused Triton kernel against torch eager and
torch.compile.
"""
from __future__ import annotations

import torch

from g2sd_cache.benchmarks.sections import Bench, section
from g2sd_cache.benchmarks.common import log


def loss_section(device: torch.device, quick: bool) -> dict:
    from g2sd_cache.benchmarks import loss as mod

    log("loss: benchmarks/loss.py")
    report = mod.run_loss_benchmark(str(device), quick=quick)
    report["markdown"] = mod.format_markdown(report)
    return report


def loss_targets(report: dict) -> dict:
    """Worst case over (B, target dtype) of the fused kernel's fraction of copy bandwidth and speed-up
    over torch eager; None where the kernel was not timed (CPU)."""
    rows = [r for r in report.get("results", []) if r.get("time_ms")]
    frac, speed = [], []
    for r in rows:
        if r["method"] != "triton_fused":
            continue
        eager = next((e for e in rows if e["method"] == "torch_eager" and e["B"] == r["B"]
                      and e["target_dtype"] == r["target_dtype"]), None)
        if r.get("frac_of_copy") is not None:
            frac.append(r["frac_of_copy"])
        if eager:
            speed.append(eager["time_ms"] / r["time_ms"])
    return {"min_frac_of_copy": min(frac) if frac else None, "min_speedup_vs_eager": min(speed) if speed else None}


@section("loss")
def run_section(bench: Bench) -> dict:
    return loss_section(bench.device, bench.quick)
