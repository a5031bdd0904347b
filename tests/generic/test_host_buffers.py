"""generic/host_buffers.py: one block per batch, every array at a 64-byte offset, handed out as tensors and
arrays of the same bytes, and recycled only when nothing made from it is alive."""
import gc

import numpy as np
import torch

from g2sd_cache.generic.host_buffers import BatchBuffers

ARRAYS = {"pixels": ((2, 3), "uint8"), "scale": ((5,), "float16"), "mask": ((4,), "bool"), "index": ((), "int64")}


def test_layout_puts_each_array_on_a_64_byte_boundary():
    nbytes, parts = BatchBuffers(ARRAYS, pin=False, keep=2).layout(3)
    # pixels 3*6 = 18 B at 0, scale 3*5*2 = 30 B at 64, mask 12 B at 128, index 24 B at 192; 256 in all
    assert [(p[0], p[1], p[2], p[3]) for p in parts] == [("pixels", 0, 18, (3, 2, 3)), ("scale", 64, 30, (3, 5)),
                                                        ("mask", 128, 12, (3, 4)), ("index", 192, 24, (3,))]
    assert nbytes == 256


def test_tensors_and_arrays_are_the_same_bytes_with_the_right_types():
    t, a = BatchBuffers(ARRAYS, pin=False, keep=2).get(3)
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == {
        "pixels": ((3, 2, 3), torch.uint8), "scale": ((3, 5), torch.float16), "mask": ((3, 4), torch.bool),
        "index": ((3,), torch.int64)}
    assert {k: (v.shape, v.dtype.name) for k, v in a.items()} == {
        "pixels": ((3, 2, 3), "uint8"), "scale": ((3, 5), "float16"), "mask": ((3, 4), "bool"), "index": ((3,), "int64")}
    a["scale"][:] = np.arange(15, dtype=np.float16).reshape(3, 5)
    a["index"][:] = [-1, 7, 1 << 40]
    a["mask"][:] = [[True, False, True, False]] * 3
    assert t["scale"].tolist() == np.arange(15).reshape(3, 5).tolist()
    assert t["index"].tolist() == [-1, 7, 1 << 40]
    assert t["mask"].tolist() == [[True, False, True, False]] * 3
    base = t["pixels"].data_ptr()
    assert [t[k].data_ptr() - base for k in ARRAYS] == [0, 64, 128, 192]


def test_a_block_is_reused_only_when_nothing_made_from_it_is_alive():
    buffers = BatchBuffers(ARRAYS, pin=False, keep=2)
    t, a = buffers.get(3)
    first = t["pixels"].data_ptr()
    kept = t["mask"][1:]          # a view of one array keeps the whole block
    del t, a
    gc.collect()
    t, a = buffers.get(3)
    assert t["pixels"].data_ptr() != first
    second = t["pixels"].data_ptr()
    del t, a, kept
    gc.collect()
    t, a = buffers.get(3)
    assert t["pixels"].data_ptr() in (first, second)


class _FakePinned(BatchBuffers):
    """The pinned path's slicing without a GPU: blocks from a plain tensor, handed out as a pinned one would be."""

    def _pinned(self, nbytes):
        return torch.zeros(nbytes, dtype=torch.uint8)


def test_a_pinned_blocks_tensors_are_views_of_its_own_storage():
    t, a = _FakePinned(ARRAYS, pin=True, keep=2).get(3)
    storages = {v.untyped_storage().data_ptr() for v in t.values()}
    assert len(storages) == 1            # the block's storage, which the host allocator tracks copies from
    base = t["pixels"].data_ptr()
    assert [t[k].data_ptr() - base for k in ARRAYS] == [0, 64, 128, 192]
    assert {k: (tuple(v.shape), v.dtype, v.is_contiguous()) for k, v in t.items()} == {
        "pixels": ((3, 2, 3), torch.uint8, True), "scale": ((3, 5), torch.float16, True),
        "mask": ((3, 4), torch.bool, True), "index": ((3,), torch.int64, True)}
    a["scale"][:] = np.arange(15, dtype=np.float16).reshape(3, 5)
    a["index"][:] = [5, -2, 1 << 33]
    a["pixels"][:] = np.arange(18, dtype=np.uint8).reshape(3, 2, 3)
    assert t["scale"].tolist() == np.arange(15).reshape(3, 5).tolist()
    assert t["index"].tolist() == [5, -2, 1 << 33]
    assert t["pixels"].flatten().tolist() == list(range(18))
