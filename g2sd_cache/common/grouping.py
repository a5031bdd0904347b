"""Positions grouped by key, for the reads that go one group at a time (a batch's rows by shard, a shard's rows
by inner chunk).

The pixel path calls this for every batch and every array, at batch 16 as at 256, so its cost is a fixed
per-batch cost: one key (a batch inside one shard, rows inside one inner chunk, the common case) is found
with two list reductions, and several keys with one stable sort, where `np.unique` and a boolean mask per
key would cost a few microseconds per key each time.
"""
from __future__ import annotations

import numpy as np


def group_positions(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """keys [n] int -> [(key, positions)]: each distinct key once, in ascending order, with positions [m] int64,
    the indices i where keys[i] == key, in ascending order (so a group keeps the order of its items)."""
    values = keys.tolist()
    if not values:
        return []
    if min(values) == max(values):
        return [(values[0], np.arange(len(values)))]
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    cuts = (np.flatnonzero(ordered[1:] != ordered[:-1]) + 1).tolist()
    return [(int(ordered[start]), part) for start, part in zip([0, *cuts], np.split(order, cuts))]
