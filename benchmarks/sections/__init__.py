"""One module per section of `benchmarks/throughput.py` (extract, step, data, loss, storage, finetune; flops is
step's helper). Each section registers the function that runs it with `@section(name)` (ffcv's benchmark
registry); `run_sections` runs them in `ORDER`, each reading what it needs from one `Bench` (a later section
may read an earlier one's figures from `bench.report`) and adding its figures under its name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

# The order the sections run in: extract's cache feeds step; data reads step's figures, storage data's.
ORDER = ("extract", "step", "data", "loss", "storage", "finetune")


@dataclass
class Bench:
    """What a section works from: the workspace (`ws`: tmp, images, small, store folders), the profile, the
    device, whether it is a --quick run, and the report so far."""

    ws: dict
    prof: object              # benchmarks.common.Profile
    device: torch.device
    quick: bool
    report: dict


REGISTRY: dict[str, Callable[[Bench], dict]] = {}


def section(name: str):
    """Register the decorated `fn(bench) -> figures` as the section `name`."""
    def register(fn: Callable[[Bench], dict]) -> Callable[[Bench], dict]:
        REGISTRY[name] = fn
        return fn
    return register


def run_sections(bench: Bench) -> dict:
    """Every section in ORDER; returns the report with each section's figures under its name."""
    for name in ORDER:
        importlib.import_module(f"{__name__}.{name}")
        bench.report[name] = REGISTRY[name](bench)
    return bench.report
