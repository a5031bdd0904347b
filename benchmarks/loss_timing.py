"""How benchmarks/loss.py times a step: device time between CUDA events with the host enqueueing ahead (the
GPU first kept busy, L2 flushed between repeats), wall clock on CPU, peak memory on top of the inputs, and the
device-to-device copy bandwidth the kernel is compared with. Times in ms, medians over repeats."""
from __future__ import annotations

import statistics
import time

import torch


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
