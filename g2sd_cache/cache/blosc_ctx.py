"""c-blosc's `blosc_decompress_ctx`, called by address: the lossless pixel path's per-view decompression.

numcodecs' `blosc.decompress(src, dest)` runs this same C function (single-threaded, as it does off the main
thread) behind ~2 us of Python per call: buffer-protocol wrappers, `ensure_contiguous_ndarray` on the destination,
its thread policy. LZ4 decodes a view's frame in ~7 us, and the feed decompresses every view of every batch, so
that wrapper was a fifth of a lossless cache's host cost. Here the function is taken from the library numcodecs
already loaded (the same code, so the same bytes out) and called through ctypes with the frame's and the batch
row's addresses; ctypes lets go of the GIL during the call, as numcodecs does.

`DECOMPRESS` is None where the numcodecs build does not export the symbol: callers then use numcodecs.
"""
from __future__ import annotations

import ctypes


def _load():
    try:
        from numcodecs import blosc
        fn = ctypes.CDLL(blosc.__file__).blosc_decompress_ctx
    except (ImportError, OSError, AttributeError):
        return None
    # int blosc_decompress_ctx(const void *src, void *dest, size_t destsize, int numinternalthreads)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


#: (src address, dest address, dest bytes, threads) -> bytes decompressed, <= 0 on an error; or None
DECOMPRESS = _load()
