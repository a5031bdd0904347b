"""What a cache's manifest, shard records and arrays' zarr.json must agree on, checked without reading data.

One definition, used by `verify` (which reports every problem) and by `open_cache` (which refuses the
cache at the first, before anything reads a target), so both name a problem with the same line. Every
function returns problems as (where, what) pairs: `verify` prints "where: what".

The manifest is a file a user can hand us, so its JSON object is checked as it is (any value may have any
type) before the typed `schema.Manifest` is built from it:
- `manifest_problems`: the manifest alone: codec, pixels, geometry vs token count, shard names (which become
  paths: only `shard-NNNNN` folders inside the cache), file paths inside their shard, counts, ranges.
- `usable` / `typed_manifest`: whether, and how, the checked object becomes a `Manifest` (shard entries
  that are not well-formed are left out of it: they were reported).
- `unlisted_shards`: shard folders on disk that the manifest does not list.
- `record_problems`: a shard.json against its manifest entry (the digest the manifest holds, counts, files).
- `array_problems`: an array's zarr.json against the shape and dtype the manifest implies.
- `basis_problem`: a low-rank cache's basis.npy against the manifest's record of it (digest, shape, dtype).
- `source_problem`: the one refusal of a `--data` that is not the dataset the cache was made from.
"""
from __future__ import annotations

import json
import posixpath
import re

from g2sd_cache.cache import lowrank
from g2sd_cache.cache import lossless
from g2sd_cache.cache.pixel_codecs import JPEG_DECODERS, PIXEL_MODES
from g2sd_cache.cache.codecs import get_codec
from g2sd_cache.cache.digests import record_digest
from g2sd_cache.common.errors import UserError
from g2sd_cache.cache.schema import MANIFEST, SHARD_RECORD, ArraySpec, Manifest, geometry_from_dict
from g2sd_cache.cache.zarr_layout import ArrayLayout, parse_layout

Problem = tuple[str, str]
SHARD_DIR = re.compile(r"^shard-\d{5,}$")
_STRUCTURE = (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError)


def _geometry(data: dict):
    """The manifest's ViewGeometry; raises one of _STRUCTURE for one that is not."""
    g = geometry_from_dict(dict(data["geometry"]))
    if not (_count(g.img_size) and _count(g.patch_size) and 0 < g.patch_size <= g.img_size
            and g.img_size % g.patch_size == 0):
        raise ValueError(f"img_size {g.img_size!r} is not a multiple of patch_size {g.patch_size!r}")
    return g


def inside_shard(rel) -> bool:
    """A path relative to its shard that stays inside it: no absolute path, no `..`, nothing empty."""
    return (isinstance(rel, str) and rel != "" and not rel.startswith("/") and "\\" not in rel
            and posixpath.normpath(rel) == rel and not rel.startswith(".."))


def usable(data: dict) -> bool:
    """Whether the manifest's codec, sizes, geometry and records make sense at all (else nothing can be checked
    against it)."""
    try:
        get_codec(data["codec"])
        _geometry(data)
        dict(data["teacher"]), dict(data["source"])
    except (UserError, *_STRUCTURE):
        return False
    return isinstance(data["shards"], list) and data["pixels"] in PIXEL_MODES and \
        all(_count(data[k]) and data[k] >= 1 for k in ("tokens", "target_dim", "views_per_image", "chunk_views"))


def well_formed_entries(data: dict) -> dict[str, dict]:
    """The manifest's shard entries with a name inside the cache and integer counts, by name (first wins)."""
    entries: dict[str, dict] = {}
    for e in data["shards"] if isinstance(data.get("shards"), list) else []:
        if isinstance(e, dict) and isinstance(e.get("name"), str) and SHARD_DIR.match(e["name"]) \
                and _count(e.get("images")) and _count(e.get("views")) and isinstance(e.get("files"), dict) \
                and isinstance(e.get("record"), str):
            entries.setdefault(e["name"], e)
    return entries


def typed_manifest(data: dict) -> Manifest:
    """The typed manifest of a `usable` object; malformed shard entries (reported by `manifest_problems`) and
    file paths outside their shard are left out."""
    entries = [{**e, "files": {r: n for r, n in e["files"].items() if inside_shard(r) and _count(n)}}
               for e in well_formed_entries(data).values()]
    try:
        return Manifest.from_dict({**data, "shards": entries})
    except _STRUCTURE as e:
        raise UserError(f"cache manifest {MANIFEST} does not load ({type(e).__name__}: {e}); rerun "
                        f"`g2sd-cache extract` to rewrite it") from e


def manifest_problems(data: dict) -> list[Problem]:
    """Every problem of the manifest's JSON object on its own (see the module docstring)."""
    out: list[Problem] = []
    add = lambda where, what: out.append((where, what))  # noqa: E731
    try:
        get_codec(data["codec"])
    except (UserError, TypeError):
        add(MANIFEST, f"unknown codec {data['codec']!r}")
    if data["pixels"] not in PIXEL_MODES:
        add(MANIFEST, f"pixels = {data['pixels']!r}: expected one of {', '.join(map(repr, PIXEL_MODES))}")
    elif data["pixels"] == "jpeg":
        enc = data.get("pixel_encoding")
        if not isinstance(enc, dict) or enc.get("decoder") not in JPEG_DECODERS or not _count(enc.get("quality")):
            add(MANIFEST, f"pixel_encoding = {enc!r}: a jpeg cache records its quality and its decoder "
                          f"({' or '.join(JPEG_DECODERS)})")
    elif data["pixels"] == "lossless":
        enc = data.get("pixel_encoding")
        if not isinstance(enc, dict) or enc.get("filter") != lossless.FILTER:
            add(MANIFEST, f"pixel_encoding = {enc!r}: a lossless cache records its filter, and this g2sd-cache "
                          f"decodes {lossless.FILTER!r} only")
    for name in ("tokens", "target_dim", "views_per_image", "chunk_views", "images", "views"):
        value = data[name]
        if not _count(value) or (value < 1 and name not in ("images", "views")):
            add(MANIFEST, f"{name} = {value!r} is not a {'count' if name in ('images', 'views') else 'positive integer'}")
    try:
        g = _geometry(data)
        if _count(data["tokens"]) and data["tokens"] != g.num_patches + 1:
            add(MANIFEST, f"tokens = {data['tokens']}, but {g.img_size}-px views of {g.patch_size}-px patches have "
                          f"{g.num_patches} patches + cls = {g.num_patches + 1}")
    except _STRUCTURE as e:
        add(MANIFEST, f"geometry {data['geometry']!r} is not a view geometry ({e})")
    for name in ("teacher", "source"):
        if not isinstance(data[name], dict):
            add(MANIFEST, f"{name} is not a record")
    if not isinstance(data["shards"], list):
        add(MANIFEST, "shards is not a list")
        return out
    entries: dict[str, dict] = {}
    for i, e in enumerate(data["shards"]):
        if not isinstance(e, dict):
            add(f"shard #{i}", "is not a shard record")
            continue
        name = e.get("name")
        if not isinstance(name, str) or not SHARD_DIR.match(name):
            add(str(name), "is not a shard name inside the cache (shard-NNNNN): it is not read")
            continue
        if name in entries:
            add(name, "listed twice in the manifest")
        entries[name] = e
        for key in ("images", "views"):
            if not _count(e.get(key)):
                add(name, f"{key} = {e.get(key)!r} is not a count")
        if not isinstance(e.get("record"), str):
            add(name, "has no digest of its shard.json (record)")
        files = e.get("files")
        if not isinstance(files, dict):
            add(name, "lists no files")
        else:
            for rel, size in files.items():
                if not inside_shard(rel):
                    add(name, f"file {rel!r} is not a path inside the shard: it is not read")
                elif not _count(size):
                    add(name, f"file {rel} has size {size!r}")
    if not any("is not a count" in what or "is not a positive integer" in what or "is not a record" in what
               for _, what in out):
        out += _count_problems(data, entries)
    return out


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _count_problems(data: dict, entries: dict[str, dict]) -> list[Problem]:
    """Counts add up: per shard, over the shards, against the source; a folder's image ranges tile it."""
    out: list[Problem] = []
    add = lambda where, what: out.append((where, what))  # noqa: E731
    k = data["views_per_image"]
    for name, e in entries.items():
        if e.get("views") != e.get("images", 0) * k:
            add(name, f"{e.get('views')} views != {e.get('images')} images x {k} views per image")
    images = sum(e["images"] for e in entries.values())
    views = sum(e["views"] for e in entries.values())
    if images != data["images"]:
        add(MANIFEST, f"shards hold {images} images, the manifest says {data['images']}")
    if views != data["views"]:
        add(MANIFEST, f"shards hold {views} views, the manifest says {data['views']}")
    if data["views"] != data["images"] * k:
        add(MANIFEST, f"{data['views']} views != {data['images']} images x {k}")
    source = data["source"]
    count = source.get("count")
    scan_skipped = source.get("scan_skipped", 0) if _count(source.get("scan_skipped", 0)) else 0
    skipped = len(data["skipped"]) if isinstance(data["skipped"], list) else 0
    if count is not None and count != data["images"] + skipped - scan_skipped:
        add(MANIFEST, f"source has {count} inputs but {data['images']} are cached and {skipped - scan_skipped} skipped")
    if source.get("kind") == "folder":
        expect = 0
        for name, e in entries.items():
            a, b = e.get("start"), e.get("stop")
            if not (_count(a) and _count(b) and a <= b):
                add(name, f"start {a!r}, stop {b!r} is not a range of the listing")
                continue
            if a != expect:
                add(name, f"covers images {a}..{b}, but the previous shard ended at {expect}: images "
                          f"{'missing' if a > expect else 'covered twice'}")
            expect = b
        if count is not None and expect != count and entries:
            add(MANIFEST, f"shards cover images 0..{expect} of the source's {count}")
    elif source.get("kind") == "tars" and "shards" in source and len(source["shards"]) != len(entries):
        add(MANIFEST, f"{len(entries)} cache shards for {len(source['shards'])} source tars (one each expected)")
    return out


def unlisted_shards(data: dict, folders: list[str]) -> list[Problem]:
    """Shard folders among `folders` (names directly under the cache) that the manifest does not list."""
    shards = data["shards"] if isinstance(data.get("shards"), list) else []
    listed = {e.get("name") for e in shards if isinstance(e, dict)}
    return [(name, "folder on disk is not listed in the manifest (a shard from another run?)")
            for name in sorted(folders) if SHARD_DIR.match(name) and name not in listed]


def record_problems(m: Manifest, shard: int, raw: bytes) -> tuple[dict | None, list[Problem]]:
    """Shard `shard`'s shard.json bytes against its manifest entry. Returns the parsed record (None if it does
    not parse) and the problems."""
    entry = m.shards[shard]
    name = entry.name
    out: list[Problem] = []
    if record_digest(raw) != entry.record:
        out.append((name, f"{SHARD_RECORD} is not the record the manifest holds for this shard (digest "
                          f"{record_digest(raw)[:12]}..., the manifest {str(entry.record)[:12]}...): a shard from "
                          f"another cache or run?"))
    try:
        rec = json.loads(raw.decode())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        return None, out + [(name, f"{SHARD_RECORD} does not parse ({type(e).__name__}: {e})")]
    for key, expected in (("images", entry.images), ("views_per_image", m.views_per_image), ("files", entry.files),
                          ("start", entry.start), ("stop", entry.stop), ("tar", entry.tar)):
        if rec.get(key) != expected:
            out.append((name, f"{SHARD_RECORD} says {key} = {short_repr(rec.get(key))}, the manifest {short_repr(expected)}"))
    index = rec.get("index")
    if not isinstance(index, int) or f"shard-{index:05d}" != name:
        out.append((name, f"{SHARD_RECORD} says index {index}"))
    return rec, out


def array_problems(shard: str, name: str, spec: ArraySpec, kn: tuple[int, int],
                   meta: bytes) -> tuple[ArrayLayout | None, list[Problem]]:
    """An array's zarr.json (bytes) against `spec` and [K, n] from the manifest. Returns its layout (None
    if it is not the cache format) and the problems."""
    try:
        layout = parse_layout(json.loads(meta.decode()))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return None, [(shard, f"array {name}: {name}/zarr.json is not the cache format ({e})")]
    want_shape = (*kn, *(w if w is not None else got for w, got in zip(spec.per_view_shape, layout.shape[2:])))
    if layout.shape != want_shape:
        return layout, [(shard, f"array {name} has shape {list(layout.shape)}, expected {list(want_shape)} "
                                f"from the manifest")]
    if layout.dtype != spec.dtype:
        return layout, [(shard, f"array {name} has dtype {layout.dtype}, expected {spec.dtype}")]
    return layout, []


def basis_problem(data: dict, read) -> Problem | None:
    """For a `usable` manifest of a low-rank codec: why its basis file (`read(BASIS_FILE)` -> bytes, or None when
    missing) is not the one the manifest binds; None when it is, or when the codec needs no basis."""
    codec = get_codec(data["codec"])
    if codec.rank is None:
        return None
    rank = codec.basis_rank(data["target_dim"])
    record = data.get("basis")
    raw = read(lowrank.BASIS_FILE) if isinstance(record, dict) else None
    problem = lowrank.basis_problem(record, raw, rank, data["target_dim"])
    return (lowrank.BASIS_FILE, problem) if problem else None


def source_problem(m: Manifest, source, given: str) -> str | None:
    """Why `--data given` (opened as `source`) is not the dataset the cache was extracted from, or None."""
    if source.kind == m.source.kind and source.fingerprint == m.source.fingerprint:
        return None
    return (f"--data {given} is not the dataset the cache was extracted from ({m.source.kind} {m.source.root}, listing "
            f"fingerprint {m.source.fingerprint[:12]}..., --data has {source.fingerprint[:12]}...); pass the same images")


def short_repr(x) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def refuse_empty(images: int, skipped: list[dict], data: str) -> None:
    """An empty cache is not a sound one (nothing could train on it): extract publishes no manifest for it."""
    if images == 0:
        first = f" (e.g. {skipped[0]['key']}: {skipped[0]['error']})" if skipped else ""
        raise UserError(f"every input of --data {data} was unreadable ({len(skipped)} skipped{first}): there is "
                        f"no view to cache, so no manifest was written; fix or replace the images, then rerun")
