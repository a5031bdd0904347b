"""What a cache's manifest, shard records and arrays' zarr.json must agree on, checked without reading data.

One definition, used by `verify` (which reports every problem) and by `open_cache` (which refuses the
cache at the first, before anything reads a target), so both name a problem with the same line. Every
function returns problems as (where, what) pairs: `verify` prints "where: what".

- `manifest_problems`: the manifest alone: codec, geometry vs token count, shard names (which become
  paths: only `shard-NNNNN` folders inside the cache), file paths inside their shard, counts.
- `unlisted_shards`: shard folders on disk that the manifest does not list.
- `record_problems`: a shard.json against its manifest entry (the digest the manifest holds, counts, files).
- `array_problems`: an array's zarr.json against the shape and dtype the manifest implies.
"""
from __future__ import annotations

import json
import posixpath
import re

from .codecs import get_codec
from .digests import record_digest
from .errors import UserError
from .schema import MANIFEST, SHARD_RECORD, ArraySpec, Manifest, parse_folder_shard_source
from .zarr_layout import ArrayLayout, parse_layout

Problem = tuple[str, str]
SHARD_DIR = re.compile(r"^shard-\d{5,}$")


def geometry_of(m: Manifest):
    """The manifest's ViewGeometry; raises ValueError/TypeError for one that is not."""
    g = m.view_geometry
    if not (isinstance(g.img_size, int) and isinstance(g.patch_size, int) and 0 < g.patch_size <= g.img_size
            and g.img_size % g.patch_size == 0):
        raise ValueError(f"img_size {g.img_size!r} is not a multiple of patch_size {g.patch_size!r}")
    return g


def manifest_specs(m: Manifest) -> dict[str, ArraySpec]:
    """The per-view arrays the manifest implies (call after `manifest_problems` found none about the codec)."""
    return m.specs()


def inside_shard(rel) -> bool:
    """A path relative to its shard that stays inside it: no absolute path, no `..`, nothing empty."""
    return (isinstance(rel, str) and rel != "" and not rel.startswith("/") and "\\" not in rel
            and posixpath.normpath(rel) == rel and not rel.startswith(".."))


def usable(m: Manifest) -> bool:
    """Whether the manifest's codec, sizes and geometry make sense at all (else nothing can be checked against it)."""
    try:
        get_codec(m.codec)
        geometry_of(m)
    except (UserError, AttributeError, TypeError, ValueError, ZeroDivisionError):
        return False
    return all(_count(getattr(m, k)) and getattr(m, k) >= 1 for k in ("tokens", "target_dim", "views_per_image",
                                                                      "chunk_views"))


def manifest_problems(m: Manifest) -> list[Problem]:
    out: list[Problem] = []
    add = lambda where, what: out.append((where, what))  # noqa: E731
    try:
        get_codec(m.codec)
    except (UserError, TypeError):
        add(MANIFEST, f"unknown codec {m.codec!r}")
    for name in ("tokens", "target_dim", "views_per_image", "chunk_views", "images", "views"):
        value = getattr(m, name)
        if not _count(value) or (value < 1 and name not in ("images", "views")):
            add(MANIFEST, f"{name} = {value!r} is not a {'count' if name in ('images', 'views') else 'positive integer'}")
    try:
        g = geometry_of(m)
        if isinstance(m.tokens, int) and m.tokens != g.num_patches + 1:
            add(MANIFEST, f"tokens = {m.tokens}, but {g.img_size}-px views of {g.patch_size}-px patches have "
                          f"{g.num_patches} patches + cls = {g.num_patches + 1}")
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as e:
        add(MANIFEST, f"geometry {m.geometry!r} is not a view geometry ({e})")
    if m.pixels not in ("visible", "none"):
        add(MANIFEST, f"pixels = {m.pixels!r}: expected 'visible' or 'none'")
    if not isinstance(m.shards, list):
        add(MANIFEST, "shards is not a list")
        return out
    entries: dict[str, dict] = {}
    for i, e in enumerate(m.shards):
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
        files = e.get("files")
        if not isinstance(files, dict):
            add(name, "lists no files")
        else:
            for rel, size in files.items():
                if not inside_shard(rel):
                    add(name, f"file {rel!r} is not a path inside the shard: it is not read")
                elif not _count(size):
                    add(name, f"file {rel} has size {size!r}")
    if not any("is not a count" in what or "is not a positive integer" in what for _, what in out):
        out += _count_problems(m, entries)
    return out


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _count_problems(m: Manifest, entries: dict[str, dict]) -> list[Problem]:
    """Counts add up: per shard, over the shards, against the source; a folder's image ranges tile it."""
    out: list[Problem] = []
    add = lambda where, what: out.append((where, what))  # noqa: E731
    k = m.views_per_image
    for name, e in entries.items():
        if e.get("views") != e.get("images", 0) * k:
            add(name, f"{e.get('views')} views != {e.get('images')} images x {k} views per image")
    images = sum(e["images"] for e in entries.values())
    views = sum(e["views"] for e in entries.values())
    if images != m.images:
        add(MANIFEST, f"shards hold {images} images, the manifest says {m.images}")
    if views != m.views:
        add(MANIFEST, f"shards hold {views} views, the manifest says {m.views}")
    if m.views != m.images * k:
        add(MANIFEST, f"{m.views} views != {m.images} images x {k}")
    source = m.source if isinstance(m.source, dict) else {}
    count = source.get("count")
    scan_skipped = source.get("scan_skipped", 0) if _count(source.get("scan_skipped", 0)) else 0
    skipped = len(m.skipped) if isinstance(m.skipped, list) else 0
    if count is not None and count != m.images + skipped - scan_skipped:
        add(MANIFEST, f"source has {count} inputs but {m.images} are cached and {skipped - scan_skipped} skipped")
    if source.get("kind") == "folder":
        expect = 0
        for name, e in entries.items():
            got = parse_folder_shard_source(e.get("source", ""))
            if not got:
                add(name, f"source {e.get('source')!r} is not an image range")
                continue
            a, b, _ = got
            if a != expect:
                add(name, f"covers images {a}..{b}, but the previous shard ended at {expect}: images "
                          f"{'missing' if a > expect else 'covered twice'}")
            expect = b
        if count is not None and expect != count and entries:
            add(MANIFEST, f"shards cover images 0..{expect} of the source's {count}")
    elif source.get("kind") == "tars" and "shards" in source and len(source["shards"]) != len(entries):
        add(MANIFEST, f"{len(entries)} cache shards for {len(source['shards'])} source tars (one each expected)")
    return out


def unlisted_shards(m: Manifest, folders: list[str]) -> list[Problem]:
    """Shard folders among `folders` (names directly under the cache) that the manifest does not list."""
    listed = {e.get("name") for e in m.shards if isinstance(e, dict)}
    return [(name, "folder on disk is not listed in the manifest (a shard from another run?)")
            for name in sorted(folders) if SHARD_DIR.match(name) and name not in listed]


def record_problems(m: Manifest, entry: dict, raw: bytes) -> tuple[dict | None, list[Problem]]:
    """A shard's shard.json bytes against its manifest entry. Returns the parsed record (None if it does
    not parse) and the problems."""
    name = entry["name"]
    out: list[Problem] = []
    want = entry.get("record")
    if want is not None and record_digest(raw) != want:
        out.append((name, f"{SHARD_RECORD} is not the record the manifest holds for this shard (digest "
                          f"{record_digest(raw)[:12]}..., the manifest {str(want)[:12]}...): a shard from another "
                          f"cache or run?"))
    try:
        rec = json.loads(raw.decode())
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        return None, out + [(name, f"{SHARD_RECORD} does not parse ({type(e).__name__}: {e})")]
    for key, expected in (("images", entry.get("images")), ("views_per_image", m.views_per_image),
                          ("files", entry.get("files")), ("source", entry.get("source"))):
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


def short_repr(x) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."
