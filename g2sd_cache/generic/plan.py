"""The epoch plan: which samples every optimizer step uses — a pure function of (seed, epoch) and the
data's shape, whatever the number of ranks, workers or the per-rank batch (elastic, as MosaicML Streaming).

    units (cache shards, tars, or the image folder) -> blocks of `block` rows
    -> blocks shuffled (seed, epoch) -> concatenated -> cut into windows of `window` rows
    -> each window's rows permuted (seed, epoch, window)             = the epoch's global order
    -> from a start position, global batches of G = batch_size x accum x world samples
    -> rank r takes the r-th contiguous G / world samples of each global batch, in `accum` micro-batches

Blocks keep reads local (a window spans a few MB-sized inner chunks of the cache, so each chunk is read
and checksummed once per epoch); the window permutation is the shuffle buffer; extract already stores
images in a seeded random order, so a block is not one class. Tar units are kept whole (one window each):
they can only be read sequentially.

With a shuffle span of S rows (`span` > 0: train's --shuffle-span), blocks are shuffled within spans instead of
over the whole epoch, so that a stretch of steps reads a bounded set of units (MosaicML Streaming's shuffle
blocks do the same):

    units permuted (seed, epoch, 0x756E74) -> cut into spans: consecutive units, a span closing once it holds
    >= S rows (the last may hold fewer) -> each span's blocks shuffled (seed, epoch, span k) -> each span cut
    into windows of `window` rows (a window never straddles two spans; windows numbered over the epoch)
    -> each window's rows permuted (seed, epoch, window j), as above

While the epoch is in span k it reads only span k's units: a node-local copy of a remote cache
(cache/local_mirror.py) needs two spans' files (the one read, the next prefetched), not the epoch's, and
fetches each byte once per epoch. Units are shards of a seeded random order of the images, so a span is an
unbiased sample of the data, as the whole epoch is. `span` = 0 is the whole-epoch recipe above, unchanged.

The global order does not depend on the world size, so a checkpoint records only (epoch, global sample
position), and a run resumes on any number of ranks and workers: it continues at the same sample, and
over the epoch every view is used exactly once. The last global batch of an epoch is padded with
stand-ins (position -1: zero weight in the loss), so every rank runs the same steps and micro-batches of
the same size (DDP never waits on a rank that ran out) and a step's gradient is the mean over its real
samples, however the step is cut.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_BLOCK_TAG, _WINDOW_TAG, _UNIT_TAG = 0x626C6B, 0x77696E, 0x756E74  # keep the random streams apart
PAD = -1  # the position of a stand-in sample


@dataclass(frozen=True)
class EpochOrder:
    """The epoch's samples in training order: sample i is row `row[i]` of unit `unit[i]`."""

    epoch: int
    unit: np.ndarray    # [N] int64
    row: np.ndarray     # [N] int64

    def __len__(self) -> int:
        return len(self.unit)


def _philox(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(list(key))))


def spans(unit_sizes: list[int], *, seed: int, epoch: int, span: int) -> list[list[int]]:
    """The units of each span of the epoch, in reading order (see the module docstring; `span` > 0)."""
    out, rows = [[]], 0
    for u in _philox(seed, epoch, _UNIT_TAG).permutation(len(unit_sizes)).tolist():
        if rows >= span:
            out.append([])
            rows = 0
        out[-1].append(u)
        rows += unit_sizes[u]
    return out


def epoch_order(unit_sizes: list[int], *, seed: int, epoch: int, block: int, window: int,
                whole_units: bool = False, span: int = 0) -> EpochOrder:
    """See the module docstring. `unit_sizes[u]` = rows of unit u this epoch; `span` rows per shuffle span
    (0: the whole epoch; ignored for whole tar units, which are their own windows)."""
    if span > 0 and not whole_units:
        return _spanned_order(unit_sizes, seed=seed, epoch=epoch, block=block, window=window, span=span)
    blocks = []
    for u, n in enumerate(unit_sizes):
        step = max(1, n if whole_units else block)
        blocks.extend((u, s, min(n, s + step)) for s in range(0, n, step))
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, epoch, _BLOCK_TAG])))
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    unit = np.concatenate([np.full(z - a, u, dtype=np.int64) for u, a, z in blocks] or [np.zeros(0, np.int64)])
    row = np.concatenate([np.arange(a, z, dtype=np.int64) for _, a, z in blocks] or [np.zeros(0, np.int64)])

    if whole_units:   # a window per tar: its rows, wherever the tar lands in the order
        bounds = np.cumsum([0] + [z - a for _, a, z in blocks])
    else:
        bounds = np.append(np.arange(0, len(unit), max(1, window)), len(unit))
    order = np.arange(len(unit))
    for j, (a, z) in enumerate(zip(bounds[:-1], bounds[1:])):
        wrng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, epoch, j, _WINDOW_TAG])))
        order[a:z] = a + wrng.permutation(z - a)
    return EpochOrder(epoch, unit[order], row[order])


def _spanned_order(unit_sizes: list[int], *, seed: int, epoch: int, block: int, window: int, span: int) -> EpochOrder:
    units, rows, j = [], [], 0
    step = max(1, block)
    for k, members in enumerate(spans(unit_sizes, seed=seed, epoch=epoch, span=span)):
        blocks = [(u, s, min(unit_sizes[u], s + step)) for u in members for s in range(0, unit_sizes[u], step)]
        blocks = [blocks[i] for i in _philox(seed, epoch, k, _BLOCK_TAG).permutation(len(blocks))]
        if not blocks:
            continue
        unit = np.concatenate([np.full(z - a, u, dtype=np.int64) for u, a, z in blocks])
        row = np.concatenate([np.arange(a, z, dtype=np.int64) for _, a, z in blocks])
        for a in range(0, len(unit), max(1, window)):
            perm = a + _philox(seed, epoch, j, _WINDOW_TAG).permutation(min(len(unit), a + window) - a)
            units.append(unit[perm])
            rows.append(row[perm])
            j += 1
    empty = np.zeros(0, np.int64)
    return EpochOrder(epoch, np.concatenate(units or [empty]), np.concatenate(rows or [empty]))


def steps_in_epoch(n: int, global_batch: int, start: int = 0) -> int:
    """Optimizer steps that cover samples [start, n) in global batches (the last one padded)."""
    return -(-max(0, n - start) // global_batch)


def rank_positions(n: int, *, start: int, global_batch: int, rank: int, world: int) -> np.ndarray:
    """Positions in the epoch order of rank `rank`'s samples for every remaining step of the epoch:
    [steps, global_batch / world] int64, PAD (-1) for the stand-ins that fill the last global batch."""
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not a multiple of the world size {world}")
    per_rank = global_batch // world
    steps = steps_in_epoch(n, global_batch, start)
    pos = start + np.arange(steps, dtype=np.int64)[:, None] * global_batch + rank * per_rank \
        + np.arange(per_rank, dtype=np.int64)[None, :]
    return np.where(pos < n, pos, PAD)
