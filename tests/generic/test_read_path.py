"""The pixel path's read: `MappedShardFile.take` scatters rows into batch buffers, and `read_cached` recycles
those buffers (generic/host_buffers.py) without ever overwriting a batch that is still alive."""
import numpy as np
import pytest

from g2sd_cache.cache import shard_files
from g2sd_cache.cache.reader import open_cache
from g2sd_cache.generic.plan import PAD, epoch_order
from g2sd_cache.generic.stream import StreamSpec, read_cached


@pytest.mark.parametrize("row_copy_bytes", [0, 1 << 30], ids=["row-by-row", "fancy-indexed"])
def test_take_scatters_rows_in_any_order(micro_cache, monkeypatch, row_copy_bytes):
    monkeypatch.setattr(shard_files, "ROW_COPY_BYTES", row_copy_bytes)
    cache = open_cache(str(micro_cache))
    n = cache.shard_images[1]
    rows = np.array([3, 0, 2, 3, 1])             # any order, repeats allowed, across inner chunks
    at = np.array([4, 2, 0, 1, 3])
    block = cache.read_block(1, 1, 0, n)
    for name, stored in (("pixels", block.pixels), ("target", block.codes), ("mask", block.mask),
                         ("crop", block.crop)):
        out = np.zeros((len(rows) + 1, *stored.shape[1:]), dtype=stored.dtype)
        out[len(rows)] = ~stored[0] if stored.dtype == bool else stored[0] + 1   # differs from every row
        untouched = out[len(rows)].copy()
        cache.take(1, 1, rows, {name: out}, at)
        np.testing.assert_array_equal(out[at], stored[rows], err_msg=name)
        np.testing.assert_array_equal(out[len(rows)], untouched, err_msg=f"{name}: a row outside `at` was written")


def _batches(cache, batch: int, keep: int):
    order = epoch_order(list(cache.shard_images), seed=0, epoch=0, block=cache.manifest.chunk_views, window=8)
    spec = StreamSpec(None, cache, cache.manifest.geometry, 0, 1, order)
    n = -(-len(order) // batch) * batch
    positions = np.where(np.arange(n) < len(order), np.arange(n), PAD).reshape(-1, batch)
    return order, read_cached(spec, pin=False, keep=keep)(iter(positions))


def _expected(cache, order, position: int):
    b = cache.read_block(int(order.unit[position]), 1, int(order.row[position]), int(order.row[position]) + 1)
    return b.pixels[0], b.codes[0], b.mask[0]


def test_batches_kept_alive_are_never_overwritten(micro_cache):
    cache = open_cache(str(micro_cache))
    order, stage = _batches(cache, batch=5, keep=1)
    held = list(stage)                          # every batch alive at once: the pool must allocate anew
    assert len({b.patches.data_ptr() for b in held}) == len(held)
    for k, b in enumerate(held):
        for i in range(len(b)):
            p = 5 * k + i
            if p >= len(order):
                assert not b.valid[i]
                continue
            pixels, codes, mask = _expected(cache, order, p)
            np.testing.assert_array_equal(b.patches[i].numpy(), pixels)
            np.testing.assert_array_equal(b.codes[i].numpy(), codes)
            np.testing.assert_array_equal(b.mask[i].numpy(), mask)


def test_released_batch_buffers_are_reused(micro_cache):
    cache = open_cache(str(micro_cache))
    order, stage = _batches(cache, batch=2, keep=2)
    seen = set()
    for k, b in enumerate(stage):
        seen.add(b.patches.data_ptr())
        for i in range(len(b)):
            pixels, codes, _ = _expected(cache, order, 2 * k + i)
            np.testing.assert_array_equal(b.patches[i].numpy(), pixels)
            np.testing.assert_array_equal(b.codes[i].numpy(), codes)
        del b                                   # as a training loop drops the step's batches
    assert k >= 4 and len(seen) <= 2, f"{k + 1} batches used {len(seen)} buffers"
