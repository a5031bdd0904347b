"""Reading a cache: `open_cache(path)` -> `Cache`, with per-view records and block reads.

Global view order: shard by shard; inside a shard view 0 of every image, then view 1, ... (the
on-disk order). `cache[i]` decodes one view; streaming code calls `read_block`, which returns a run
of images of one view. On a local disk the fixed-width arrays (targets, scales, masks, crops, ...)
are memory-mapped and sliced without zarr's per-call cost (~1 ms, docs/design.md §5); string keys and
remote caches go through zarr (cache/shard_files.py).

Integrity: a shard's files are checked against the manifest (present, right size) the first time a
process touches the shard; each shard file's index is checked when the file is opened, and every
inner chunk's crc32c before its first use. Any failure raises `CacheCorruptError` naming the shard:
a missing chunk never reads back as fill values.

The object is safe to pickle into DataLoader workers and across fork: maps and zarr handles are
opened lazily per process and never pickled.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Iterator

import fsspec
import numpy as np
import torch
import zarr

from g2sd_cache.cache import codecs, lossless, lowrank
from g2sd_cache.common.errors import CacheCorruptError
from g2sd_cache.cache.digests import (chunk_file_digest, digest_mismatch, downloaded_file_problem, fsspec_reader,
                                      is_metadata, local_reader, record_digest)
from g2sd_cache.cache.local_mirror import FileSpec, LocalCacheConfig, LocalMirror
from g2sd_cache.cache.manifest_checks import array_problems, basis_problem, manifest_problems, record_problems, typed_manifest, unlisted_shards
from g2sd_cache.cache.schema import SHARD_RECORD, decode_keys, parse_manifest, read_manifest_text
from g2sd_cache.cache.lossless import LOSSLESS_ARRAY
from g2sd_cache.cache.pixel_codecs import JPEG_ARRAY, decode_jpegs
from g2sd_cache.cache.shard_files import (ChunkRows, MappedBytesShardFile, MappedShardFile, ZarrShardFile, can_map,
                                          can_map_bytes, chunk_groups, strict_store)
from g2sd_cache.cache.shard_reader import ShardReader
from g2sd_cache.cache.zarr_layout import ArrayLayout


@dataclass(frozen=True)
class ViewRecord:
    """One cached view. crop = (top, left, height, width); mask: [L] bool (True = hidden);
    target: [T, D] float32, decoded from the cache's codec; pixels: the visible patches as rendered,
    [n_keep, p, p, 3] uint8 (None for a cache extracted with --pixels none)."""

    key: str
    source_index: int
    view: int
    crop: tuple[int, int, int, int]
    flip: bool
    mask: torch.Tensor
    target: torch.Tensor
    pixels: torch.Tensor | None = None


@dataclass
class Block:
    """Images [start, stop) of view `view` of shard `shard`, as stored. Arrays have n = stop - start rows:
    codes [n, T, D'] (codec storage dtype), scale [n, T] float32 (int4: [n, T, D/32] float16) or None, mask [n, L], crop [n, 4], flip [n],
    source_index [n], key [n], pixels [n, n_keep, p, p, 3] uint8 or None."""

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
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return self.stop - self.start


class Cache(ShardReader):
    """A finished cache. `len(cache)` is the number of views; `cache[i]` a `ViewRecord`. Its shard files are
    read through `ShardReader` (cache/shard_reader.py): per process, in an LRU, each shard checked at first touch."""

    PER_PROCESS = (*ShardReader.PER_PROCESS, "_groups", "_digests", "_image_crc32c", "_layouts", "_mirror_obj")

    def __init__(self, root: str, local_cache: LocalCacheConfig | None = None):
        self.root = str(root).rstrip("/")
        self._fs, self._path = fsspec.core.url_to_fs(self.root)
        protocols = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
        self._local = "file" in protocols
        text = read_manifest_text(self._fs, self._path, root)
        # A remote cache read through a node-local copy of its files (cache/local_mirror.py), one folder
        # per cache content (the manifest's digest), so two caches never share a file name.
        self._mirror_cfg = None if self._local or local_cache is None else local_cache
        self._mirror_key = record_digest(text.encode())[:16]
        self.fetched_mark = 0    # the local copy's fetched bytes at the start of the epoch (train reports the difference)
        data = parse_manifest(text)
        # What verify checks about the manifest, with its words, before anything is read (cache/manifest_checks.py).
        folders = [p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(self._path, detail=False)]
        problems = manifest_problems(data) + unlisted_shards(data, folders)
        if problems:
            raise CacheCorruptError(f"cache {root} does not agree with its manifest: {problems[0][0]}: {problems[0][1]}"
                                    f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; run "
                                    f"`g2sd-cache verify {root}` for the full report, then re-extract the cache")
        self.manifest = typed_manifest(data)
        # The cache's identity, whatever path names it: its manifest (which binds every shard.json, and through them
        # every file, by digest) but the date it was written, so a re-extraction with the same settings is the same.
        self.fingerprint = hashlib.sha256(json.dumps({k: v for k, v in data.items() if k != "created"},
                                                     sort_keys=True).encode()).hexdigest()
        self.codec = codecs.get_codec(self.manifest.codec)
        self.basis = self._load_basis(data, root)
        self.shard_images = [s.images for s in self.manifest.shards]
        views_per_shard = [s.views for s in self.manifest.shards]
        self._offsets = np.cumsum([0] + views_per_shard).tolist()
        m = self.manifest
        self._specs = m.specs()
        self._reset()
        if m.shards:   # the manifest's codec, target_dim, img_size against the arrays' shapes and dtypes, now
            self._check_sizes(0, arrays_only=True)

    def _load_basis(self, data: dict, shown: str) -> torch.Tensor | None:
        """A low-rank cache's basis [R + 1, D] float32, checked against the manifest's digest; None for the
        other codecs. A missing or altered basis refuses the cache: its codes mean nothing without it."""
        raw: dict[str, bytes | None] = {}

        def read(rel: str) -> bytes | None:
            try:
                raw[rel] = self._fs.cat_file(f"{self._path}/{rel}")
            except FileNotFoundError:
                raw[rel] = None
            return raw[rel]

        problem = basis_problem(data, read)
        if problem:
            raise CacheCorruptError(f"cache {shown}: {problem[1]}; re-extract the cache")
        return lowrank.load_basis(raw[lowrank.BASIS_FILE]) if raw else None

    def _reset(self) -> None:
        """Per-process state (ShardReader's, and: zarr groups, each shard's file digests and image crc32c)."""
        super()._reset()
        self._groups: dict[int, zarr.Group] = {}
        self._digests: dict[int, dict[str, str]] = {}     # shard -> its record's file digests
        self._image_crc32c: dict[int, list[int]] = {}   # shard -> crc32c of each row's source image
        self._layouts: dict[tuple[int, str], ArrayLayout] = {}
        self._mirror_obj: LocalMirror | None = None

    def _check_sizes(self, shard: int, arrays_only: bool = False) -> None:
        """Once per shard and process, before its data is read: shard.json is the record the manifest holds a
        digest of and agrees with it, every array's zarr.json is the recorded one and has the manifest's shape
        and dtype, and every file is there at its recorded size. (Each data file's digest is checked when it
        is opened: `_check_digest`.) `arrays_only` (at open): only the zarr.json that exist against the
        manifest, so that a damaged shard fails when it is read, which --on-error skip can leave out."""
        entry = self.manifest.shards[shard]
        name, base = entry.name, f"{self._path}/{entry.name}"

        read: dict[str, bytes | None] = {}

        def cat(rel: str) -> bytes | None:   # each small file read once
            if rel not in read:
                try:
                    read[rel] = self._fs.cat_file(f"{base}/{rel}")
                except FileNotFoundError:
                    if not arrays_only:
                        raise CacheCorruptError.in_shard(name, f"file {rel} is missing") from None
                    read[rel] = None
            return read[rel]

        if not (self._local or arrays_only):   # a store: the small files in one concurrent round of GETs (no HEADs)
            rels = [SHARD_RECORD, *(f"{a}/zarr.json" for a in self._specs)]
            got = self._fs.cat_ranges([f"{base}/{r}" for r in rels], [0] * len(rels), [None] * len(rels))
            read.update((r, g) for r, g in zip(rels, got) if isinstance(g, bytes))   # errors: cat() names them
        record, problems = (None, []) if arrays_only else record_problems(self.manifest, shard, cat(SHARD_RECORD))
        for array, spec in ([] if problems else self._specs.items()):
            kn, meta = (self.manifest.views_per_image, entry.images), cat(f"{array}/zarr.json")
            problems += array_problems(name, array, spec, kn, meta)[1] if meta is not None else []
        if problems:
            raise CacheCorruptError.in_shard(name, problems[0][1])
        if arrays_only:
            return
        # on a store one listing, not a request per file (~10 ms of CPU and a round trip each)
        listed = None if self._local else {p[len(base) + 1:]: int(i.get("size") or 0) for p, i in
                                           self._fs.find(base, detail=True).items() if i.get("type") != "directory"}
        for rel, size in entry.files.items():
            try:
                actual = self._fs.size(f"{base}/{rel}") if listed is None else listed[rel]
            except (FileNotFoundError, KeyError):
                raise CacheCorruptError.in_shard(name, f"file {rel} is missing") from None
            if actual != size:
                raise CacheCorruptError.in_shard(name, f"file {rel} has {actual} bytes, the manifest says {size}")
        digests = record.get("digests") if isinstance(record.get("digests"), dict) else {}
        for rel in filter(is_metadata, entry.files):   # the zarr.json read above are the recorded ones
            problem = digest_mismatch(rel, record_digest(cat(rel)), digests)
            if problem:
                raise CacheCorruptError.in_shard(name, problem)
        for array in self._specs:     # the zarr.json just read and checked: parsed from those bytes, not fetched again
            if read.get(f"{array}/zarr.json") is not None and (shard, array) not in self._layouts:
                self._layouts[(shard, array)] = self._layout(name, array, lambda a=array: read[f"{a}/zarr.json"])
        self._digests[shard] = digests
        self._image_crc32c[shard] = list(record.get("image_crc32c") or [])

    def _check_digest(self, shard: int, rel: str, layout: ArrayLayout) -> None:
        """Once per file and process, before it is read: a zarr shard file's digest (its index and every inner
        chunk's crc32c: a few KB; the chunks' bytes are checked against those crc32c at first use) is the one
        its shard.json records for its path, so a file moved, swapped or copied in from another cache is
        refused although its own checksums hold."""
        name = self.manifest.shards[shard].name
        path = f"{self._path}/{name}/{rel}"
        read = local_reader(path) if self._local else fsspec_reader(self._fs, path)
        try:
            problem = digest_mismatch(rel, chunk_file_digest(read, self._fs.size(path), layout), self._digests[shard])
        except FileNotFoundError:
            problem = f"file {rel} is missing"
        except ValueError as e:
            problem = f"{rel}: {e}"
        if problem:
            raise CacheCorruptError.in_shard(name, problem)

    def image_crc32c(self, shard: int, row: int) -> int | None:
        """crc32c of the source image bytes extract read for image `row` of `shard` (None if not recorded):
        the image path of training checks what it reads against it (digests.check_image)."""
        self._touch(shard)
        crcs = self._image_crc32c[shard]
        return crcs[row] if row < len(crcs) else None

    def _open_file(self, shard: int, view: int, name: str, verified: set[int]) -> MappedShardFile | ZarrShardFile:
        """The reader of array `name`, view `view` of `shard` (ShardReader._file keeps it per process)."""
        entry = self.manifest.shards[shard]
        base = f"{self._path}/{entry.name}"
        layout = self._array_layout(shard, name)
        rel = f"{name}/" + next(r for coord, r in layout.shard_files() if coord[0] == view)
        if self._mirror_cfg is not None and can_map(layout, True):   # digest checked on arrival
            self._drop_evicted_maps()
            local = self.mirror.path(FileSpec(shard, entry.name, rel, entry.files.get(rel, 0)))
            return MappedShardFile(local, layout, entry.name, rel, verified)
        self._check_digest(shard, rel, layout)
        if can_map(layout, self._local):
            return MappedShardFile(f"{base}/{rel}", layout, entry.name, rel, verified)
        if can_map_bytes(layout, self._local):
            return MappedBytesShardFile(f"{base}/{rel}", layout, entry.name, rel, verified)
        size = entry.files.get(rel, 0)
        index_bytes = 16 * math.prod(layout.chunks_per_shard) + 4
        try:
            tail = self._fs.cat_file(f"{base}/{rel}", start=max(0, size - index_bytes), end=size)
        except FileNotFoundError:
            raise CacheCorruptError.in_shard(entry.name, f"file {rel} is missing") from None
        return ZarrShardFile(self._group(shard)[name], view, tail, layout, entry.name, rel)

    def _drop_evicted_maps(self) -> None:
        """Close the maps of local copies the mirror (of any rank on this node) has evicted since: a removed file
        that is still mapped keeps its disk blocks, so without this the node-local folder could hold up to
        OPEN_FILES files beyond --local-cache-limit. Runs at each new open, so an evicted file is let go by the
        time the next one is read."""
        for key in [k for k, f in self._files.items() if isinstance(f, MappedShardFile) and f.unlinked()]:
            del self._files[key]

    def _array_layout(self, shard: int, name: str) -> ArrayLayout:
        """Array `name`'s layout in `shard`, read once per process."""
        key = (shard, name)
        if key not in self._layouts:
            entry = self.manifest.shards[shard]
            self._layouts[key] = self._layout(entry.name, name,
                                              lambda: self._fs.cat_file(f"{self._path}/{entry.name}/{name}/zarr.json"))
        return self._layouts[key]

    # -- the node-local copy of a remote cache (cache/local_mirror.py) --------------------------------
    @property
    def mirror(self) -> LocalMirror | None:
        """This process's local mirror (None for a local cache or without a local cache configured)."""
        if self._mirror_cfg is None:
            return None
        self._this_process()
        if self._mirror_obj is None:
            folder = os.path.join(self._mirror_cfg.folder, self._mirror_key)
            self._mirror_obj = LocalMirror(self._fs, self._path, self.root, folder, self._mirror_cfg, self._mirrored_problem)
        return self._mirror_obj

    def _mirrored_problem(self, spec: FileSpec, path: str) -> str | None:
        """What is wrong with a downloaded file, by the digest its shard.json records (None: nothing)."""
        self._touch(spec.shard)
        if is_metadata(spec.rel):
            with open(path, "rb") as f:
                return digest_mismatch(spec.rel, record_digest(f.read()), self._digests[spec.shard])
        layout = self._array_layout(spec.shard, spec.rel.split("/")[0])
        return downloaded_file_problem(path, spec.rel, layout, self._digests[spec.shard])

    def close(self) -> None:
        """Stop this process's downloads (a remote cache read through a local copy); reading reopens them."""
        if self._mirror_obj is not None and self._pid == os.getpid():
            self._mirror_obj.close()
            self._mirror_obj = None

    def view_files(self, shard: int, view: int) -> list[FileSpec]:
        """The shard files a read of view `view` of `shard` opens (one per array), from the manifest."""
        entry = self.manifest.shards[shard]
        return [FileSpec(shard, entry.name, rel, size) for rel, size in sorted(entry.files.items())
                if rel.split("/")[0] in self._specs and rel.split("/")[1:3] == ["c", str(view)]]

    def plan_reads(self, shards: list[list[int]], view: int) -> None:
        """The shards this node reads next, step by step, for view `view`: the local mirror prefetches their files
        and evicts by it. No effect on a local cache."""
        if self.mirror is not None:
            self.mirror.set_plan(shards, lambda s: self.view_files(s, view))

    def _group(self, shard: int) -> zarr.Group:
        if shard not in self._groups:
            name = self.manifest.shards[shard].name
            try:
                self._groups[shard] = zarr.open_group(store=strict_store(f"{self.root}/{name}"), mode="r")
            except Exception as e:
                raise CacheCorruptError.in_shard(name, f"{type(e).__name__}: {e}") from e
        return self._groups[shard]

    # -- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.views

    @property
    def views_per_image(self) -> int:
        return self.manifest.views_per_image

    @property
    def specs(self) -> dict:
        """The per-view arrays of every shard (schema.ArraySpec by name)."""
        return self._specs

    @property
    def has_pixels(self) -> bool:
        """Whether every view's visible patches are stored (then training needs no images)."""
        return "pixels" in self._specs or JPEG_ARRAY in self._specs or LOSSLESS_ARRAY in self._specs

    @property
    def lossless(self) -> bool:
        """Whether the pixels are stored filtered and compressed (--pixels lossless): `take` can then hand out the
        host's part of their decoding alone (array `lossless`, residual planes) for the device to finish."""
        return LOSSLESS_ARRAY in self._specs

    @property
    def residual_shape(self) -> tuple[int, int, int, int]:
        """(n_keep, 3, p, p): one view's residual planes, as `take` writes them for a lossless cache."""
        g = self.manifest.geometry
        return lossless.residual_shape(g.num_visible, g.patch_size)

    @property
    def pixel_shape(self) -> tuple[int, int, int, int]:
        """(n_keep, p, p, 3): one view's visible patches as read (decoded, for a jpeg cache)."""
        g = self.manifest.geometry
        return g.num_visible, g.patch_size, g.patch_size, 3

    @property
    def jpeg_decoder(self) -> str | None:
        """The decoder that gave the teacher its pixels ("cpu" or "cuda"), None unless the cache stores JPEGs."""
        return self.manifest.pixel_encoding.get("decoder") if JPEG_ARRAY in self._specs else None

    @property
    def jpeg_device(self) -> str:
        """Where this process decodes the cache's JPEGs: on the GPU if the teacher's pixels came from nvjpeg
        and there is one here, else with libjpeg-turbo (for a "cuda" cache without a GPU that may differ from
        the teacher's pixels by the two IDCTs' rounding: train.py says so)."""
        return "cuda" if self.jpeg_decoder == "cuda" and torch.cuda.is_available() else "cpu"

    def decode_pixels(self, blobs, device: str | None = None) -> torch.Tensor:
        """JPEG bytes of B views -> uint8 [B, n_keep, p, p, 3] on `device` (default: `jpeg_device`)."""
        n_keep, p = self.pixel_shape[:2]
        return decode_jpegs(list(blobs), n_keep, p, device or self.jpeg_device)

    def shard_name(self, shard: int) -> str:
        return self.manifest.shards[shard].name

    def locate(self, i: int) -> tuple[int, int, int]:
        """Global view index -> (shard, view, image row in the shard)."""
        if not 0 <= i < len(self):
            raise IndexError(f"view {i} out of range for a cache of {len(self)} views")
        s = bisect.bisect_right(self._offsets, i) - 1
        view, row = divmod(i - self._offsets[s], self.shard_images[s])
        return s, view, row

    def read_block(self, shard: int, view: int, start: int, stop: int) -> Block:
        """Rows [start, stop) of view `view` in `shard`. On a local disk the fixed-width arrays are read-only
        views of the memory-mapped shard files: copy them before writing."""
        # Bounds first: an out-of-range request is the caller's mistake, not a corrupt shard.
        if not (0 <= view < self.views_per_image and 0 <= start <= stop <= self.shard_images[shard]):
            raise IndexError(f"read_block({shard}, {view}, {start}, {stop}) is out of range: shard "
                             f"{shard} has {self.shard_images[shard]} images x {self.views_per_image} views")
        if self._mirror_cfg is not None:
            self.mirror.touch(shard)
        got = {name: self._file(shard, view, name).rows(start, stop) if stop > start else self._empty(name)
               for name in self._specs if name != LOSSLESS_ARRAY}
        if JPEG_ARRAY in got:
            got["pixels"] = self.decode_pixels(got.pop(JPEG_ARRAY)).cpu().numpy()
        if self.lossless:
            got["pixels"] = self._unpack(shard, view, np.arange(start, stop))
        return Block(shard, view, start, stop, codes=got["target"], scale=got.get("scale"), mask=got["mask"],
                     crop=got["crop"], flip=got["flip"], source_index=got["source_index"],
                     key=decode_keys(got["key"]), pixels=got.get("pixels"))

    def _residuals(self, shard: int, f, rows: np.ndarray, dest: np.ndarray, at: list[int]) -> None:
        """The lossless frames of rows `rows` of shard file `f` -> residual planes dest[at[i]] (uint8 [n_keep, 3, p, p]
        rows): the host's decoding, straight from the map for a local file (no object per view)."""
        try:
            if isinstance(f, MappedBytesShardFile):
                lossless.decompress_spans(f.buf, f.spans(rows), dest, at)
            else:
                blobs = np.empty(len(rows), dtype=object)    # a remote file's: bytes read through zarr
                f.take(rows, blobs, np.arange(len(rows)))
                for blob, a in zip(blobs, at):
                    lossless.decompress_into(blob, dest[a])
        except ValueError as e:   # its chunk's crc32c held: written so, or by another encoder
            raise CacheCorruptError.in_shard(self.shard_name(shard), f"{LOSSLESS_ARRAY}: {e}") from None

    def _unpack(self, shard: int, view: int, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` of view `view` of a lossless `shard` -> their patches uint8 [n, n_keep, p, p, 3], decoded here."""
        res = np.empty((len(rows), *self.residual_shape), dtype=np.uint8)
        if len(rows):
            self._residuals(shard, self._file(shard, view, LOSSLESS_ARRAY), rows, res, list(range(len(rows))))
        return lossless.unfilter(torch.from_numpy(res)).numpy()

    def take(self, shard: int, view: int, rows: np.ndarray, out: dict[str, np.ndarray], at: np.ndarray) -> None:
        """Scatter rows `rows` of view `view` of `shard` into `out[name][at]` for every array named in `out`
        (any of the cache's arrays but `key`): the trainer's read, straight from the memory-mapped shard
        files into its (pinned) batch buffers, one copy per byte. Rows may come in any order.
        A lossless cache's `pixels` are decoded whole on the host; `lossless` [.., n_keep, 3, p, p] receives only
        the host's part, the residual planes (`lossless.unfilter` finishes them, on the device in training)."""
        n = self.shard_images[shard]
        if self._mirror_cfg is not None:
            self.mirror.touch(shard)
        if not 0 <= view < self.views_per_image or (len(rows) and not (0 <= rows.min() and rows.max() < n)):
            raise IndexError(f"take({shard}, {view}, ...) is out of range: shard {shard} has {n} images x "
                             f"{self.views_per_image} views")
        grouped: dict[int, list[ChunkRows]] = {}   # images per inner chunk -> the rows by chunk
        for name, dest in out.items():
            if name == "pixels" and JPEG_ARRAY in self._specs:   # decoded into place: one JPEG per view
                blobs = np.empty(len(rows), dtype=object)
                self._file(shard, view, JPEG_ARRAY).take(rows, blobs, np.arange(len(rows)))
                dest[at] = self.decode_pixels(blobs).cpu().numpy()
            elif name == LOSSLESS_ARRAY and self.lossless:   # decompressed into place
                self._residuals(shard, self._file(shard, view, LOSSLESS_ARRAY), rows, dest, at.tolist())
            elif name == "pixels" and self.lossless:
                dest[at] = self._unpack(shard, view, rows)
            else:
                f = self._file(shard, view, name)
                if isinstance(f, MappedShardFile):   # rows grouped by inner chunk once for all the arrays
                    if f.inner not in grouped:
                        grouped[f.inner] = chunk_groups(rows, at, f.inner)
                    f.take_chunks(grouped[f.inner], dest)
                else:
                    f.take(rows, dest, at)

    def keys(self, shard: int, view: int, rows: np.ndarray) -> list[str]:
        """The source keys of rows `rows` of view `view` of `shard` (keys are zero-padded per shard)."""
        width = self._file(shard, view, "key").row_shape
        codes = np.zeros((len(rows), *width), dtype=np.uint8)
        self.take(shard, view, rows, {"key": codes}, np.arange(len(rows)))
        return decode_keys(codes).tolist()

    def _empty(self, name: str, rows: int = 0) -> np.ndarray:
        if name in (JPEG_ARRAY, LOSSLESS_ARRAY):
            return np.zeros((rows, *self.pixel_shape), dtype=np.uint8)
        spec = self._specs[name]
        return np.zeros((rows, *(d or 1 for d in spec.per_view_shape)), dtype=spec.dtype)

    def blank_block(self, rows: int) -> Block:
        """A block of `rows` zero views (empty keys): the stand-in for rows that could not be read."""
        z = {"pixels" if name in (JPEG_ARRAY, LOSSLESS_ARRAY) else name: self._empty(name, rows) for name in self._specs}
        return Block(-1, -1, 0, rows, codes=z["target"], scale=z.get("scale"), mask=z["mask"], crop=z["crop"],
                     flip=z["flip"], source_index=z["source_index"], key=decode_keys(z["key"]), pixels=z.get("pixels"))

    def decode(self, codes: np.ndarray, scale: np.ndarray | None) -> torch.Tensor:
        """Stored codes (+ scale) -> float32 targets."""
        return codecs.decode(self.codec, codecs.from_storage(self.codec, np.array(codes)),
                             None if scale is None else torch.from_numpy(np.array(scale)), basis=self.basis)

    def __getitem__(self, i: int) -> ViewRecord:
        s, view, row = self.locate(i)
        b = self.read_block(s, view, row, row + 1)
        return ViewRecord(key=str(b.key[0]), source_index=int(b.source_index[0]), view=view,
                          crop=tuple(int(c) for c in b.crop[0]), flip=bool(b.flip[0]),
                          mask=torch.from_numpy(np.array(b.mask[0])),
                          target=self.decode(b.codes, b.scale)[0],
                          pixels=None if b.pixels is None else torch.from_numpy(np.array(b.pixels[0])))

    def iter_blocks(self, block_images: int | None = None, views: list[int] | None = None) -> Iterator[Block]:
        """Every shard's rows in blocks of `block_images` (default: the inner chunk size), for the given
        view indices (default all), in the global view order."""
        size = block_images or self.manifest.chunk_views
        for s, n in enumerate(self.shard_images):
            for view in views if views is not None else range(self.views_per_image):
                for start in range(0, n, size):
                    yield self.read_block(s, view, start, min(n, start + size))


def open_cache(path: str, local_cache: LocalCacheConfig | None = None) -> Cache:
    """Open a finished cache (a directory or fsspec URL) for reading; a URL's shard files are read through
    `local_cache` (a node-local copy) when it is given, else straight from the store."""
    return Cache(path, local_cache)
