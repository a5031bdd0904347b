"""The zarr v3 sharding layout, read by hand: verify checks every chunk's crc32c at memory speed with
it, and the reader checks a shard file's index before trusting zarr with it (zarr reads an inner
chunk marked empty in the index as fill values; for the cache that is corruption, never data).

A shard file ends with its index: per inner chunk (offset, nbytes) as little-endian uint64, an empty
chunk holding 2**64-1 in both, then the crc32c of the index. Each chunk ends in the crc32c of the rest.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable

import google_crc32c
import numpy as np

MAX_UINT_64 = 2**64 - 1


@dataclass(frozen=True)
class ArrayLayout:
    """What verify needs from an array's zarr.json: shapes and the codec chain of its shard files."""

    shape: tuple[int, ...]
    dtype: str
    shard_shape: tuple[int, ...]
    inner_shape: tuple[int, ...]
    inner_codecs: tuple[str, ...]
    index_at_end: bool
    separator: str

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard_shape, self.inner_shape))

    def shard_files(self) -> Iterable[tuple[tuple[int, ...], str]]:
        """(grid coordinate, file path relative to the array folder) of every shard file."""
        grid = [math.ceil(n / s) for n, s in zip(self.shape, self.shard_shape)]
        for coord in itertools.product(*(range(g) for g in grid)):
            yield coord, self.separator.join(["c", *map(str, coord)])

    def inner_start(self, shard_coord: tuple[int, ...], j: int) -> tuple[int, ...]:
        inner = np.unravel_index(j, self.chunks_per_shard)
        return tuple(s * ss + int(i) * c for s, ss, i, c in zip(shard_coord, self.shard_shape, inner, self.inner_shape))


def parse_layout(meta: dict) -> ArrayLayout:
    """zarr.json of an array -> its layout. Raises ValueError naming what is not the cache format."""
    codecs = meta.get("codecs") or []
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        raise ValueError(f"not stored with the sharding codec (codecs: {[c.get('name') for c in codecs]})")
    conf = codecs[0]["configuration"]
    inner = tuple(c["name"] for c in conf["codecs"])
    index = tuple(c["name"] for c in conf["index_codecs"])
    if not inner or inner[-1] != "crc32c":
        raise ValueError(f"inner chunks carry no crc32c (codecs: {list(inner)})")
    little = lambda c: c.get("configuration", {}).get("endian", "little") == "little"  # noqa: E731
    if index != ("bytes", "crc32c") or not little(conf["index_codecs"][0]):
        raise ValueError(f"shard index is not little-endian bytes + crc32c (codecs: {list(index)})")
    if conf["codecs"][0]["name"] == "bytes" and not little(conf["codecs"][0]):
        raise ValueError("inner chunks are not little-endian")
    enc = meta.get("chunk_key_encoding", {})
    if enc.get("name", "default") != "default":
        raise ValueError(f"unexpected chunk key encoding {enc.get('name')}")
    return ArrayLayout(
        shape=tuple(meta["shape"]), dtype=meta["data_type"],
        shard_shape=tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]),
        inner_shape=tuple(conf["chunk_shape"]), inner_codecs=inner,
        index_at_end=conf.get("index_location", "end") == "end",
        separator=enc.get("configuration", {}).get("separator", "/"))


def crc32c_ok(body: bytes | memoryview, stored: bytes | memoryview) -> bool:
    """Whether `stored` (4 bytes, little-endian) is the crc32c of `body`: the one checksum test of the cache.
    `body` may be any buffer (a slice of a memory map): it is not copied."""
    return google_crc32c.value(np.frombuffer(body, dtype=np.uint8)).to_bytes(4, "little") == bytes(stored)


def chunk_crc_ok(chunk: bytes | memoryview) -> bool:
    """An inner chunk (or a shard index) as stored: its bytes, then the crc32c of them."""
    return crc32c_ok(chunk[:-4], chunk[-4:])


def read_shard_index(data: bytes | memoryview, n_chunks: int, at_end: bool = True) -> np.ndarray:
    """The sharding index of a shard file: [n_chunks, 2] uint64 (offset, nbytes); empty chunks hold
    2**64-1 in both. Raises ValueError if the file is shorter than its index or the index's crc32c fails."""
    size = 16 * n_chunks + 4
    view = memoryview(data)
    if len(view) < size:
        raise ValueError(f"file of {len(view)} bytes is shorter than its {size}-byte shard index")
    raw = view[len(view) - size:] if at_end else view[:size]
    if not chunk_crc_ok(raw):
        raise ValueError("the shard index fails its crc32c")
    return np.frombuffer(raw[:-4], dtype="<u8").reshape(n_chunks, 2)
