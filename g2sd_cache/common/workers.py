"""DataLoader worker settings shared by extract, train and evaluate.

zarr runs an asyncio thread once a process touches it, and forking a process that has one can
deadlock the child (docs/design.md §5), so workers are started with forkserver (spawn off Linux). The
forkserver preloads the calling module (and so torch and this package) once, so each epoch's new
workers start in milliseconds instead of re-importing torch.
"""
from __future__ import annotations

import multiprocessing
import platform

def keep_as_is(item):
    """DataLoader collate that leaves items alone (the default would turn numpy arrays into tensors)."""
    return item


def mp_context(workers: int, preload: str | None = None):
    """The multiprocessing context for DataLoader workers, or None when there are none. `preload`: the module
    whose workers these are (its `__name__`), imported once by the forkserver (the first caller's counts)."""
    if workers == 0:
        return None
    if platform.system() != "Linux":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    if preload:
        ctx.set_forkserver_preload([preload])
    return ctx
