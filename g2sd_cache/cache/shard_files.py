"""Reading the rows of one array of one cache shard file (one view of one shard), two ways.

- `MappedShardFile`: a local shard file of a fixed-width array, memory-mapped. Rows come back as
  zero-copy views of the page cache; each inner chunk's crc32c is checked the first time this process
  touches it. No zarr call, so no ~1 ms per read: this is how targets keep up with a GPU.
- `MappedBytesShardFile`: a local shard file of variable-length bytes (one JPEG per view), memory-mapped.
- `ZarrShardFile`: anything else (string keys, remote stores), read through zarr after checking the
  file's index, since zarr reads a chunk missing from the index as fill values.

Either raises `CacheCorruptError` naming the shard for a missing file, a bad index or a bad checksum.
"""
from __future__ import annotations

import math
import mmap
import os
from typing import NamedTuple

import numpy as np
import zarr
from zarr.storage import WrapperStore

from g2sd_cache.common.errors import CacheCorruptError
from g2sd_cache.common.grouping import group_positions
from g2sd_cache.cache.zarr_layout import MAX_UINT_64, ArrayLayout, crc32c_ok, read_shard_index


# Rows at least this large are copied one at a time by `MappedShardFile.take` (see there).
ROW_COPY_BYTES = 4096


class ChunkRows(NamedTuple):
    """The rows of one read that lie in inner chunk `chunk`: rows [m] (within the chunk) go to dest[at] ([m])."""

    chunk: int
    rows: np.ndarray
    at: np.ndarray


def chunk_groups(rows: np.ndarray, at: np.ndarray, inner: int) -> list[ChunkRows]:
    """Rows [n] of a shard file with `inner` images per inner chunk, bound for dest[at] ([n]) -> one `ChunkRows`
    per inner chunk touched, in ascending chunk order, each keeping the rows' given order."""
    groups = group_positions(rows // inner)
    if len(groups) == 1:   # the common case: rows and at as they are
        j = groups[0][0]
        return [ChunkRows(j, rows - j * inner, at)]
    return [ChunkRows(j, rows[i] - j * inner, at[i]) for j, i in groups]


def _check_index(index: np.ndarray, shard: str, rel: str) -> None:
    if (index == MAX_UINT_64).all(axis=1).any():
        raise CacheCorruptError.in_shard(shard, f"{rel}: an inner chunk is missing from the shard index")


class MappedShardFile:
    """Rows of view `view` of a fixed-width array: [rows, *per_view_shape] numpy views of the mapped file."""

    def __init__(self, path: str, layout: ArrayLayout, shard: str, rel: str, verified: set[int] | None = None):
        self.shard, self.rel = shard, rel
        self.inner = layout.inner_shape[1]           # images per inner chunk (shape [1, inner, ...])
        self.row_shape = layout.inner_shape[2:]
        self.dtype = np.dtype(layout.dtype).newbyteorder("<")
        self.chunk_bytes = math.prod(layout.inner_shape) * self.dtype.itemsize
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        try:
            with open(path, "rb") as f:
                self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                st = os.fstat(f.fileno())
        except (FileNotFoundError, ValueError) as e:   # ValueError: an empty file cannot be mapped
            raise CacheCorruptError.in_shard(shard, f"{rel}: {e}") from None
        try:
            self.index = read_shard_index(self.buf, math.prod(layout.chunks_per_shard), layout.index_at_end)
        except ValueError as e:
            raise CacheCorruptError.in_shard(shard, f"{rel}: {e}") from None
        _check_index(self.index, shard, rel)
        self.verified: set[int] = set() if verified is None else verified   # chunks whose crc32c passed
        self._views: dict[int, np.ndarray] = {}    # chunk -> its rows, once checked
        self.path, self._file_id = path, (st.st_dev, st.st_ino)

    def unlinked(self) -> bool:
        """Whether `path` no longer names the mapped file (removed, or replaced by another): its disk blocks
        stay allocated for as long as this map lives."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._file_id

    def _chunk(self, j: int) -> np.ndarray:
        """Inner chunk j's rows [inner, *row_shape], a view of the map; checked on its first use in this process."""
        view = self._views.get(j)
        if view is not None:   # checked already: a batch reads each array's chunk, so no index parsing per read
            return view
        offset, nbytes = (int(x) for x in self.index[j])
        if nbytes != self.chunk_bytes + 4 or offset + nbytes > len(self.buf):
            raise CacheCorruptError.in_shard(self.shard, f"{self.rel}: inner chunk {j} has a bad size or offset")
        if j not in self.verified:
            body = np.frombuffer(self.buf, dtype=np.uint8, count=self.chunk_bytes, offset=offset)
            if not crc32c_ok(body, self.buf[offset + self.chunk_bytes:offset + nbytes]):
                raise CacheCorruptError.in_shard(self.shard, f"{self.rel}: inner chunk {j} fails its crc32c")
            self.verified.add(j)
        flat = np.frombuffer(self.buf, dtype=self.dtype, count=self.chunk_bytes // self.dtype.itemsize, offset=offset)
        view = self._views[j] = flat.reshape(self.inner, *self.row_shape)
        return view

    def rows(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for j in range(start // self.inner, (stop - 1) // self.inner + 1):
            lo, hi = max(start, j * self.inner) - j * self.inner, min(stop, (j + 1) * self.inner) - j * self.inner
            parts.append(self._chunk(j)[lo:hi])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def take(self, rows: np.ndarray, dest: np.ndarray, at: np.ndarray) -> None:
        """dest[at[i]] = row rows[i], for rows in any order."""
        self.take_chunks(chunk_groups(rows, at, self.inner), dest)

    def take_chunks(self, groups: list[ChunkRows], dest: np.ndarray) -> None:
        """`take` of rows already grouped by inner chunk (`chunk_groups`), so that a batch groups its rows once for
        all its arrays, not once per array.

        Large rows (pixels, targets) are copied one by one straight into `dest`: a fancy-indexed gather
        would first copy them into a temporary (twice the bytes, and a fresh allocation whose pages the
        kernel must fault in: most of the read's cost on a VM). Small rows (masks, scales, indices) go in
        one fancy-indexed copy per inner chunk, where a Python call per row would cost more than the bytes."""
        per_row = self.row_bytes >= ROW_COPY_BYTES
        for g in groups:
            src = self._chunk(g.chunk)
            if per_row:
                for r, a in zip(g.rows.tolist(), g.at.tolist()):
                    dest[a] = src[r]
            else:
                dest[g.at] = src[g.rows]


class MappedBytesShardFile:
    """Rows of view `view` of a variable-length bytes array (one JPEG per view), memory-mapped.

    An inner chunk in zarr's vlen-bytes encoding: uint32 count, then per item uint32 length and its bytes
    (little-endian), then the crc32c of all that. Each chunk's crc32c is checked and its item offsets parsed
    the first time this process touches it; rows come back as zero-copy memoryviews of the page cache."""

    def __init__(self, path: str, layout: ArrayLayout, shard: str, rel: str, verified: set[int] | None = None):
        self.shard, self.rel = shard, rel
        self.inner = layout.inner_shape[1]
        self.row_shape = ()
        try:
            with open(path, "rb") as f:
                self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.index = read_shard_index(self.buf, math.prod(layout.chunks_per_shard), layout.index_at_end)
        except (FileNotFoundError, ValueError) as e:
            raise CacheCorruptError.in_shard(shard, f"{rel}: {e}") from None
        _check_index(self.index, shard, rel)
        self.verified: set[int] = set() if verified is None else verified
        self.items: dict[int, list[tuple[int, int]]] = {}     # chunk -> (offset, length) of each item

    def _chunk(self, j: int) -> list[tuple[int, int]]:
        if j in self.items:
            return self.items[j]
        offset, nbytes = (int(x) for x in self.index[j])
        bad = lambda what: CacheCorruptError.in_shard(self.shard, f"{self.rel}: inner chunk {j} {what}")  # noqa: E731
        if nbytes < 8 or offset + nbytes > len(self.buf):
            raise bad("has a bad size or offset")
        end = offset + nbytes - 4
        if j not in self.verified:
            if not crc32c_ok(memoryview(self.buf)[offset:end], self.buf[end:end + 4]):
                raise bad("fails its crc32c")
            self.verified.add(j)
        count = int.from_bytes(self.buf[offset:offset + 4], "little")
        items, at = [], offset + 4
        for _ in range(count):
            if at + 4 > end:
                raise bad("ends inside an item")
            length = int.from_bytes(self.buf[at:at + 4], "little")
            items.append((at + 4, length))
            at += 4 + length
        if at != end or count != self.inner:
            raise bad(f"holds {count} items in {nbytes} bytes, not {self.inner}")
        self.items[j] = items
        return items

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=object)
        self.take(np.arange(start, stop), out, np.arange(stop - start))
        return out

    def take(self, rows: np.ndarray, dest: np.ndarray, at: np.ndarray) -> None:
        """dest[at[i]] = the bytes of row rows[i] (a memoryview of the map), rows in any order."""
        view = memoryview(self.buf)
        for (offset, length), a in zip(self.spans(rows), at.tolist()):
            dest[a] = view[offset:offset + length]

    def spans(self, rows: np.ndarray) -> list[tuple[int, int]]:
        """(offset, length) in the map of the bytes of each row of `rows` [n], in their order (each chunk checked)."""
        return [self._chunk(r // self.inner)[r % self.inner] for r in rows.tolist()]


class ZarrShardFile:
    """Rows of view `view` of any array, through zarr (checks the file's index first)."""

    def __init__(self, array: zarr.Array, view: int, index_bytes: bytes, layout: ArrayLayout, shard: str, rel: str):
        try:
            index = read_shard_index(index_bytes, math.prod(layout.chunks_per_shard), layout.index_at_end)
        except ValueError as e:
            raise CacheCorruptError.in_shard(shard, f"{rel}: {e}") from None
        _check_index(index, shard, rel)
        self.array, self.view, self.shard = array, view, shard
        self.row_shape = layout.inner_shape[2:]

    def rows(self, start: int, stop: int) -> np.ndarray:
        try:
            return self.array[self.view, start:stop]
        except Exception as e:  # crc32c mismatch, truncated file, unreadable index
            raise CacheCorruptError.in_shard(self.shard, f"{type(e).__name__}: {e}") from e

    def take(self, rows: np.ndarray, dest: np.ndarray, at: np.ndarray) -> None:
        """dest[at[i]] = row rows[i]: one zarr read covering the rows (a remote read costs per call, not per byte)."""
        lo, hi = int(rows.min()), int(rows.max()) + 1
        dest[at] = self.rows(lo, hi)[rows - lo]


_FIXED_WIDTH = {"bool", "int8", "uint8", "int16", "uint16", "int32", "int64", "float16", "float32"}


def can_map(layout: ArrayLayout, local: bool) -> bool:
    """Whether a shard file can be read by `MappedShardFile`: a local file of a fixed-width little-endian
    array whose inner chunks are plain bytes + crc32c (what extract writes for everything but keys)."""
    return local and layout.inner_codecs == ("bytes", "crc32c") and layout.dtype in _FIXED_WIDTH


def can_map_bytes(layout: ArrayLayout, local: bool) -> bool:
    """Whether a shard file can be read by `MappedBytesShardFile`: a local vlen-bytes array (jpeg pixels)."""
    return local and layout.inner_codecs == ("vlen-bytes", "crc32c") and layout.dtype == "variable_length_bytes"


class MissingChunkStore(WrapperStore):
    """A zarr store that raises for a missing chunk file instead of letting zarr read fill values."""

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is None and _is_chunk_key(key):
            raise FileNotFoundError(f"chunk file {key} is missing")
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values):
            if value is None and _is_chunk_key(key):
                raise FileNotFoundError(f"chunk file {key} is missing")
        return values


def _is_chunk_key(key: str) -> bool:
    return "/c/" in f"/{key}"  # zarr v3's default chunk key encoding: ARRAY/c/i/j/...


def strict_store(url: str) -> MissingChunkStore:
    base = (zarr.storage.FsspecStore.from_url(url, read_only=True) if "://" in url
            else zarr.storage.LocalStore(url, read_only=True))
    return MissingChunkStore(base)
