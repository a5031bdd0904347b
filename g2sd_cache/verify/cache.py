"""`g2sd-cache verify CACHE`: check a cache end to end without trusting it. One problem line each
("shard-00003: what is wrong"); the checks come in three layers:

1. the manifest and the files (cache/manifest_checks.py, which open_cache runs too, and verify/files.py): the
   manifest parses and agrees with itself (codec, pixels, geometry and token count, counts, ranges, shard
   names and file paths inside the cache); every listed shard folder exists and holds exactly the files its
   record lists, at the recorded sizes; every shard folder on disk is listed; `shard.json` is the record the
   manifest holds a digest of; every file is the one its record binds to its path; every inner chunk's and
   shard index's crc32c holds; no temporary or partial files; the cache marker is there; `config.yaml`
   agrees with the manifest;
2. the content (verify/content.py): every (image, view) pair exactly once, rows where their shard says,
   masks, crops and scales; with `--data`: the images are the ones extracted (listing, crc32c), crops lie
   inside them, every view regenerates from (seed, image, view), and stored pixels are the regenerated
   views' visible patches byte for byte;
3. with `--deep N` (verify/deep.py): N random views replayed through the live teacher.

Speed: the checksum pass runs at ~1 GB/s on one core (a 200 MB cache of 1024 ViT-B-sized fp16 views
in 0.2 s; reading the same cache through zarr takes 0.25 s and would not notice absent chunks). Comparing
stored pixels re-renders every view from its image (about 2.4 ms of one core per view); `--pixel-views N`
compares a seeded sample instead.
"""
from __future__ import annotations

import time

import yaml

from g2sd_cache.common.errors import UserError
from g2sd_cache.cache.manifest_checks import SHARD_DIR, basis_problem, manifest_problems, short_repr, typed_manifest, unlisted_shards, usable
from g2sd_cache.cache.schema import BASIS_FILE, CACHE_MARKER, CALIBRATION_FILE, CONFIG, LOCK_FILE, MANIFEST, Manifest
from g2sd_cache.verify.content import check_data, check_rows
from g2sd_cache.verify.deep import BF16_COMPUTE_TOLERANCE, CODEC_TOLERANCE, deep_check
from g2sd_cache.verify.files import FileChecker, VerifyReport

__all__ = ["BF16_COMPUTE_TOLERANCE", "CODEC_TOLERANCE", "VerifyReport", "format_summary", "verify_cache"]


def verify_cache(path: str, deep: int = 0, teacher: str | None = None, data: str | None = None,
                 device: str = "auto", seed: int = 0, pixel_views: int | None = None,
                 teacher_precision: str | None = None) -> VerifyReport:
    """Check the cache at `path` (see the module docstring). Returns a report whose `problems` is empty
    when every check holds. Raises UserError for a path that is not a cache or unusable options."""
    t0 = time.perf_counter()
    if deep < 0:
        raise UserError("--deep must be 0 or more")
    if pixel_views is not None and pixel_views < 0:
        raise UserError("--pixel-views must be 0 or more")
    report = VerifyReport(str(path).rstrip("/"))
    files = FileChecker(path, report)
    data_obj = files.load_manifest()
    if data_obj is not None:
        for where, what in manifest_problems(data_obj):
            report.add(where, what)
    if data_obj is None or not usable(data_obj):     # no codec, sizes or geometry to check the shards against
        report.summary["seconds"] = time.perf_counter() - t0
        return report
    m = files.manifest = typed_manifest(data_obj)
    if deep and not data and not m.stores_pixels:
        raise UserError("--deep replays views from their images in a cache without pixels: pass --data (the images "
                        "the cache was extracted from)")
    on_disk = files.listing()
    for where, what in unlisted_shards(data_obj, list(files.top_dirs)):
        report.add(where, what)
    for rel in sorted(on_disk):
        if "/" not in rel and rel not in (MANIFEST, CONFIG, CACHE_MARKER, LOCK_FILE, CALIBRATION_FILE) \
                and not (rel == BASIS_FILE and m.basis is not None):
            report.add(rel, "unexpected file in the cache folder")
    problem = basis_problem(data_obj, lambda rel: files.cat(rel) if rel in on_disk else None)
    if problem:
        report.add(*problem)
    if CACHE_MARKER not in on_disk:
        report.add(CACHE_MARKER, "is missing: extract writes it first, and refuses to resume or overwrite a folder "
                                 "without it")
    for top in sorted(files.top_dirs):
        if not SHARD_DIR.match(top):
            report.add(top, "unexpected folder in the cache")
    _check_config(files, m)

    shards = {s: got for s in range(len(m.shards)) if (got := files.check_shard(s, on_disk)) is not None}
    pairs = check_rows(report, m, shards)
    if m.views == 0:
        report.add(MANIFEST, f"holds no views (all {len(m.skipped)} inputs were skipped as unreadable): an empty "
                             f"cache cannot train a student; re-extract from readable images")
    if pairs != m.views and not report.problems:
        report.add(MANIFEST, f"{pairs} (image, view) pairs found, the manifest says {m.views} views")
    _check_skipped(report, m, shards)
    report.summary.update(
        path=report.path, codec=m.codec, pixels=m.pixels, views=m.views, images=m.images,
        views_per_image=m.views_per_image, shards=len(m.shards), skipped=len(m.skipped),
        teacher=f"{m.teacher.arch} ({m.teacher.source}, sha256 {m.teacher.sha256[:12]}...), "
                f"LN(decoder block {m.target_layer})",
        arrays=files.arrays, files=files.files, chunks=files.chunks, bytes=files.bytes, pairs=pairs,
        visible=m.geometry.num_visible, patches=m.geometry.num_patches)
    if data:
        check_data(report, m, report.path, shards, data, pixel_views)
    if deep:
        deep_check(report, m, report.path, data, deep, teacher, device, seed, teacher_precision)
    report.summary["seconds"] = time.perf_counter() - t0
    return report


def _check_skipped(report: VerifyReport, m: Manifest, shards: dict) -> None:
    """The manifest's skipped list is the folder scan's entries then the shards' records'; none is also cached."""
    recorded = [x for s in sorted(shards) for x in (shards[s].skipped or [])]
    scanned = m.source.scan_skipped    # the folder scan's entries come first, in no shard's record
    if len(shards) == len(m.shards) and all(f.skipped is not None for f in shards.values()) \
            and recorded != m.skipped[scanned:]:
        report.add(MANIFEST, f"lists {len(m.skipped) - scanned} skipped inputs, the shards' records {len(recorded)}")
    for s, files in shards.items():
        keys = files.arrays.get("key")
        if keys is not None and keys.size:
            both = sorted({x.get("key") for x in files.skipped or []} & set(keys[0].tolist()))
            if both:
                report.add(m.shards[s].name, f"image {both[0]} is both cached and listed as skipped")


def _check_config(files: FileChecker, m: Manifest) -> None:
    try:
        cfg = yaml.safe_load(files.cat(CONFIG).decode())
    except FileNotFoundError:
        return
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        files.report.add(CONFIG, f"does not parse ({type(e).__name__})")
        return
    if not isinstance(cfg, dict):
        files.report.add(CONFIG, "is not a mapping")
        return
    pairs = {"codec": m.codec, "views": m.views_per_image, "seed": m.seed, "target_layer": m.target_layer,
             "chunk_views": m.chunk_views, "img_size": m.geometry.img_size, "mask_ratio": m.geometry.mask_ratio,
             "arch": m.teacher.arch, "teacher_sha256": m.teacher.sha256, "source_fingerprint": m.source.fingerprint,
             "pixels": m.pixels}
    if cfg.get("codec") == "auto" and (m.calibration or {}).get("chosen") == m.codec:
        pairs.pop("codec")           # auto: the calibration's choice is the manifest's codec
    for key, want in pairs.items():
        if key in cfg and cfg[key] != want:
            files.report.add(CONFIG, f"{key} = {short_repr(cfg[key])} but the manifest says {short_repr(want)}")


def format_summary(report: VerifyReport) -> str:
    """The one-screen report of a sound cache."""
    s = report.summary
    lines = [f"cache    {report.path}"]
    if "codec" in s:
        lines.append(f"content  {s['views']} views = {s['images']} images x {s['views_per_image']} views in "
                     f"{s['shards']} shards, codec {s['codec']}, pixels {s['pixels']}, {s['skipped']} inputs skipped")
        lines.append(f"teacher  {s['teacher']}")
    if "chunks" in s:
        lines.append(f"checked  {s['files']} shard files of {s['arrays']} arrays, {s['chunks']} inner chunks "
                     f"({_mib(s['bytes'])}): crc32c of every chunk and index, every file's digest")
        lines.append(f"views    {s['pairs']} (image, view) pairs, each once; every mask keeps "
                     f"{s['visible']} of {s['patches']} patches")
    if "data_images" in s:
        lines.append(f"data     {s['data_images']} images read: each is the one extracted (crc32c), every crop lies "
                     f"inside its image, {s['regenerated']} views regenerate from (seed, image, view)"
                     + (f", {s['pixel_views_checked']} views' stored pixels equal the rendered visible patches"
                        if s.get("pixel_views_checked") else ""))
    if "deep" in s:
        d = s["deep"]
        lines.append(f"deep     {d['views']} views replayed from {d['from']} on {d['device']} (teacher "
                     f"{d['precision']}, extract's {d['extract_precision']}): rel RMS {d['rel_rmse']:.2e} (worst view {d['worst_rel_rmse']:.2e}), RMS {d['rmse']:.2e}, max abs "
                     f"{d['max_abs']:.2e}; tolerance {d['tolerance']:.1e} ({s['codec']}"
                     f"{', teacher compute allowed' if d['compute_allowance'] else ''})")
    lines.append(f"time     {s.get('seconds', 0.0):.2f} s")
    lines.append("OK: the cache is sound" if report.ok else f"FAILED: {len(report.problems)} problem(s)")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
