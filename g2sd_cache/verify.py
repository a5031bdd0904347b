"""`g2sd-cache verify CACHE`: check a cache end to end without trusting it.

What it checks (one problem line each: "shard-00003: what is wrong"):
- the manifest parses and agrees with the disk: every listed shard folder exists and holds exactly the
  files its record lists, at the recorded sizes; every shard folder on disk is listed; `shard.json`
  agrees with the manifest; `config.yaml` (if present) agrees with the manifest;
- view counts add up (shards, images, views, skipped inputs, the folder's image ranges tile it);
- every inner chunk's crc32c holds, and so does every shard index's. This reads the zarr v3 sharding
  index itself (at the end of each shard file: per inner chunk (offset, nbytes) as little-endian
  uint64, then the crc32c of the index; each chunk ends in the crc32c of the rest) instead of decoding
  through zarr: one read per file, the checksum at memory speed, and a failure names the shard, the
  array and the inner chunk. An empty index entry (offset = nbytes = 2**64-1) inside the array is a
  missing chunk, which zarr would silently read back as fill values: a problem here;
- no temporary or partial files (`.tmp-` names) anywhere in the cache;
- every (image, view) pair appears exactly once, all K views of a row agree on the image, rows lie in
  their shard's image range, targets hold no NaN/Inf and quantised scales are positive;
- every mask keeps exactly the manifest geometry's visible count;
- with `--data`: the listing is the one the cache was made from, keys match image indices, every crop
  box lies inside its image (image headers only, via PIL) and every stored view regenerates exactly
  from (seed, image, view);
- with `--deep N`: N random views replayed through the live teacher (decode the image, render the
  stored crop and flip, `teacher.targets`), reporting max and RMS error of stored against live
  targets, and failing any view whose relative RMS error exceeds the codec's tolerance.

Tolerances (relative RMS error of one view, ||stored - live|| / ||live||). Measured on LayerNorm-ed
targets of a random mae_vit_base_patch16 at 224 px and of the micro test teacher, fp32 on CPU, 8 views:
    codec  measured     rounding bound per value                   tolerance
    fp16   2.1e-4       2^-11 = 4.9e-4 (LN-ed values are tiny for fp16's range)   2e-3
    bf16   1.7e-3       2^-8  = 3.9e-3                                              1e-2
    int8   5.3-6.9e-3   absmax(token) / 254, per-token scale                       2e-2
    fp8    2.4-2.7e-2   2^-4  = 6.25e-2 relative (e4m3 has 3 mantissa bits)       6e-2
    int4   1.2-1.3e-1   < 1 step = absmax(32 channels) / 7.5, stochastic           4e-1
Each tolerance is 2.2x (fp8) to 10x (fp16) what the codec loses, while a wrong crop, flip, mask,
image or teacher gives errors of order 1 (LN-ed targets have unit RMS; swapping two images' targets
measures ~1.4). When bf16 autocast is involved (the manifest's `teacher_precision` says extract ran
the teacher under bf16 autocast, or the replay runs on CUDA), the teacher's own compute differs from
fp32: measured 4.9e-3 (ViT-B) and 6.3e-3 (micro) with CPU bf16 autocast, so the tolerance becomes
hypot(codec tolerance, 2e-2). int4's 4e-1 is 3x what it loses and above what it can ever lose: a group's
relative error is at most sqrt(31)/15 = 0.37 (one nonzero value, 31 zeros dithered by half a step).

Speed: the checksum pass runs at ~1 GB/s on one core (a 200 MB cache of 1024 ViT-B-sized fp16 views
in 0.2 s; reading the same cache through zarr takes 0.25 s and would not notice absent chunks).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import fsspec
import google_crc32c
import numpy as np
import yaml

from .errors import UserError
from .schema import CONFIG, FORMAT_VERSION, MANIFEST, SHARD_RECORD, TMP_MARK, Manifest, array_specs, decode_keys
from .zarr_layout import MAX_UINT_64, ArrayLayout, parse_layout, read_shard_index

CODEC_TOLERANCE = {"fp16": 2e-3, "bf16": 1e-2, "int8": 2e-2, "fp8": 6e-2, "int4": 4e-1}
BF16_COMPUTE_TOLERANCE = 2e-2
_SHARD_DIR = re.compile(r"^shard-\d{5,}$")
# Bits that make a stored code NaN/Inf: (mask, value) with code & mask == value.
_NONFINITE = {"fp16": (0x7C00, 0x7C00), "bf16": (0x7F80, 0x7F80), "fp8": (0x7F, 0x7F)}


@dataclass
class VerifyReport:
    """What `verify_cache` found: `problems` (one line each, empty when the cache is sound) and
    `summary` (figures for the one-screen report)."""

    path: str
    problems: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")

    def format_summary(self) -> str:
        s = self.summary
        lines = [f"cache    {self.path}"]
        if "codec" in s:
            lines.append(f"content  {s['views']} views = {s['images']} images x {s['views_per_image']} views in "
                         f"{s['shards']} shards, codec {s['codec']}, {s['skipped']} inputs skipped")
            lines.append(f"teacher  {s['teacher']}")
        if "chunks" in s:
            lines.append(f"checked  {s['files']} shard files of {s['arrays']} arrays, {s['chunks']} inner chunks "
                         f"({_mib(s['bytes'])}): crc32c of every chunk and index")
            lines.append(f"views    {s['pairs']} (image, view) pairs, each once; every mask keeps "
                         f"{s['visible']} of {s['patches']} patches")
        if "data_images" in s:
            lines.append(f"data     {s['data_images']} image headers read: every crop lies inside its image and "
                         f"{s['regenerated']} views regenerate from (seed, image, view)")
        if "deep" in s:
            d = s["deep"]
            lines.append(f"deep     {d['views']} views replayed on {d['device']} ({d['precision']}): rel RMS "
                         f"{d['rel_rmse']:.2e} (worst view {d['worst_rel_rmse']:.2e}), RMS {d['rmse']:.2e}, max abs "
                         f"{d['max_abs']:.2e}; tolerance {d['tolerance']:.1e} ({s['codec']}"
                         f"{', bf16 compute allowed' if d['bf16_allowance'] else ''})")
        lines.append(f"time     {s.get('seconds', 0.0):.2f} s")
        lines.append("OK: the cache is sound" if self.ok else f"FAILED: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _decode_chunk(payload: memoryview, layout: ArrayLayout) -> np.ndarray | None:
    """An inner chunk's bytes (crc stripped) -> array of the inner shape, for the codec chains extract
    writes; None for any other chain (the caller then reads the array through zarr)."""
    if layout.inner_codecs == ("bytes", "crc32c"):
        dtype = np.dtype("bool" if layout.dtype == "bool" else layout.dtype).newbyteorder("<")
        arr = np.frombuffer(payload, dtype=dtype)
        return arr.reshape(layout.inner_shape) if arr.size == math.prod(layout.inner_shape) else None
    return None


# ----------------------------------------------------------------------------------------------

class _Verifier:
    def __init__(self, path: str):
        self.path = str(path).rstrip("/")
        self.report = VerifyReport(self.path)
        self.fs, self.root = fsspec.core.url_to_fs(self.path)
        self.root = self.root.rstrip("/")
        self.chunks = self.files = self.arrays = self.bytes = 0
        self.skipped: dict[str, list[dict]] = {}      # shard -> its record's skipped inputs
        self.config: dict = {}                         # config.yaml, if present
        self.top_dirs: set[str] = set()                # folders directly under the cache
        self.manifest: Manifest | None = None

    def rel(self, p: str) -> str:
        return p[len(self.root) + 1:] if p.startswith(self.root + "/") else p

    # -- manifest and listing ------------------------------------------------------------------
    def load_manifest(self) -> Manifest | None:
        fs, root = self.fs, self.root
        if not fs.isdir(root):
            raise UserError(f"{self.path} is not a directory; pass the folder written by `g2sd-cache extract`")
        if not fs.exists(f"{root}/{MANIFEST}"):
            if fs.exists(f"{root}/{CONFIG}"):
                raise UserError(f"cache {self.path} is incomplete: extraction has not finished (no {MANIFEST}); "
                                f"rerun the same `g2sd-cache extract` command to complete it, then verify")
            raise UserError(f"{self.path} is not a g2sd-cache cache (no {MANIFEST}); create one with "
                            f"`g2sd-cache extract`")
        try:
            text = fs.cat_file(f"{root}/{MANIFEST}").decode()
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            self.report.add(MANIFEST, f"does not parse ({type(e).__name__}: {e}); the cache cannot be checked further")
            return None
        if not isinstance(data, dict):
            self.report.add(MANIFEST, "is not a JSON object; the cache cannot be checked further")
            return None
        if data.get("format_version") != FORMAT_VERSION:
            Manifest.from_json(text)          # an unsupported format version is the user's problem: UserError
        missing = [k for k in Manifest.__dataclass_fields__ if k not in data]
        if missing:
            self.report.add(MANIFEST, f"lacks {', '.join(missing)}; the cache cannot be checked further")
            return None
        try:
            return Manifest.from_json(text)
        except (UserError, KeyError, TypeError) as e:
            self.report.add(MANIFEST, f"does not load ({type(e).__name__}: {e})")
            return None

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
    def check_shard(self, m: Manifest, entry: dict, on_disk: dict[str, int], specs: dict) -> dict | None:
        """Files, record, checksums of one shard; returns its small arrays (numpy) or None if unreadable."""
        name = entry.get("name", "?")
        add = lambda what: self.report.add(name, what)  # noqa: E731
        if not entry.get("complete", False):
            add("the manifest marks it incomplete")
        mine = {k[len(name) + 1:]: v for k, v in on_disk.items() if k.startswith(name + "/")}
        if not mine:
            add("listed in the manifest but its folder is missing or empty")
            return None
        listed = entry.get("files", {})
        for rel, size in sorted(listed.items()):
            if rel not in mine:
                add(f"file {rel} is missing")
            elif mine[rel] != size:
                add(f"file {rel} has {mine[rel]} bytes, the manifest says {size}")
        for rel in sorted(set(mine) - set(listed) - {SHARD_RECORD}):
            add(f"unexpected file {rel} (not in the manifest's record of the shard)")
        if SHARD_RECORD not in mine:
            add(f"{SHARD_RECORD} is missing (the shard was never completed)")
        else:
            try:
                rec = json.loads(self.fs.cat_file(f"{self.root}/{name}/{SHARD_RECORD}").decode())
                for key, want in (("images", entry.get("images")), ("views_per_image", m.views_per_image),
                                  ("files", listed), ("source", entry.get("source"))):
                    if rec.get(key) != want:
                        add(f"{SHARD_RECORD} says {key} = {_short(rec.get(key))}, the manifest {_short(want)}")
                if f"shard-{int(rec.get('index', -1)):05d}" != name:
                    add(f"{SHARD_RECORD} says index {rec.get('index')}")
                self.skipped[name] = list(rec.get("skipped", []))
            except (ValueError, UnicodeDecodeError, TypeError, AttributeError) as e:
                add(f"{SHARD_RECORD} does not parse ({type(e).__name__}: {e})")

        n, k = int(entry.get("images", 0)), m.views_per_image
        content: dict[str, np.ndarray] = {}
        for arr_name, spec in specs.items():
            got = self.check_array(name, arr_name, spec, (k, n), listed, mine)
            if got is not None:
                content[arr_name] = got
        return content

    def check_array(self, shard: str, name: str, spec, kn: tuple[int, int], listed: dict, mine: dict):
        add = lambda what: self.report.add(shard, what)  # noqa: E731
        meta_rel = f"{name}/zarr.json"
        if meta_rel not in mine:
            if meta_rel in listed:
                return None          # already reported missing
            add(f"array {name} is missing")
            return None
        try:
            meta = json.loads(self.fs.cat_file(f"{self.root}/{shard}/{meta_rel}").decode())
            layout = parse_layout(meta)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            add(f"array {name}: {meta_rel} is not the cache format ({e})")
            return None
        self.arrays += 1
        want_shape = (*kn, *(w if w is not None else got for w, got in zip(spec.per_view_shape, layout.shape[2:])))
        want_dtype = spec.dtype
        if layout.shape != want_shape:
            add(f"array {name} has shape {list(layout.shape)}, expected {list(want_shape)} from the manifest")
            return None
        if layout.dtype != want_dtype:
            add(f"array {name} has dtype {layout.dtype}, expected {want_dtype}")
            return None
        keep = name != "target"              # decode the small arrays; targets are only checked
        codec = self.manifest.codec
        nonfinite = _NONFINITE.get(codec) if name == "target" else None
        out = np.zeros(want_shape, dtype=want_dtype) if keep else None
        decoded_all = True      # False: a codec chain this file does not decode (zarr reads it instead)
        corrupt = False
        n_inner = math.prod(layout.chunks_per_shard)
        for coord, rel in layout.shard_files():
            file_rel = f"{name}/{rel}"
            if file_rel not in mine:
                if file_rel not in listed:
                    add(f"{file_rel} is missing (a whole shard file of array {name}); reading it would give "
                        f"fill values")
                corrupt = True
                continue
            data = self.fs.cat_file(f"{self.root}/{shard}/{file_rel}")
            self.files += 1
            self.bytes += len(data)
            try:
                index = read_shard_index(data, n_inner, layout.index_at_end)
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
                if google_crc32c.value(bytes(chunk[:-4])).to_bytes(4, "little") != bytes(chunk[-4:]):
                    add(f"{label} fails its crc32c")
                    corrupt = True
                    continue
                if not inside:
                    continue
                if nonfinite is not None:
                    dt = "<u2" if codec in ("fp16", "bf16") else "u1"
                    bits = np.frombuffer(chunk[:-4], dtype=dt)
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

    def _zarr_fallback(self, shard: str, name: str):
        """Content of an array stored with a codec chain this file does not decode (its checksums held):
        through zarr, or None if that fails."""
        try:
            import zarr
            return np.asarray(zarr.open_array(f"{self.path}/{shard}/{name}", mode="r")[...])
        except Exception:
            return None

    # -- content ----------------------------------------------------------------------------------
    def check_content(self, m: Manifest, shard_content: dict[str, dict], entries: dict[str, dict]) -> int:
        """Views agree per row, (image, view) pairs unique, masks, crops, ranges. Returns the pair count."""
        geometry_visible = _visible(m)
        seen: dict[int, str] = {}
        pairs = 0
        for name, c in shard_content.items():
            add = lambda what, name=name: self.report.add(name, what)  # noqa: E731
            entry = entries[name]
            si, keys = c.get("source_index"), c.get("key")
            if si is not None:
                if not (si == si[:1]).all():
                    v, r = map(int, np.argwhere(si != si[:1])[0])
                    add(f"view {v} of row {r} holds image {si[v, r]}, view 0 of that row holds {si[0, r]}")
                if keys is not None and not (keys == keys[:1]).all():
                    v, r = map(int, np.argwhere(keys != keys[:1])[0])
                    add(f"view {v} of row {r} holds key {keys[v, r]!r}, view 0 of that row {keys[0, r]!r}")
                for r, idx in enumerate(si[0].tolist() if si.size else []):
                    label = f"image {idx}" + (f" ({keys[0, r]})" if keys is not None else "")
                    if idx in seen:
                        add(f"{label} is also in {seen[idx]}: its {m.views_per_image} (image, view) pairs appear twice")
                    else:
                        seen[idx] = name
                        pairs += m.views_per_image
                self._check_range(name, entry, si[0] if si.size else np.zeros(0, np.int64), m)
            mask = c.get("mask")
            if mask is not None and mask.size:
                visible = (~mask.astype(bool)).sum(-1)
                bad = np.argwhere(visible != geometry_visible)
                if len(bad):
                    v, r = map(int, bad[0])
                    add(f"{len(bad)} mask(s) do not keep {geometry_visible} of {mask.shape[-1]} patches visible, e.g. "
                        f"view {v} of {_row(keys, r)} keeps {int(visible[v, r])}")
            crop = c.get("crop")
            if crop is not None and crop.size:
                bad = np.argwhere((crop[..., 2] <= 0) | (crop[..., 3] <= 0) | (crop[..., 0] < 0) | (crop[..., 1] < 0))
                if len(bad):
                    v, r = map(int, bad[0])
                    add(f"view {v} of {_row(keys, r)} has crop box {crop[v, r].tolist()} (top, left, height, width): "
                        f"not a box")
            scale = c.get("scale")      # [K, n, T], int4 [K, n, T, groups]
            if scale is not None and scale.size and not bool((np.isfinite(scale) & (scale > 0)).all()):
                ok = (np.isfinite(scale) & (scale > 0)).reshape(*scale.shape[:2], -1)
                v, r = map(int, np.argwhere(~ok.all(-1))[0])
                add(f"view {v} of {_row(keys, r)} has a scale that is not finite and positive")
        return pairs

    def _check_range(self, name: str, entry: dict, rows: np.ndarray, m: Manifest) -> None:
        """Rows of a folder shard lie in its 'images a..b' range, ascending; a tar shard's are its positions."""
        add = lambda what: self.report.add(name, what)  # noqa: E731
        if m.source.get("kind") == "folder":
            got = re.fullmatch(r"images (\d+)\.\.(\d+)", str(entry.get("source", "")))
            if got:
                a, b = int(got.group(1)), int(got.group(2))
                if len(rows) and (rows.min() < a or rows.max() >= b):
                    outside = int(rows[(rows < a) | (rows >= b)][0])
                    add(f"holds images outside its range {a}..{b} (e.g. image {outside})")
                skipped = self.skipped.get(name)
                if skipped is not None and len(rows) + len(skipped) != b - a:
                    add(f"{len(rows)} images + {len(skipped)} skipped != the {b - a} of its range {a}..{b}")
            if len(rows) > 1 and not bool((np.diff(rows) > 0).all()):
                add("rows are not in ascending image order")
        elif m.source.get("kind") == "tars":
            index = int(name.split("-")[1])
            if len(rows) and not np.array_equal(rows, (index << 32) | np.arange(len(rows))):
                add(f"rows are not positions 0..{len(rows) - 1} of tar {index}")


def _visible(m: Manifest) -> int:
    from .views import ViewGeometry
    g = ViewGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.geometry.items()})
    return g.num_visible


def _row(keys, r: int) -> str:
    return f"row {r} ({keys[0, r]})" if keys is not None and keys.size else f"row {r}"


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def _chunk_label(file_rel: str, j: int, start: tuple[int, ...], layout: ArrayLayout) -> str:
    if len(start) >= 2:
        hi = min(start[1] + layout.inner_shape[1], layout.shape[1])
        return f"{file_rel}: inner chunk {j} (view {start[0]}, rows {start[1]}..{hi - 1})"
    return f"{file_rel}: inner chunk {j}"


# ----------------------------------------------------------------------------------------------

def verify_cache(path: str, deep: int = 0, teacher: str | None = None, data: str | None = None,
                 device: str = "auto", seed: int = 0) -> VerifyReport:
    """Check the cache at `path` (see the module docstring). Returns a report whose `problems` is empty
    when every check holds. Raises UserError for a path that is not a cache or unusable options."""
    t0 = time.perf_counter()
    if deep < 0:
        raise UserError("--deep must be 0 or more")
    if deep and not data:
        raise UserError("--deep replays views from their images: pass --data (the images the cache was extracted from)")
    v = _Verifier(path)
    report = v.report
    m = v.load_manifest()
    if m is None:
        report.summary["seconds"] = time.perf_counter() - t0
        return report
    v.manifest = m
    from .codecs import get_codec
    try:
        codec = get_codec(m.codec)
    except UserError:
        report.add(MANIFEST, f"unknown codec {m.codec!r}")
        return report
    patches = m.tokens - 1
    specs = array_specs(codec, m.tokens, m.target_dim, patches)
    on_disk = v.listing()
    entries = {}
    for i, e in enumerate(m.shards):
        name = e.get("name", f"shard #{i}")
        if name in entries:
            report.add(name, "listed twice in the manifest")
        entries[name] = e
    disk_shards = sorted(d for d in v.top_dirs if _SHARD_DIR.match(d))
    for name in disk_shards:
        if name not in entries:
            report.add(name, "folder on disk is not listed in the manifest (a shard from another run?)")
    for rel in sorted(on_disk):
        if "/" not in rel and rel not in (MANIFEST, CONFIG):
            report.add(rel, "unexpected file in the cache folder")
    for top in sorted(v.top_dirs):
        if not _SHARD_DIR.match(top):
            report.add(top, "unexpected folder in the cache")
    _check_config(v, m)
    _check_counts(v, m, entries)

    content = {}
    for name, entry in entries.items():
        got = v.check_shard(m, entry, on_disk, specs)
        if got is not None:
            content[name] = got
    pairs = v.check_content(m, content, entries)
    if pairs != m.views and not report.problems:
        report.add(MANIFEST, f"{pairs} (image, view) pairs found, the manifest says {m.views} views")
    recorded = [s for name in entries for s in v.skipped.get(name, [])]
    if len(v.skipped) == len(entries) and recorded != m.skipped:
        report.add(MANIFEST, f"lists {len(m.skipped)} skipped inputs, the shards' records {len(recorded)}")
    for name, c in content.items():
        keys = c.get("key")
        if keys is not None and keys.size:
            both = sorted({s.get("key") for s in v.skipped.get(name, [])} & set(keys[0].tolist()))
            if both:
                report.add(name, f"image {both[0]} is both cached and listed as skipped")

    report.summary.update(
        path=v.path, codec=m.codec, views=m.views, images=m.images, views_per_image=m.views_per_image,
        shards=len(m.shards), skipped=len(m.skipped),
        teacher=f"{m.teacher.get('arch')} ({m.teacher.get('source')}, sha256 {str(m.teacher.get('sha256'))[:12]}...), "
                f"LN(decoder block {m.target_layer})",
        arrays=v.arrays, files=v.files, chunks=v.chunks, bytes=v.bytes, pairs=pairs,
        visible=_visible(m), patches=patches)
    if data:
        _check_data(v, m, content, data)
        if deep:
            _deep_check(v, m, data, deep, teacher, device, seed)
    report.summary["seconds"] = time.perf_counter() - t0
    return report


def _check_config(v: _Verifier, m: Manifest) -> None:
    try:
        cfg = yaml.safe_load(v.fs.cat_file(f"{v.root}/{CONFIG}").decode())
    except FileNotFoundError:
        return
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        v.report.add(CONFIG, f"does not parse ({type(e).__name__})")
        return
    if not isinstance(cfg, dict):
        v.report.add(CONFIG, "is not a mapping")
        return
    v.config = cfg
    pairs = {"codec": m.codec, "views": m.views_per_image, "seed": m.seed, "target_layer": m.target_layer,
             "chunk_views": m.chunk_views, "img_size": m.geometry.get("img_size"),
             "mask_ratio": m.geometry.get("mask_ratio"), "arch": m.teacher.get("arch"),
             "teacher_sha256": m.teacher.get("sha256"), "source_fingerprint": m.source.get("fingerprint")}
    for key, want in pairs.items():
        if key in cfg and cfg[key] != want:
            v.report.add(CONFIG, f"{key} = {_short(cfg[key])} but the manifest says {_short(want)}")


def _check_counts(v: _Verifier, m: Manifest, entries: dict[str, dict]) -> None:
    add = v.report.add
    k = m.views_per_image
    for name, e in entries.items():
        if e.get("views") != e.get("images", 0) * k:
            add(name, f"{e.get('views')} views != {e.get('images')} images x {k} views per image")
    images = sum(int(e.get("images", 0)) for e in entries.values())
    views = sum(int(e.get("views", 0)) for e in entries.values())
    if images != m.images:
        add(MANIFEST, f"shards hold {images} images, the manifest says {m.images}")
    if views != m.views:
        add(MANIFEST, f"shards hold {views} views, the manifest says {m.views}")
    if m.views != m.images * k:
        add(MANIFEST, f"{m.views} views != {m.images} images x {k}")
    count = m.source.get("count")
    if count is not None and count != m.images + len(m.skipped):
        add(MANIFEST, f"source has {count} inputs but {m.images} are cached and {len(m.skipped)} skipped")
    if m.source.get("kind") == "folder":
        expect = 0
        for name, e in entries.items():
            got = re.fullmatch(r"images (\d+)\.\.(\d+)", str(e.get("source", "")))
            if not got:
                add(name, f"source {e.get('source')!r} is not an image range")
                continue
            a, b = int(got.group(1)), int(got.group(2))
            if a != expect:
                add(name, f"covers images {a}..{b}, but the previous shard ended at {expect}: images "
                          f"{'missing' if a > expect else 'covered twice'}")
            expect = b
        if count is not None and expect != count and entries:
            add(MANIFEST, f"shards cover images 0..{expect} of the source's {count}")
    elif m.source.get("kind") == "tars" and "shards" in m.source and len(m.source["shards"]) != len(entries):
        add(MANIFEST, f"{len(entries)} cache shards for {len(m.source['shards'])} source tars (one each expected)")


def _check_data(v: _Verifier, m: Manifest, content: dict[str, dict], data: str) -> None:
    """Keys, crop boxes and view regeneration against the images (headers only)."""
    from PIL import Image

    from .sources import FolderSource, TarSource, open_source
    from .views import ViewGeometry, sample_view
    add = v.report.add
    source = open_source(data)
    if source.kind != m.source.get("kind") or source.fingerprint != m.source.get("fingerprint"):
        add("data", f"--data {data} is not the listing the cache was made from ({m.source.get('kind')} "
                    f"{m.source.get('root')}, fingerprint {str(m.source.get('fingerprint'))[:12]}..., --data has "
                    f"{source.fingerprint[:12]}...); crops are checked for the keys it has")
    geometry = ViewGeometry(**{k: tuple(x) if isinstance(x, list) else x for k, x in m.geometry.items()})
    # image sizes by (tar number or -1 for a folder, key): tars may repeat a key
    sizes: dict[tuple[int, str], tuple[int, int]] = {}
    wanted: dict[int, set[str]] = {}
    for name, c in content.items():
        if c.get("key") is not None and c["key"].size:
            unit = int(name.split("-")[1]) if isinstance(source, TarSource) else -1
            wanted.setdefault(unit, set()).update(str(k) for k in c["key"][0])
    if isinstance(source, FolderSource):
        for key in sorted(wanted.get(-1, ())):
            try:
                with Image.open(os.path.join(source.root, key)) as im:
                    sizes[-1, key] = im.size
            except Exception as e:
                add("data", f"image {key} cannot be opened ({type(e).__name__}: {e})")
    elif isinstance(source, TarSource):
        for t, keys in sorted(wanted.items()):
            if t >= len(source):
                continue
            for key, raw in source.samples(t, on_error=lambda exc: True):
                if key in keys and raw is not None and (t, key) not in sizes:
                    try:
                        with Image.open(io.BytesIO(raw)) as im:
                            sizes[t, key] = im.size
                    except Exception as e:
                        add("data", f"image {key} of {source.urls[t]} cannot be opened ({type(e).__name__}: {e})")
    regenerated = 0
    for name, c in content.items():
        keys, si, crop, flip, mask = (c.get(a) for a in ("key", "source_index", "crop", "flip", "mask"))
        if keys is None or si is None or not keys.size:
            continue
        unit = int(name.split("-")[1]) if isinstance(source, TarSource) else -1
        for r in range(keys.shape[1]):
            key, index = str(keys[0, r]), int(si[0, r])
            if isinstance(source, FolderSource) and (index >= len(source.keys) or source.keys[index] != key):
                there = source.keys[index] if index < len(source.keys) else "past the end"
                add(name, f"row {r}: image index {index} is {there} in --data, the cache says {key}")
            if (unit, key) not in sizes:
                if isinstance(source, TarSource) or key not in source.keys:
                    add(name, f"row {r}: image {key} is not in --data")
                continue
            w, h = sizes[unit, key]
            for view in range(keys.shape[0]):
                if crop is not None:
                    top, left, ch, cw = (int(x) for x in crop[view, r])
                    if top < 0 or left < 0 or top + ch > h or left + cw > w:
                        add(name, f"view {view} of {key}: crop box (top {top}, left {left}, height {ch}, width {cw}) "
                                  f"does not lie inside the {w}x{h} image")
                        continue
                if crop is None or flip is None or mask is None:
                    continue
                want = sample_view(m.seed, index, view, (w, h), geometry)
                if tuple(int(x) for x in crop[view, r]) != want.crop or bool(flip[view, r]) != want.flip \
                        or not np.array_equal(mask[view, r].astype(bool), want.mask):
                    what = "crop" if tuple(int(x) for x in crop[view, r]) != want.crop else \
                        "flip" if bool(flip[view, r]) != want.flip else "mask"
                    add(name, f"view {view} of {key}: stored {what} is not the view (seed {m.seed}, image {index}, "
                              f"view {view}) regenerates")
                else:
                    regenerated += 1
    v.report.summary.update(data_images=len(sizes), regenerated=regenerated)


def _deep_check(v: _Verifier, m: Manifest, data: str, n: int, teacher_spec: str | None, device: str,
                seed: int) -> None:
    """Replay `n` random views through the live teacher and compare with the stored targets."""
    import torch

    from .cache import open_cache
    from .errors import CacheCorruptError
    from .models import build_teacher
    from .sources import FolderSource, open_source
    from .views import decode_image, normalize, render_view
    spec = teacher_spec or m.teacher.get("source")
    if not spec:
        raise UserError("--deep needs --teacher: the manifest records no teacher source")
    if not (spec.startswith("random") or os.path.isfile(spec)):
        raise UserError(f"--deep: the cache's teacher {spec} is not here; pass --teacher CKPT (the same weights)")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    teacher, info = build_teacher(spec, m.teacher["arch"], m.geometry["img_size"])
    if info.sha256 != m.teacher.get("sha256"):
        raise UserError(f"--teacher {spec} is not the teacher that made the cache ({m.teacher.get('source')}, "
                        f"sha256 {str(m.teacher.get('sha256'))[:12]}..., this one {info.sha256[:12]}...); "
                        f"--deep needs the same weights")
    teacher.to(dev)
    cache = open_cache(v.path)
    source = open_source(data)
    total = len(cache)
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(total, size=min(n, total), replace=False).tolist()) if total else []
    broken = {p.split(":")[0] for p in v.report.problems}    # shards already reported: not replayed
    records = []     # (global view index, record)
    passed_over = 0
    for i in picks:
        shard = cache.shard_name(cache.locate(i)[0])
        if shard in broken:
            passed_over += 1
            continue
        try:
            records.append((i, cache[i]))
        except CacheCorruptError as e:
            v.report.add(shard, f"view {i} cannot be read for --deep ({e})")
    images: dict[str, bytes] = {}
    if isinstance(source, FolderSource):
        read = source.read
    else:
        wanted = {r.key for _, r in records}
        for t in range(len(source)):
            for key, raw in source.samples(t, on_error=lambda exc: True):
                if key in wanted and raw is not None:
                    images[key] = raw
        read = images.__getitem__
    extract_fp32 = m.teacher_precision == "fp32"
    bf16 = dev.type == "cuda" or not extract_fp32
    tol = math.hypot(CODEC_TOLERANCE[m.codec], BF16_COMPUTE_TOLERANCE) if bf16 else CODEC_TOLERANCE[m.codec]
    sq_err = sq_ref = count = 0.0
    max_abs = worst = 0.0
    size = m.geometry["img_size"]
    for b in range(0, len(records), 32):
        batch = []
        for i, r in records[b:b + 32]:
            try:
                batch.append((i, r, render_view(decode_image(read(r.key)), r.crop, r.flip, size)))
            except Exception as e:
                v.report.add("data", f"image {r.key} cannot be decoded for --deep ({type(e).__name__}: {e})")
        if not batch:
            continue
        pixels = torch.stack([p for _, _, p in batch]).to(dev)
        mask = torch.stack([r.mask for _, r, _ in batch]).to(dev)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
        with ctx:
            live = teacher.targets(normalize(pixels), mask, m.target_layer).float().cpu()
        stored = torch.stack([r.target for _, r, _ in batch])
        err = stored - live
        for (i, r, _), e, ref in zip(batch, err, live):
            rel = float(e.norm() / ref.norm().clamp_min(1e-12))
            worst = max(worst, rel)
            if not rel <= tol:
                s = cache.locate(i)[0]
                v.report.add(cache.shard_name(s), f"view {r.view} of {r.key}: stored target differs from the live "
                                                  f"teacher by rel RMS {rel:.2e} > tolerance {tol:.1e} ({m.codec}), "
                                                  f"max abs {float(e.abs().max()):.2e}")
        sq_err += float(err.double().pow(2).sum())
        sq_ref += float(live.double().pow(2).sum())
        count += err.numel()
        max_abs = max(max_abs, float(err.abs().max()))
    v.report.summary["deep"] = {
        "views": len(records), "passed_over": passed_over, "device": str(dev),
        "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "rel_rmse": math.sqrt(sq_err / sq_ref) if sq_ref else 0.0, "worst_rel_rmse": worst,
        "rmse": math.sqrt(sq_err / count) if count else 0.0, "max_abs": max_abs, "tolerance": tol,
        "bf16_allowance": bf16}


# ----------------------------------------------------------------------------------------------
# Command line

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `verify` sub-command to `g2sd-cache`'s sub-parsers."""
    p = subparsers.add_parser(
        "verify", help="check a cache: manifest vs disk, checksums, views exactly once, masks, crops, targets",
        description="Check a cache without trusting it: the manifest against the shard folders and file sizes, "
                    "every inner chunk's and shard index's crc32c (read directly, fast), no leftover temporary "
                    "files, every (image, view) pair exactly once, masks keeping the manifest's visible count, and "
                    "with --data that every crop lies inside its image and every view regenerates from (seed, "
                    "image, view). --deep N also replays N random views through the teacher and compares targets. "
                    "Exit status 0 with a summary when all holds, 1 with one line per problem otherwise.")
    p.add_argument("cache", help="cache directory (or fsspec URL) written by `g2sd-cache extract`")
    p.add_argument("--data", default=None, metavar="PATH", help="the image folder or tar shards the cache was "
                   "extracted from: also check keys, crop boxes (image headers only) and view regeneration; "
                   "required by --deep")
    p.add_argument("--deep", type=int, default=0, metavar="N", help="replay N random views through the live "
                   "teacher and fail any whose stored target differs by more than the codec's tolerance "
                   f"(relative RMS: {', '.join(f'{k} {v:g}' for k, v in CODEC_TOLERANCE.items())}; "
                   f"combined with {BF16_COMPUTE_TOLERANCE:g} when bf16 autocast may be involved); default 0")
    p.add_argument("--teacher", default=None, metavar="CKPT|random", help="teacher for --deep: the MAE checkpoint "
                   "the cache was made with, or random[:SEED]; default: the one the manifest records. Its weights "
                   "must have the manifest's sha256")
    p.add_argument("--device", default="auto", help="device for --deep: auto (CUDA if available), cpu, cuda or "
                   "cuda:N; CUDA replays under bf16 autocast as extract does")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="which views --deep picks (default 0)")
    p.add_argument("--json", action="store_true", help="print the report (problems and figures) as JSON")
    return p


def main_from_args(args) -> int:
    """Run `verify` for parsed arguments: 0 when the cache is sound, 1 with one line per problem."""
    report = verify_cache(args.cache, deep=args.deep, teacher=args.teacher, data=args.data, device=args.device,
                          seed=args.seed)
    if args.json:
        print(json.dumps({"ok": report.ok, "problems": report.problems, "summary": report.summary}, indent=1,
                         default=str))
    elif report.ok:
        print(report.format_summary())
    else:
        for line in report.problems:
            print(line)
        print(f"verify: {len(report.problems)} problem(s) in {report.path}")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m g2sd_cache.verify CACHE ...`: the sub-command on its own (user errors exit 2)."""
    parser = argparse.ArgumentParser(prog="g2sd-cache")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["verify", *(sys.argv[1:] if argv is None else argv)])
    try:
        return main_from_args(args)
    except UserError as e:
        print(f"g2sd-cache verify: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
