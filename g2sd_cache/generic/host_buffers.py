"""The pixel path's batch buffers: one host block per batch holding all its arrays, recycled.

Every array of a batch (patches or residual planes, target codes, scales, mask, source index) is a slice of one
uint8 block, each at a 64-byte aligned offset, so a batch costs one pool look-up (or one pinned allocation),
not one per array: at a CPU's batch of 16 those look-ups were a tenth of the loader's time.

Why recycle: pinned blocks come from torch's caching host allocator, which reuses freed blocks (and waits for
the non-blocking copies to the device before it does). Unpinned ones are recycled here for the same reason:
a block of several MB that is freed goes back to the OS and a new one comes back as fresh pages, which the
kernel faults in and zeroes on first write -- more CPU than copying the views' bytes into them, several times
more on a VM. A block is a numpy array handed out through `torch.from_numpy`, whose storage keeps a reference
to it, as does every numpy view of it: it is handed out again only when the pool's reference is the last one,
so a batch (or any tensor or array made from it) that is still alive is never overwritten.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

ALIGN = 64    # bytes: every array starts on a cache line, so any dtype's view of it is aligned


class BatchBuffers:
    """Host blocks for batches of the arrays `arrays` {name: (per-view shape, numpy dtype)}. `get(b)` hands out one
    batch's arrays twice, as torch tensors and as numpy arrays of the same bytes: {name: [b, *shape]} each.
    At most `keep` unpinned blocks of each batch size are kept (about the batches alive at once)."""

    def __init__(self, arrays: dict[str, tuple[tuple[int, ...], str]], pin: bool, keep: int):
        self.arrays = {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in arrays.items()}
        self.pin, self.keep = pin, keep
        self.pool: dict[int, list[np.ndarray]] = {}          # batch size -> its blocks
        self._layouts: dict[int, tuple[int, list]] = {}       # batch size -> (block bytes, per array slicing)
        self._idle = _refs([np.empty(1, np.uint8)], 0)        # the count of a block only the pool holds

    def layout(self, b: int) -> tuple[int, list[tuple]]:
        """(block bytes, [(name, byte offset, bytes, [b, *shape], its strides in elements, numpy dtype, torch dtype)])
        for batches of `b`."""
        if b not in self._layouts:
            parts, at = [], 0
            for name, (shape, dtype) in self.arrays.items():
                nbytes = b * math.prod(shape) * dtype.itemsize
                parts.append((name, at, nbytes, (b, *shape), _contiguous_strides((b, *shape)), dtype,
                              torch.from_numpy(np.empty(0, dtype)).dtype))
                at += -(-nbytes // ALIGN) * ALIGN
            self._layouts[b] = (max(at, 1), parts)
        return self._layouts[b]

    def _block(self, nbytes: int, b: int) -> tuple[torch.Tensor | None, np.ndarray]:
        """One block of `nbytes` no batch alive uses: (the pinned uint8 tensor, or None; a uint8 array of its bytes)."""
        if self.pin:
            raw = self._pinned(nbytes)
            return raw, raw.numpy()
        blocks = self.pool.setdefault(b, [])
        for i in range(len(blocks)):
            if _refs(blocks, i) == self._idle:
                return None, blocks[i]
        block = np.empty(nbytes, dtype=np.uint8)
        if len(blocks) < self.keep:
            blocks.append(block)
        return None, block

    @staticmethod
    def _pinned(nbytes: int) -> torch.Tensor:
        """A pinned uint8 block of `nbytes` from torch's caching host allocator."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def get(self, b: int) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        """One batch of `b` views: ({name: tensor [b, *shape]}, {name: array [b, *shape]}), uninitialised."""
        nbytes, parts = self.layout(b)
        raw, block = self._block(nbytes, b)
        typed: dict[torch.dtype, torch.Tensor] = {}
        tensors, arrays = {}, {}
        for name, at, n, shape, strides, dtype, tdtype in parts:
            arrays[name] = block[at:at + n].view(dtype).reshape(shape)
            if raw is None:   # the tensor's storage holds the array, which holds the block: the pool sees it alive
                tensors[name] = torch.from_numpy(arrays[name])
            else:   # views of the pinned tensor's own storage, so the allocator tracks the copies made from them
                if tdtype not in typed:
                    typed[tdtype] = raw.view(tdtype)
                tensors[name] = typed[tdtype].as_strided(shape, strides, at // dtype.itemsize)
        return tensors, arrays


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides, in elements, of a C-contiguous array of `shape`."""
    strides = [1]
    for d in reversed(shape[1:]):
        strides.append(strides[-1] * d)
    return tuple(reversed(strides))


def _refs(blocks: list, i: int) -> int:
    """The reference count of blocks[i] (one expression, so the idle count is measured the same way)."""
    return sys.getrefcount(blocks[i])
