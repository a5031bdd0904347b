"""Digests that bind a cache's content to its place, and its views to the source images extract read.

- `shard_digests`: of every file under a shard, recorded in shard.json keyed by the file's path. For
  a zarr shard file (`chunk_file_digest`) it hashes the shard index and every inner chunk's stored
  crc32c (a few KB, not the file): each chunk's bytes are checked against that crc32c before first use
  (reader) or in full (verify), so together they pin every byte, and a file moved to another path,
  swapped with another view's or copied in from another cache no longer matches its record. The small
  files (zarr.json) are hashed whole (`record_digest`). blake2b-128: collisions by accident are out of
  reach, and it is in the standard library.
- `record_digest`: also of a shard.json's bytes, recorded in the manifest.
- `image_crc32c`: of a source image's bytes, recorded per image in shard.json; `check_image` compares
  an image read at train or verify time with it (a same-size replacement keeps the listing fingerprint).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Callable

import google_crc32c

from g2sd_cache.common.errors import UserError
from g2sd_cache.cache.zarr_layout import MAX_UINT_64, ArrayLayout, chunk_crc_ok, parse_layout, read_shard_index

# Reads byte ranges [(start, stop), ...] of one file; returns their bytes in order.
RangeReader = Callable[[list[tuple[int, int]]], list[bytes]]


def _blake(data: bytes = b"") -> "hashlib._Hash":
    return hashlib.blake2b(data, digest_size=16)


def record_digest(data: bytes) -> str:
    """Digest of a shard.json (or any small file), as the manifest records it."""
    return _blake(data).hexdigest()


def chunk_file_digest(read: RangeReader, size: int, layout: ArrayLayout) -> str:
    """Digest of a zarr shard file of `size` bytes: its index and each inner chunk's trailing crc32c.
    Raises ValueError for an index that is short, fails its crc32c or points outside the file."""
    n = math.prod(layout.chunks_per_shard)
    index_len = 16 * n + 4
    if size < index_len:
        raise ValueError(f"file of {size} bytes is shorter than its {index_len}-byte shard index")
    span = (size - index_len, size) if layout.index_at_end else (0, index_len)
    [index_bytes] = read([span])
    index = read_shard_index(index_bytes, n, layout.index_at_end)
    tails = []
    for off, nbytes in index.tolist():
        if off == MAX_UINT_64 and nbytes == MAX_UINT_64:
            continue
        if nbytes < 4 or off + nbytes > size:
            raise ValueError(f"an inner chunk lies outside the file (offset {off}, {nbytes} bytes)")
        tails.append((off + nbytes - 4, off + nbytes))
    h = _blake(index_bytes)
    for crc in read(tails) if tails else []:
        h.update(crc)
    return h.hexdigest()


def bytes_reader(data: bytes | memoryview) -> RangeReader:
    view = memoryview(data)
    return lambda spans: [bytes(view[a:b]) for a, b in spans]


def local_reader(path: str) -> RangeReader:
    def read(spans):
        fd = os.open(path, os.O_RDONLY)
        try:
            return [os.pread(fd, b - a, a) for a, b in spans]
        finally:
            os.close(fd)
    return read


def fsspec_reader(fs, path: str) -> RangeReader:
    return lambda spans: fs.cat_ranges([path] * len(spans), [a for a, _ in spans], [b for _, b in spans])


def is_metadata(rel: str) -> bool:
    """zarr.json files are hashed whole; everything else under an array folder is a zarr shard file."""
    return rel.rsplit("/", 1)[-1] == "zarr.json"


def shard_digests(files: dict[str, int], cat: Callable[[str], bytes],
                  reader: Callable[[str], RangeReader]) -> dict[str, str]:
    """Digest of every file of one shard (`files`: path relative to the shard -> size), as shard.json
    records them. `cat(rel)` reads a whole small file, `reader(rel)` gives a range reader; the layout of
    each zarr shard file comes from its array's zarr.json."""
    out: dict[str, str] = {}
    layouts: dict[str, ArrayLayout] = {}
    for rel in sorted(files, key=lambda r: (not is_metadata(r), r)):     # every zarr.json first
        array = rel.split("/", 1)[0] if "/" in rel else None            # None: the group's own zarr.json
        if is_metadata(rel):
            data = cat(rel)
            out[rel] = record_digest(data)
            if array is not None:
                layouts[array] = parse_layout(json.loads(data))
        elif array in layouts:
            out[rel] = chunk_file_digest(reader(rel), files[rel], layouts[array])
        else:
            raise ValueError(f"{rel} belongs to no array of the shard (no {array}/zarr.json)")
    return out


def file_digest(shard_dir, rel: str, size: int) -> str:
    """The digest of file `rel` of the local shard folder `shard_dir`, as `shard_digests` records it."""
    from pathlib import Path
    base = Path(shard_dir)
    if is_metadata(rel):
        return record_digest((base / rel).read_bytes())
    layout = parse_layout(json.loads((base / rel.split("/", 1)[0] / "zarr.json").read_text()))
    return chunk_file_digest(local_reader(str(base / rel)), size, layout)


def digest_mismatch(rel: str, digest: str, expected: dict[str, str] | None) -> str | None:
    """The problem with file `rel` having `digest`, given its record's digests (None: nothing to compare)."""
    if expected is None:
        return None
    if rel not in expected:
        return f"file {rel} has no digest in shard.json"
    if expected[rel] != digest:
        return (f"file {rel} is not the one its record describes (digest {digest[:12]}..., recorded "
                f"{expected[rel][:12]}...): moved, swapped or copied in from another cache")
    return None


def downloaded_file_problem(path: str, rel: str, layout: ArrayLayout, expected: dict[str, str] | None) -> str | None:
    """What is wrong with a downloaded zarr shard file at `path` (recorded as `rel`) before it gets its final
    name: its digest against the record, then every inner chunk's crc32c (memory speed), so a bad body never
    lands; None if it is sound."""
    try:
        digest = chunk_file_digest(local_reader(path), os.path.getsize(path), layout)
    except ValueError as e:
        return f"{rel}: {e}"
    problem = digest_mismatch(rel, digest, expected)
    if problem:
        return problem
    with open(path, "rb") as f:
        data = f.read()
    index = read_shard_index(data, math.prod(layout.chunks_per_shard), layout.index_at_end)
    for j, (off, nbytes) in enumerate(index.tolist()):
        if off != MAX_UINT_64 and not chunk_crc_ok(memoryview(data)[off:off + nbytes]):
            return f"{rel}: inner chunk {j} fails its crc32c"
    return None


def image_crc32c(data: bytes) -> int:
    """crc32c of a source image's bytes (the hash extract records per image)."""
    return google_crc32c.value(data)


class SourceChangedError(UserError):
    """A source image's bytes are not those extract read: its cached views no longer describe it."""


def check_image(data: bytes | None, expected: int | None, key: str, crc: int | None = None) -> None:
    """Raise SourceChangedError if `data` (image `key` as read now; or its `crc` if already computed) is not
    what extract hashed. `expected` None (no record of it) passes: nothing to compare with."""
    if expected is None:
        return
    got = image_crc32c(data) if crc is None else crc
    if got != expected:
        raise SourceChangedError(f"image {key} changed since the cache was extracted (crc32c {got:08x}, the cache "
                                 f"recorded {expected:08x}): its cached views no longer match it; restore the "
                                 f"original or re-extract the cache")
