"""verify, second layer: what the files hold, against the manifest and (with --data) against the images.

- `check_rows`: all K views of a row agree on the image; every (image, view) pair appears once; rows lie in
  their shard's run of the seeded listing order (folders) or are positions 0.. of their tar; every mask keeps
  the geometry's visible count; crops are boxes; quantised scales are finite and positive.
- `check_data`: the listing is the one the cache was made from; keys match image indices; every image's bytes
  have the crc32c extract recorded; every crop lies inside its image; every stored view regenerates exactly from
  (seed, image, view); and stored pixels are byte for byte the regenerated view's visible patches. Images are
  read once each, shard by shard (a tar is streamed once).
"""
from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import torch

from g2sd_cache.cache.pixel_codecs import encode_jpeg
from g2sd_cache.cache.digests import SourceChangedError, check_image, image_crc32c
from g2sd_cache.cache.manifest_checks import source_problem
from g2sd_cache.cache.schema import Manifest, folder_order, source_index_for_tar
from g2sd_cache.verify.files import ShardFiles, VerifyReport


def check_rows(report: VerifyReport, m: Manifest, shards: dict[int, ShardFiles]) -> int:
    """See the module docstring. Returns the number of (image, view) pairs found."""
    visible = m.geometry.num_visible
    seen: dict[int, str] = {}
    pairs = 0
    for s, files in shards.items():
        name = m.shards[s].name
        add = lambda what, name=name: report.add(name, what)  # noqa: E731
        c = files.arrays
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
            _check_range(report, m, s, files, si[0] if si.size else np.zeros(0, np.int64))
        mask = c.get("mask")
        if mask is not None and mask.size:
            kept = (~mask.astype(bool)).sum(-1)
            bad = np.argwhere(kept != visible)
            if len(bad):
                v, r = map(int, bad[0])
                add(f"{len(bad)} mask(s) do not keep {visible} of {mask.shape[-1]} patches visible, e.g. "
                    f"view {v} of {_row(keys, r)} keeps {int(kept[v, r])}")
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


def _check_range(report: VerifyReport, m: Manifest, s: int, files: ShardFiles, rows: np.ndarray) -> None:
    """Rows of a folder shard are its run [start, stop) of the seeded listing order, in that order; a tar
    shard's are its positions 0, 1, ..."""
    entry = m.shards[s]
    add = lambda what: report.add(entry.name, what)  # noqa: E731
    if m.source.kind == "folder" and entry.start is not None and entry.stop is not None:
        a, b = entry.start, entry.stop
        allowed = folder_order(m.seed, max(m.source.count, b))[a:b]
        position = {int(i): j for j, i in enumerate(allowed.tolist())}
        outside = [int(r) for r in rows if int(r) not in position]
        if outside:
            add(f"holds images outside its range {a}..{b} (e.g. image {outside[0]})")
        elif len(rows) > 1 and not bool((np.diff([position[int(r)] for r in rows]) > 0).all()):
            add(f"rows are not in the order of the listing shuffled with seed {m.seed}")
        if files.skipped is not None and len(rows) + len(files.skipped) != b - a:
            add(f"{len(rows)} images + {len(files.skipped)} skipped != the {b - a} of its range {a}..{b}")
    elif m.source.kind == "tars":
        index = int(entry.name.split("-")[1])
        if len(rows) and not np.array_equal(rows, source_index_for_tar(index, np.arange(len(rows)))):
            add(f"rows are not positions 0..{len(rows) - 1} of tar {index}")


def _row(keys, r: int) -> str:
    return f"row {r} ({keys[0, r]})" if keys is not None and keys.size else f"row {r}"


# ----------------------------------------------------------------------------------------------
# --data

def check_data(report: VerifyReport, m: Manifest, cache_path: str, shards: dict[int, ShardFiles], data: str,
               pixel_views: int | None = None) -> None:
    """See the module docstring. `pixel_views`: compare the stored pixels of at most this many views (a seeded
    sample, spread over the shards); None: of every view."""
    from g2sd_cache.data.sources import FolderSource, open_source
    source = open_source(data)
    problem = source_problem(m, source, data)
    if problem:
        report.add("data", problem + "; crops are checked for the keys it has")
    cache = _pixel_reader(cache_path, m, report)
    picked = _pixel_sample(m, shards, pixel_views) if cache is not None else set()
    stats = {"images": 0, "regenerated": 0, "pixels": 0}
    for s, files in shards.items():
        c = files.arrays
        keys, si = c.get("key"), c.get("source_index")
        if keys is None or si is None or not keys.size:
            continue
        name = m.shards[s].name
        for r, raw in _images(report, source, s, name, keys[0]):
            key, index = str(keys[0, r]), int(si[0, r])
            if isinstance(source, FolderSource) and (index >= len(source.keys) or source.keys[index] != key):
                there = source.keys[index] if index < len(source.keys) else "past the end"
                report.add(name, f"row {r}: image index {index} is {there} in --data, the cache says {key}")
            stats["images"] += 1
            try:
                check_image(raw, files.image_crc32c[r] if r < len(files.image_crc32c) else None, key,
                            crc=image_crc32c(raw))
            except SourceChangedError as e:
                report.add(name, f"row {r}: {e}")
                continue
            _check_views(report, m, cache, s, name, r, key, index, raw, c, picked, stats)
    report.summary.update(data_images=stats["images"], regenerated=stats["regenerated"],
                          pixel_views_checked=stats["pixels"])


def _images(report: VerifyReport, source, s: int, name: str, keys: np.ndarray) -> Iterator[tuple[int, bytes]]:
    """(row, image bytes) of shard `s`'s rows that --data has; rows it lacks are reported."""
    from g2sd_cache.data.sources import TarSource
    rows = {str(k): r for r, k in enumerate(keys.tolist())}
    if isinstance(source, TarSource):
        found: set[str] = set()
        if s < len(source):
            for key, raw in source.samples(s, on_error=lambda exc: True):
                if key in rows and raw is not None and key not in found:
                    found.add(key)
                    yield rows[key], raw
        missing = sorted(set(rows) - found)
    else:
        listed = set(source.keys)
        missing = []
        for key, r in rows.items():
            if key not in listed:
                missing.append(key)
                continue
            try:
                yield r, source.read(key)
            except OSError as e:
                report.add("data", f"image {key} cannot be read ({type(e).__name__}: {e})")
    for key in missing:
        report.add(name, f"row {rows[key]}: image {key} is not in --data")


def _check_views(report, m: Manifest, cache, s: int, name: str, r: int, key: str, index: int, raw: bytes,
                 c: dict, picked: set, stats: dict) -> None:
    """Crops inside the image, views regenerating from (seed, image, view), stored pixels equal to the
    regenerated view's visible patches."""
    from PIL import Image

    from g2sd_cache.data.views import decode_image, render_view, sample_view, visible_patches
    crop, flip, mask = c.get("crop"), c.get("flip"), c.get("mask")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
    except Exception as e:
        report.add("data", f"image {key} cannot be opened ({type(e).__name__}: {e})")
        return
    image = None
    for view in range(m.views_per_image):
        if crop is not None:
            top, left, ch, cw = (int(x) for x in crop[view, r])
            if top < 0 or left < 0 or top + ch > h or left + cw > w:
                report.add(name, f"view {view} of {key}: crop box (top {top}, left {left}, height {ch}, width {cw}) "
                                 f"does not lie inside the {w}x{h} image")
                continue
        if crop is None or flip is None or mask is None:
            continue
        want = sample_view(m.seed, index, view, (w, h), m.geometry)
        stored = (tuple(int(x) for x in crop[view, r]), bool(flip[view, r]), mask[view, r].astype(bool))
        if stored[0] != want.crop or stored[1] != want.flip or not np.array_equal(stored[2], want.mask):
            what = "crop" if stored[0] != want.crop else "flip" if stored[1] != want.flip else "mask"
            report.add(name, f"view {view} of {key}: stored {what} is not the view (seed {m.seed}, image {index}, "
                             f"view {view}) regenerates")
            continue
        stats["regenerated"] += 1
        if (s, view, r) not in picked or name in report.broken:   # a broken shard's pixels: reported already
            continue
        image = image if image is not None else decode_image(raw)
        rendered = render_view(image, want.crop, want.flip, m.geometry.img_size)
        expect = visible_patches(rendered[None], torch.from_numpy(want.mask)[None], m.geometry.patch_size)[0]
        if m.pixels == "jpeg":   # the teacher was given the view's JPEG, decoded: encode it again, the same way
            expect = cache.decode_pixels([encode_jpeg(expect.numpy(), m.pixel_encoding["quality"])]).cpu()[0]
        stored_pixels = cache.read_block(s, view, r, r + 1).pixels[0]
        stats["pixels"] += 1
        if not np.array_equal(stored_pixels, expect.numpy()):
            differ = int((stored_pixels != expect.numpy()).any(axis=(1, 2, 3)).sum())
            report.add(name, f"view {view} of {key}: stored pixels are not the view's visible patches as rendered "
                             f"({differ} of {len(expect)} patches differ)")


def _pixel_reader(cache_path: str, m: Manifest, report: VerifyReport):
    """The cache, opened for reading stored pixels (None when it stores none or cannot be opened: reported)."""
    if not m.stores_pixels:
        return None
    from g2sd_cache.cache.reader import open_cache
    from g2sd_cache.common.errors import UserError
    try:
        return open_cache(cache_path)
    except UserError:
        return None        # what is wrong with it is reported by the file layer already


def _pixel_sample(m: Manifest, shards: dict[int, ShardFiles], n: int | None) -> set[tuple[int, int, int]]:
    """(shard, view, row) of the views whose pixels are compared: all, or a seeded sample of n."""
    every = [(s, v, r) for s in shards if m.shards[s].images for v in range(m.views_per_image)
             for r in range(m.shards[s].images)]
    if n is None or n >= len(every):
        return set(every)
    rng = np.random.default_rng(0)
    return {every[i] for i in rng.choice(len(every), size=n, replace=False)}
