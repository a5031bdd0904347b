"""verify, first layer: the files. Without trusting anything, check that every file the manifest lists is there,
is the one its shard.json records for its path, and holds its checksums; decode the small per-view arrays
for the content checks (verify/content.py).

Checksums are read from the zarr v3 sharding layout directly (cache/zarr_layout.py) instead of decoding through zarr:
at the end of each shard file, per inner chunk (offset, nbytes) as little-endian uint64 and the crc32c of that
index; each chunk ends in the crc32c of the rest. One read per file, the checksum at memory speed, and a failure
names the shard, the array and the inner chunk. An empty index entry (offset = nbytes = 2**64-1) inside the array
is a missing chunk, which zarr would silently read back as fill values: a problem here.
"""
from __future__ import annotations


import json
import math
from dataclasses import dataclass, field

import fsspec
import numpy as np

from g2sd_cache.cache.digests import bytes_reader, chunk_file_digest, digest_mismatch, is_metadata, record_digest
from g2sd_cache.common.errors import UserError
from g2sd_cache.cache.manifest_checks import array_problems, record_problems
from g2sd_cache.cache.schema import (FORMAT_VERSION, MANIFEST, SHARD_RECORD, TMP_MARK, Manifest, decode_keys, parse_manifest,
                     read_manifest_text, required_fields)
from g2sd_cache.cache.zarr_layout import MAX_UINT_64, ArrayLayout, chunk_crc_ok, read_shard_index

# Bits that make a stored code NaN/Inf: (mask, value) with code & mask == value.
_NONFINITE = {"fp16": (0x7C00, 0x7C00), "bf16": (0x7F80, 0x7F80), "fp8": (0x7F, 0x7F)}
# Arrays too large to keep in memory for the content checks: their checksums are checked, their values are not
# decoded here (targets: NaN/Inf bits only; pixels: compared with the images by verify_content, shard by shard).
_NOT_KEPT = ("target", "pixels", "jpeg", "lossless")


@dataclass
class VerifyReport:
    """What `verify_cache` found: `problems` (one line each, empty when the cache is sound), the shards
    a problem was found in (`broken`), and `summary` (figures for the one-screen report)."""

    path: str
    problems: list[str] = field(default_factory=list)
    broken: set[str] = field(default_factory=set)
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")
        if where.startswith("shard-"):
            self.broken.add(where)


@dataclass
class ShardFiles:
    """What the file layer learnt about one shard: its record's skipped inputs, file digests and per-row
    source image crc32c, and the decoded small arrays ([K, n, ...] numpy; keys as str)."""

    skipped: list[dict] | None = None
    digests: dict[str, str] | None = None
    image_crc32c: list = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class FileChecker:
    def __init__(self, path: str, report: VerifyReport):
        self.path = str(path).rstrip("/")
        self.report = report
        self.fs, root = fsspec.core.url_to_fs(self.path)
        self.root = root.rstrip("/")
        self.chunks = self.files = self.arrays = self.bytes = 0
        self.top_dirs: set[str] = set()                # folders directly under the cache
        self.manifest: Manifest | None = None

    def rel(self, p: str) -> str:
        return p[len(self.root) + 1:] if p.startswith(self.root + "/") else p

    def cat(self, rel: str) -> bytes:
        return self.fs.cat_file(f"{self.root}/{rel}")

    # -- manifest and listing ------------------------------------------------------------------
    def load_manifest(self) -> dict | None:
        """The manifest's JSON object; None (reported) when it cannot be read at all."""
        if not self.fs.isdir(self.root):
            raise UserError(f"{self.path} is not a directory; pass the folder written by `g2sd-cache extract`")
        text = read_manifest_text(self.fs, self.root, self.path)
        try:
            data = json.loads(text)
        except ValueError as e:
            self.report.add(MANIFEST, f"does not parse ({type(e).__name__}: {e}); the cache cannot be checked further")
            return None
        if not isinstance(data, dict):
            self.report.add(MANIFEST, "is not a JSON object; the cache cannot be checked further")
            return None
        if data.get("format_version") != FORMAT_VERSION:
            parse_manifest(text)          # an unsupported format version is the user's problem: UserError
        missing = [k for k in required_fields() if k not in data]
        if missing:
            self.report.add(MANIFEST, f"lacks {', '.join(missing)}; the cache cannot be checked further")
            return None
        return data

    def listing(self) -> dict[str, int]:
        """Every file under the cache (relative path -> size); temporaries are reported here."""
        found = self.fs.find(self.root, withdirs=True, detail=True)
        files = {}
        reported_tmp: list[str] = []
        for p, info in sorted(found.items()):
            rel = self.rel(p.rstrip("/"))
            if TMP_MARK in rel:
                if not any(rel.startswith(t + "/") for t in reported_tmp):
                    reported_tmp.append(rel)
                    top = rel.split("/")[0]
                    where = top[1:].split(TMP_MARK)[0] if top.startswith(".shard-") else rel
                    self.report.add(where, f"leftover temporary {'folder' if info['type'] == 'directory' else 'file'} "
                                           f"{rel} (an interrupted write; rerun extract, or delete it)")
                continue
            if info["type"] != "directory":
                files[rel] = int(info["size"])
            elif "/" not in rel:
                self.top_dirs.add(rel)
        return files

    # -- one shard ------------------------------------------------------------------------------
    def check_shard(self, shard: int, on_disk: dict[str, int]) -> ShardFiles | None:
        """Files, record, digests and checksums of shard `shard`; its small arrays, or None if it is unreadable."""
        m = self.manifest
        entry = m.shards[shard]
        name = entry.name
        add = lambda what: self.report.add(name, what)  # noqa: E731
        if not entry.complete:
            add("the manifest marks it incomplete")
        mine = {k[len(name) + 1:]: v for k, v in on_disk.items() if k.startswith(name + "/")}
        if not mine:
            add("listed in the manifest but its folder is missing or empty")
            return None
        listed = entry.files
        for rel, size in sorted(listed.items()):
            if rel not in mine:
                add(f"file {rel} is missing")
            elif mine[rel] != size:
                add(f"file {rel} has {mine[rel]} bytes, the manifest says {size}")
        for rel in sorted(set(mine) - set(listed) - {SHARD_RECORD}):
            add(f"unexpected file {rel} (not in the manifest's record of the shard)")
        out = ShardFiles()
        if SHARD_RECORD not in mine:
            add(f"{SHARD_RECORD} is missing (the shard was never completed)")
        else:
            rec, problems = record_problems(m, shard, self.cat(f"{name}/{SHARD_RECORD}"))
            for where, what in problems:
                self.report.add(where, what)
            if rec is not None:
                out.skipped = list(rec.get("skipped", []))
                out.digests = rec.get("digests") if isinstance(rec.get("digests"), dict) else {}
                out.image_crc32c = rec.get("image_crc32c") or []
        for rel in sorted(listed):
            if rel in mine and is_metadata(rel):
                self.check_digest(name, rel, record_digest(self.cat(f"{name}/{rel}")), out.digests)
        for array, spec in m.specs().items():
            got = self.check_array(name, array, spec, (m.views_per_image, entry.images), listed, mine, out.digests)
            if got is not None:
                out.arrays[array] = got
        return out

    def check_array(self, shard: str, name: str, spec, kn: tuple[int, int], listed: dict, mine: dict,
                    digests: dict | None) -> np.ndarray | None:
        add = lambda what: self.report.add(shard, what)  # noqa: E731
        meta_rel = f"{name}/zarr.json"
        if meta_rel not in mine:
            if meta_rel not in listed:
                add(f"array {name} is missing")
            return None               # (a listed file that is missing was reported)
        layout, problems = array_problems(shard, name, spec, kn, self.cat(f"{shard}/{meta_rel}"))
        for where, what in problems:
            self.report.add(where, what)
        if layout is None or problems:
            return None
        self.arrays += 1
        keep = name not in _NOT_KEPT
        codec = self.manifest.codec
        nonfinite = _NONFINITE.get(codec) if name == "target" else None
        out = np.zeros(layout.shape, dtype=spec.dtype) if keep else None
        decoded_all, corrupt = True, False
        n_inner = math.prod(layout.chunks_per_shard)
        for coord, rel in layout.shard_files():
            file_rel = f"{name}/{rel}"
            if file_rel not in mine:
                if file_rel not in listed:
                    add(f"{file_rel} is missing (a whole shard file of array {name}); reading it would give "
                        f"fill values")
                corrupt = True
                continue
            data = self.cat(f"{shard}/{file_rel}")
            self.files += 1
            self.bytes += len(data)
            try:
                index = read_shard_index(data, n_inner, layout.index_at_end)
                digest = chunk_file_digest(bytes_reader(data), len(data), layout)
                corrupt |= not self.check_digest(shard, file_rel, digest, digests)
            except ValueError as e:
                add(f"{file_rel}: {e}")
                corrupt = True
                continue
            view = memoryview(data)
            index_bytes = 16 * n_inner + 4
            body_lo, body_hi = (0, len(data) - index_bytes) if layout.index_at_end else (index_bytes, len(data))
            for j, (off, nbytes) in enumerate(index.tolist()):
                start = layout.inner_start(coord, j)
                inside = all(s < n for s, n in zip(start, layout.shape))
                label = _chunk_label(file_rel, j, start, layout)
                if off == MAX_UINT_64 and nbytes == MAX_UINT_64:
                    if inside:
                        add(f"{label} is missing (empty in the shard index): zarr would read it back as fill values")
                        corrupt = True
                    continue
                self.chunks += 1
                if nbytes < 4 or off < body_lo or off + nbytes > body_hi:
                    add(f"{label} lies outside the file (offset {off}, {nbytes} bytes)")
                    corrupt = True
                    continue
                chunk = view[off:off + nbytes]
                if not chunk_crc_ok(chunk):
                    add(f"{label} fails its crc32c")
                    corrupt = True
                    continue
                if not inside:
                    continue
                if nonfinite is not None:
                    bits = np.frombuffer(chunk[:-4], dtype="<u2" if codec in ("fp16", "bf16") else "u1")
                    if bool(((bits & nonfinite[0]) == nonfinite[1]).any()):
                        add(f"{label} holds NaN or Inf targets")
                if keep:
                    arr = _decode_chunk(chunk[:-4], layout)
                    if arr is None:
                        decoded_all = False
                        continue
                    region = tuple(slice(s, min(s + c, n)) for s, c, n in zip(start, layout.inner_shape, layout.shape))
                    out[region] = arr[tuple(slice(0, r.stop - r.start) for r in region)]
        if not keep or corrupt:
            return None      # corruption is reported; content checks of this array would only echo it
        out = out if decoded_all else self._zarr_fallback(shard, name)
        return decode_keys(out) if name == "key" and out is not None else out

    def check_digest(self, shard: str, rel: str, digest: str, recorded: dict | None) -> bool:
        """A file's digest against its shard record (which binds it to its path); reports a mismatch."""
        problem = digest_mismatch(rel, digest, recorded) if recorded is not None else None  # None: no record
        if problem:
            self.report.add(shard, problem)
        return problem is None

    def _zarr_fallback(self, shard: str, name: str):
        """Content of an array stored with a codec chain this file does not decode (its checksums held):
        through zarr, or None if that fails."""
        try:
            import zarr
            return np.asarray(zarr.open_array(f"{self.path}/{shard}/{name}", mode="r")[...])
        except Exception:
            return None


def _decode_chunk(payload: memoryview, layout: ArrayLayout) -> np.ndarray | None:
    """An inner chunk's bytes (crc stripped) -> array of the inner shape, for the codec chains extract
    writes; None for any other chain (the caller then reads the array through zarr)."""
    if layout.inner_codecs == ("bytes", "crc32c"):
        dtype = np.dtype("bool" if layout.dtype == "bool" else layout.dtype).newbyteorder("<")
        arr = np.frombuffer(payload, dtype=dtype)
        return arr.reshape(layout.inner_shape) if arr.size == math.prod(layout.inner_shape) else None
    return None


def _chunk_label(file_rel: str, j: int, start: tuple[int, ...], layout: ArrayLayout) -> str:
    if len(start) >= 2:
        hi = min(start[1] + layout.inner_shape[1], layout.shape[1])
        return f"{file_rel}: inner chunk {j} (view {start[0]}, rows {start[1]}..{hi - 1})"
    return f"{file_rel}: inner chunk {j}"
