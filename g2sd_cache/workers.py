"""DataLoader worker settings shared by extract and train.

zarr runs an asyncio thread once a process touches it, and forking a process that has one can
deadlock the child (DESIGN.md §5), so workers are started with forkserver (spawn off Linux). The
forkserver preloads this package once, so each epoch's new workers start in milliseconds instead of
re-importing torch.
"""
from __future__ import annotations

import multiprocessing
import platform

_PRELOAD = ["g2sd_cache.stream", "g2sd_cache.extract"]


def keep_as_is(item):
    """DataLoader collate that leaves items alone (the default would turn numpy arrays into tensors)."""
    return item


def mp_context(workers: int):
    """The multiprocessing context for DataLoader workers, or None when there are none."""
    if workers == 0:
        return None
    if platform.system() != "Linux":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx
