"""Reading a cache: `open_cache(path)` -> `Cache`, with per-view records and block reads.

Global view order: shard by shard; inside a shard view 0 of every image, then view 1, ... (the
on-disk order). `cache[i]` decodes one view; streaming code calls `read_block`, which fetches a
run of images of one view in one zarr call (a call costs ~1 ms, so per-view reads would not keep
up; DESIGN.md §5).

Integrity: a shard's files are checked against the manifest (present, right size) the first time
a process touches the shard, and zarr checks every chunk's crc32c as it decodes it. Any failure
raises `CacheCorruptError` naming the shard: a missing chunk never reads back as fill values.

The object is safe to pickle into DataLoader workers and across fork: zarr handles are opened
lazily per process and never pickled.
"""
from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import dataclass
from typing import Iterator

import fsspec
import numpy as np
import torch
import zarr
import zarr.storage
from zarr.storage import WrapperStore

from . import codecs
from .errors import CacheCorruptError, UserError
from .schema import MANIFEST, Manifest, array_specs
from .zarr_layout import MAX_UINT_64, parse_layout, read_shard_index


@dataclass(frozen=True)
class ViewRecord:
    """One cached view. crop = (top, left, height, width); mask: [L] bool (True = hidden);
    target: [T, D] float32, decoded from the cache's codec."""

    key: str
    source_index: int
    view: int
    crop: tuple[int, int, int, int]
    flip: bool
    mask: torch.Tensor
    target: torch.Tensor


@dataclass
class Block:
    """Images [start, stop) of view `view` of shard `shard`, as stored. Arrays have n = stop - start rows:
    codes [n, T, D] (codec storage dtype), scale [n, T] float32 or None, mask [n, L], crop [n, 4], flip [n],
    source_index [n], key [n]."""

    shard: int
    view: int
    start: int
    stop: int
    codes: np.ndarray
    scale: np.ndarray | None
    mask: np.ndarray
    crop: np.ndarray
    flip: np.ndarray
    source_index: np.ndarray
    key: np.ndarray

    def __len__(self) -> int:
        return self.stop - self.start


class Cache:
    """A finished cache. `len(cache)` is the number of views; `cache[i]` a `ViewRecord`."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")
        self._fs, self._path = fsspec.core.url_to_fs(self.root)
        manifest_path = f"{self._path}/{MANIFEST}"
        if not self._fs.exists(manifest_path):
            if self._fs.exists(f"{self._path}/config.yaml"):
                raise UserError(f"cache {root} is incomplete: extraction has not finished; rerun the same "
                                f"`g2sd-cache extract` command to complete it")
            raise UserError(f"{root} is not a g2sd-cache cache (no {MANIFEST}); create one with `g2sd-cache extract`")
        self.manifest = Manifest.from_json(self._fs.cat_file(manifest_path).decode())
        self.codec = codecs.get_codec(self.manifest.codec)
        self.shard_images = [s["images"] for s in self.manifest.shards]
        views_per_shard = [s["views"] for s in self.manifest.shards]
        self._offsets = np.cumsum([0] + views_per_shard).tolist()
        m = self.manifest
        self._array_names = list(array_specs(self.codec, m.tokens, m.target_dim, m.tokens - 1))
        self._open: dict[int, dict[str, zarr.Array]] = {}
        self._indexes_checked: set[tuple[int, int]] = set()
        self._pid = os.getpid()

    # -- pickling / fork safety ------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"], state["_indexes_checked"] = {}, set()
        return state

    def _arrays(self, shard: int) -> dict[str, zarr.Array]:
        if self._pid != os.getpid():  # forked: handles (and zarr's event loop thread) belong to the parent
            self._open, self._indexes_checked, self._pid = {}, set(), os.getpid()
        if shard not in self._open:
            entry = self.manifest.shards[shard]
            base = f"{self._path}/{entry['name']}"
            for rel, size in entry["files"].items():
                try:
                    actual = self._fs.size(f"{base}/{rel}")
                except FileNotFoundError:
                    raise CacheCorruptError.in_shard(entry["name"], f"file {rel} is missing") from None
                if actual != size:
                    raise CacheCorruptError.in_shard(entry["name"], f"file {rel} has {actual} bytes, the manifest says {size}")
            try:
                group = zarr.open_group(store=_strict_store(f"{self.root}/{entry['name']}"), mode="r")
                self._open[shard] = {name: group[name] for name in self._array_names}
            except Exception as e:
                raise CacheCorruptError.in_shard(entry["name"], f"{type(e).__name__}: {e}") from e
        return self._open[shard]

    def _check_indexes(self, shard: int, view: int) -> None:
        """Before zarr reads view `view` of a shard: every inner chunk of its shard files is present in
        the file's index (zarr would read a chunk marked empty as fill values) and the index's crc32c holds."""
        entry = self.manifest.shards[shard]
        base = f"{self._path}/{entry['name']}"
        for name in self._array_names:
            layout = parse_layout(json.loads(self._fs.cat_file(f"{base}/{name}/zarr.json")))
            n_chunks = math.prod(layout.chunks_per_shard)
            for coord, rel in layout.shard_files():
                size = entry["files"].get(f"{name}/{rel}")
                if coord[0] != view or size is None:   # no file: an array with no rows
                    continue
                tail = self._fs.cat_file(f"{base}/{name}/{rel}", start=max(0, size - 16 * n_chunks - 4), end=size)
                try:
                    index = read_shard_index(tail, n_chunks, layout.index_at_end)
                except ValueError as e:
                    raise CacheCorruptError.in_shard(entry["name"], f"{name}/{rel}: {e}") from None
                if (index == MAX_UINT_64).all(axis=1).any():
                    raise CacheCorruptError.in_shard(entry["name"], f"{name}/{rel}: an inner chunk is missing from "
                                                                    f"the shard index")
        self._indexes_checked.add((shard, view))

    # -- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.views

    @property
    def views_per_image(self) -> int:
        return self.manifest.views_per_image

    def shard_name(self, shard: int) -> str:
        return self.manifest.shards[shard]["name"]

    def locate(self, i: int) -> tuple[int, int, int]:
        """Global view index -> (shard, view, image row in the shard)."""
        if not 0 <= i < len(self):
            raise IndexError(f"view {i} out of range for a cache of {len(self)} views")
        s = bisect.bisect_right(self._offsets, i) - 1
        view, row = divmod(i - self._offsets[s], self.shard_images[s])
        return s, view, row

    def read_block(self, shard: int, view: int, start: int, stop: int) -> Block:
        """Rows [start, stop) of view `view` in `shard`, in one read per array."""
        # Bounds first: zarr would clip `stop` silently, and an out-of-range view would surface below as
        # "shard is corrupt" although the caller's indices are wrong.
        if not (0 <= view < self.views_per_image and 0 <= start <= stop <= self.shard_images[shard]):
            raise IndexError(f"read_block({shard}, {view}, {start}, {stop}) is out of range: shard "
                             f"{shard} has {self.shard_images[shard]} images x {self.views_per_image} views")
        arrays = self._arrays(shard)
        if (shard, view) not in self._indexes_checked:
            self._check_indexes(shard, view)
        try:
            got = {name: arr[view, start:stop] for name, arr in arrays.items()}
        except Exception as e:  # crc32c mismatch, truncated shard file, unreadable index
            raise CacheCorruptError.in_shard(self.shard_name(shard), f"{type(e).__name__}: {e}") from e
        return Block(shard, view, start, stop, codes=got["target"], scale=got.get("scale"), mask=got["mask"],
                     crop=got["crop"], flip=got["flip"], source_index=got["source_index"], key=got["key"])

    def decode(self, codes: np.ndarray, scale: np.ndarray | None) -> torch.Tensor:
        """Stored codes (+ scale) -> float32 targets."""
        return codecs.decode(self.codec, codecs.from_storage(self.codec, codes),
                             None if scale is None else torch.from_numpy(np.asarray(scale)))

    def __getitem__(self, i: int) -> ViewRecord:
        s, view, row = self.locate(i)
        b = self.read_block(s, view, row, row + 1)
        return ViewRecord(key=str(b.key[0]), source_index=int(b.source_index[0]), view=view,
                          crop=tuple(int(c) for c in b.crop[0]), flip=bool(b.flip[0]),
                          mask=torch.from_numpy(np.array(b.mask[0])),
                          target=self.decode(b.codes, b.scale)[0])

    def iter_blocks(self, block_images: int | None = None, views: list[int] | None = None) -> Iterator[Block]:
        """Every shard's rows in blocks of `block_images` (default: the inner chunk size), for the given
        view indices (default all), in the global view order."""
        size = block_images or self.manifest.chunk_views
        for s, n in enumerate(self.shard_images):
            for view in views if views is not None else range(self.views_per_image):
                for start in range(0, n, size):
                    yield self.read_block(s, view, start, min(n, start + size))


class _MissingChunkStore(WrapperStore):
    """zarr reads a missing chunk or shard file as its fill value; the size check in `Cache._arrays` runs
    once per process, so a file that disappears after that would silently read back as zeros.
    This store raises instead, on every read (the design: absence is an error, never fill values)."""

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


def _strict_store(url: str) -> _MissingChunkStore:
    base = (zarr.storage.FsspecStore.from_url(url, read_only=True) if "://" in url
            else zarr.storage.LocalStore(url, read_only=True))
    return _MissingChunkStore(base)


def open_cache(path: str) -> Cache:
    """Open a finished cache (a directory or fsspec URL) for reading."""
    return Cache(path)
