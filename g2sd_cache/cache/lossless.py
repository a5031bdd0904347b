"""`--pixels lossless`: a view's visible patches, exactly, in about half the bytes (cache/pixel_codecs.py's modes).

A view's patches x, uint8 [n_keep, p, p, 3] (HWC inside a patch), are stored as one blob of bytes:

    1. colour:  c = (R - G, G, B - G) mod 256                          (the channels move together)
    2. planar:  [n_keep, 3, p, p]                                      (one plane per patch and channel)
    3. predict: r[y, x] = c[y, x] - c[y, x-1] - c[y-1, x] + c[y-1, x-1] mod 256, outside the patch = 0
    4. compress r with Blosc (LZ4HC, level 9, no shuffle): a self-describing frame, decoded by numcodecs

and decoded by the inverse: decompress (host), then c = cumsum_y cumsum_x r mod 256 and R = c0 + G, B = c2 + G
(`unfilter`: torch ops, so training runs it on the device, after the copy, as it decodes a low-rank cache's
targets). The prediction is the 2-D difference (the "gradient" a + b - c of lossless JPEG) rather than a
non-linear one (PNG's Paeth, LOCO-I's MED, 4 % fewer bytes) because its inverse is two prefix sums, which a GPU
runs for a batch in microseconds, while a non-linear predictor must be undone pixel after pixel. Patches are
predicted alone: neighbours in the tiled order are not neighbours in the image.

Why LZ4HC: the residuals of a photograph are small numbers, which zstd codes in ~13.3 KB per view and LZ4HC in
~18.7 KB, but zstd decodes at ~40-50 us per view of one core and LZ4 at ~16 (benchmarks/pixels.py,
docs/pixels-cpu.json): the feed's budget is cores per GPU, and the host does only the decompression.
Nothing is lost anywhere, so teacher and student see the exact patches and no decoder is recorded.
"""
from __future__ import annotations

import struct

import numpy as np
import torch
from numcodecs import Blosc, blosc

from g2sd_cache.cache import blosc_ctx

LOSSLESS_ARRAY = "lossless"     # the array a lossless cache stores (variable-length bytes, one blob per view)
FILTER = "rgb-g_planar_grad2d"  # steps 1-3 above, recorded in the manifest: a reader refuses any other
COMPRESSOR = {"id": "blosc", "cname": "lz4hc", "clevel": 9, "shuffle": Blosc.NOSHUFFLE}


def encoding_record() -> dict:
    """The manifest's `pixel_encoding` of a lossless cache."""
    return {"filter": FILTER, "compressor": dict(COMPRESSOR)}


def residual_shape(n_keep: int, p: int) -> tuple[int, int, int, int]:
    """(n_keep, 3, p, p): one view's residual planes, what the host decompresses into."""
    return n_keep, 3, p, p


def filter_patches(patches: np.ndarray) -> np.ndarray:
    """uint8 [..., n_keep, p, p, 3] -> residual planes uint8 [..., n_keep, 3, p, p] (steps 1-3)."""
    x = patches.astype(np.int16)
    c = np.stack([x[..., 0] - x[..., 1], x[..., 1], x[..., 2] - x[..., 1]], axis=-3)   # [..., n_keep, 3, p, p]
    d = c.copy()
    d[..., :, 1:] -= c[..., :, :-1]
    d[..., 1:, :] -= c[..., :-1, :]
    d[..., 1:, 1:] += c[..., :-1, :-1]
    return (d & 255).astype(np.uint8)


def unfilter(residuals: torch.Tensor) -> torch.Tensor:
    """Residual planes uint8 [..., n_keep, 3, p, p] -> patches uint8 [..., n_keep, p, p, 3] (on their device).
    Sums in uint8 wrap mod 256, which is the arithmetic of the filter (a wider sum cast back would agree)."""
    c = residuals.cumsum(-1, dtype=torch.uint8).cumsum(-2, dtype=torch.uint8)
    g = c[..., 1, :, :]
    x = torch.empty((*c.shape[:-3], c.shape[-2], c.shape[-1], 3), dtype=torch.uint8, device=c.device)
    torch.add(c[..., 0, :, :], g, out=x[..., 0])
    x[..., 1] = g
    torch.add(c[..., 2, :, :], g, out=x[..., 2])
    return x


_CODEC = Blosc(cname=COMPRESSOR["cname"], clevel=COMPRESSOR["clevel"], shuffle=COMPRESSOR["shuffle"])


def encode(patches: np.ndarray) -> bytes:
    """uint8 [n_keep, p, p, 3] -> the bytes stored for the view."""
    return bytes(_CODEC.encode(np.ascontiguousarray(filter_patches(patches))))


def _frame_problem(src, offset: int, length: int, want: int) -> str | None:
    """What is wrong with src[offset:offset + length] as the Blosc frame of one view of `want` bytes (None: nothing).
    Blosc's 16-byte header: version, versionlz, flags, typesize, then uint32 LE nbytes, blocksize, cbytes. Blosc
    trusts cbytes, so a frame cut short is refused here, before it would read past the blob."""
    if length < 16:
        return f"a lossless pixel frame of {length} bytes is shorter than its header"
    nbytes, _, cbytes = struct.unpack_from("<III", src, offset + 4)
    if cbytes != length:
        return f"a lossless pixel frame of {length} bytes says it has {cbytes}"
    if nbytes != want:
        return f"a lossless pixel frame of {nbytes} bytes decoded, not the {want} of a view"
    return None


def decompress_into(blob, dest: np.ndarray) -> None:
    """The stored bytes of one view -> its residual planes, written into `dest` (uint8 [n_keep, 3, p, p], C-contiguous:
    a row of a batch buffer). Raises ValueError if the blob is not a frame of exactly that many bytes."""
    src = memoryview(blob).cast("B")
    problem = _frame_problem(src, 0, len(src), dest.nbytes)
    if problem:
        raise ValueError(problem)
    try:
        blosc.decompress(src, dest)
    except Exception as e:
        raise ValueError(f"a lossless pixel frame does not decompress ({e})") from None


def decompress_spans(buf, spans: list[tuple[int, int]], dest: np.ndarray, at: list[int]) -> None:
    """Views' frames buf[offset:offset + length] (buf: a memory-mapped shard file; spans: [(offset, length)] per
    view) -> their residual planes dest[at[i]] (dest uint8 [B, n_keep, 3, p, p]); ValueError as `decompress_into`.
    The pixel path's host work: c-blosc is called with the frame's and the row's addresses (cache/blosc_ctx.py),
    where numcodecs' wrapper would cost a fifth of the view; the checks keep it inside the map and the batch."""
    size, count = len(buf), len(dest)
    row = dest.nbytes // count if count else 0
    if (blosc_ctx.DECOMPRESS is None or not (dest.flags.c_contiguous and dest.flags.writeable)
            or (at and not (0 <= min(at) and max(at) < count))):
        view = memoryview(buf)   # numcodecs and numpy indexing, with their own checks
        for (offset, length), a in zip(spans, at):
            decompress_into(view[offset:offset + length], dest[a])
        return
    src, out = np.frombuffer(buf, np.uint8).ctypes.data, dest.ctypes.data
    for (offset, length), a in zip(spans, at):
        problem = "a lossless pixel frame lies outside its file" if offset < 0 or offset + length > size else \
            _frame_problem(buf, offset, length, row)
        if problem:
            raise ValueError(problem)
        got = blosc_ctx.DECOMPRESS(src + offset, out + a * row, row, 1)
        if got <= 0:
            raise ValueError(f"a lossless pixel frame does not decompress (error during blosc decompression: {got})")


def decode(blobs, n_keep: int, p: int) -> torch.Tensor:
    """The stored bytes of B views -> uint8 [B, n_keep, p, p, 3], on the host (verify, read_block, tests)."""
    res = np.empty((len(blobs), *residual_shape(n_keep, p)), dtype=np.uint8)
    for i, b in enumerate(blobs):
        decompress_into(b, res[i])
    return unfilter(torch.from_numpy(res))
