"""The epoch plan: which views each rank and worker reads, in which order — a pure function of
(seed, epoch, rank, world, workers) and the shard sizes, so every rank agrees without talking and a
resumed run continues exactly where the interrupted one stopped.

    units (cache shards, tars, or blocks of an image folder) -> blocks of `block` rows
    -> blocks shuffled (seed, epoch) -> concatenated -> rank r takes rows [r*N/world, (r+1)*N/world)
    -> cut into windows of `window` rows -> window j goes to worker slot j mod W
    -> each window's rows permuted (seed, epoch, rank, j): the shuffle buffer
    -> the rank's sample order: slots taken in turn, one sample each, skipping exhausted slots

Every rank gets floor(N / world) views (the < world left over are dropped for this epoch and counted),
so every rank runs the same number of steps and DDP never waits on a rank that ran out. The last
rule is exactly how torch's DataLoader interleaves IterableDataset workers (batch_size=None), so
worker w streams slot w and the trainer checks each sample's (slot, seq) against `expected_order`.
Tar units are kept whole (one window each): they can only be read sequentially.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

_BLOCK_TAG, _WINDOW_TAG = 0x626C6B, 0x77696E  # keep the two random streams apart


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of unit `unit` (a cache shard, a tar, or the image folder)."""

    unit: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Window:
    """Consecutive rows of a rank's epoch, read together and shuffled together."""

    index: int
    segments: tuple[Segment, ...]

    def __len__(self) -> int:
        return sum(len(s) for s in self.segments)


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    slots: tuple[tuple[Window, ...], ...]   # the windows of each worker slot, in stream order
    rank_views: int                          # views this rank reads this epoch
    dropped: int                             # views no rank reads this epoch (< world)

    def slot_lengths(self) -> list[int]:
        return [sum(len(w) for w in windows) for windows in self.slots]

    def micro_batches(self, batch_size: int) -> int:
        return -(-self.rank_views // batch_size)


def plan_epoch(unit_sizes: list[int], *, epoch: int, seed: int, rank: int, world: int, slots: int,
               block: int, window: int, whole_units: bool = False) -> EpochPlan:
    """See the module docstring. `unit_sizes[u]` = rows of unit u this epoch."""
    blocks = []
    for u, n in enumerate(unit_sizes):
        step = max(1, n if whole_units else block)
        blocks.extend(Segment(u, s, min(n, s + step)) for s in range(0, n, step))
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, epoch, _BLOCK_TAG])))
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]

    total = sum(len(b) for b in blocks)
    per_rank = total // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    mine, pos = [], 0
    for b in blocks:
        a, z = max(lo, pos), min(hi, pos + len(b))
        if a < z:
            mine.append(Segment(b.unit, b.start + a - pos, b.start + z - pos))
        pos += len(b)

    windows: list[list[Segment]] = []
    current: list[Segment] = []
    filled = 0
    for seg in mine:
        if whole_units:
            windows.append([seg])
            continue
        start = seg.start
        while start < seg.stop:
            take = min(seg.stop - start, window - filled)
            current.append(Segment(seg.unit, start, start + take))
            filled, start = filled + take, start + take
            if filled == window:
                windows.append(current)
                current, filled = [], 0
    if current:
        windows.append(current)
    numbered = [Window(j, tuple(segs)) for j, segs in enumerate(windows)]
    return EpochPlan(epoch, tuple(tuple(numbered[s::slots]) for s in range(slots)), per_rank, total - world * per_rank)


def window_permutation(seed: int, epoch: int, rank: int, window: Window) -> np.ndarray:
    """The order in which a window's rows are emitted (the shuffle buffer's draw order)."""
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, epoch, rank, window.index, _WINDOW_TAG])))
    return rng.permutation(len(window))


def consumed_per_slot(lengths: list[int], taken: int) -> tuple[list[int], list[int]]:
    """After the first `taken` samples of the round-robin order over slot streams of `lengths`:
    how many each slot gave, and the order in which slots continue (exhausted slots last).
    Worker w of a resumed DataLoader plays slot `rotation[w]`."""
    consumed = [0] * len(lengths)
    active = [s for s in range(len(lengths)) if lengths[s] > 0]
    remaining, shift = taken, 0
    while remaining and active:
        k = min(lengths[s] - consumed[s] for s in active)
        full = min(k, remaining // len(active))
        for s in active:
            consumed[s] += full
        remaining -= full * len(active)
        if full < k:            # the rest falls in a partial round
            for s in active[:remaining]:
                consumed[s] += 1
            shift, remaining = remaining, 0
            break
        active = [s for s in active if consumed[s] < lengths[s]]
    if remaining:
        raise ValueError(f"cannot skip {taken} samples of an epoch of {sum(lengths)}")
    # The round in progress goes on with active[shift:]; slots that gave their last sample drop out.
    rotation = [s for s in active[shift:] + active[:shift] if consumed[s] < lengths[s]]
    return consumed, rotation + [s for s in range(len(lengths)) if s not in rotation]


def expected_order(lengths: list[int], consumed: list[int], rotation: list[int]) -> Iterator[tuple[int, int]]:
    """(slot, sequence number) of every remaining sample, in the order the DataLoader delivers them."""
    pos = list(consumed)
    active = [s for s in rotation if pos[s] < lengths[s]]
    while active:
        for s in active:
            yield s, pos[s]
            pos[s] += 1
        active = [s for s in active if pos[s] < lengths[s]]
