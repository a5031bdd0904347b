"""Extract's last act: rank 0 gathers every shard's record into manifest.json (schema.Manifest), the file that
makes a cache a cache. Per-codec errors are the mean over the shards' first batches; a low-rank cache's basis
is bound by the sha256 its calibration recorded."""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import numpy as np

from g2sd_cache.cache import manifest_checks
from g2sd_cache.cache import codecs, lossless
from g2sd_cache.cache.destination import finished_records
from g2sd_cache.cache.schema import (FORMAT_VERSION, MANIFEST, Manifest, ShardEntry, ShardRecord,
                                     SourceRecord, TeacherRecord, shard_name)
from g2sd_cache.data.sources import FolderSource, Source, TarSource
from g2sd_cache.data.views import replay_versions
from g2sd_cache.generic.calibrate import Calibration


def write_manifest(out, cfg, source: Source, plans: list, teacher_info, tokens: int, width: int,
                   precision: str, calibration: Calibration, pixel_decoder: str = "cpu") -> Manifest:
    """Rank 0, after every shard is complete: gather the shards' records (plans: extract's ShardPlans, cfg: its
    ExtractConfig with the codec resolved) into manifest.json, with the calibration and the basis' digest, and for
    --pixels jpeg how the JPEGs were made and which decoder (`pixel_decoder`) gave the teacher its pixels. `out`: the cache's destination
    (cache/destination.py: a folder or a URL)."""
    texts, digests = finished_records(out, [p.index for p in plans])
    records = [ShardRecord.from_json(t) for t in texts]
    codec_error = {}
    measured = [r.codec_error for r in records if r.codec_error]
    for name in dict.fromkeys([*codecs.CODECS, *(k for m in measured for k in m)]):
        vals = [m[name] for m in measured if name in m]
        if vals:
            codec_error[name] = {k: float(np.mean([v[k] for v in vals])) for k in vals[0]}
    images = sum(r.images for r in records)
    left_out = list(getattr(source, "skipped", ()))   # entries the folder scan left out (never in the listing)
    skipped = [*left_out, *(s for r in records for s in r.skipped)]
    manifest_checks.refuse_empty(images, skipped, cfg.data)
    source_info = SourceRecord(
        kind=source.kind, root=source.root, fingerprint=source.fingerprint, scan_skipped=len(left_out),
        count=len(source) if isinstance(source, FolderSource) else images + len(skipped),
        shards=tuple(source.urls) if isinstance(source, TarSource) else ())
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        teacher=TeacherRecord(**dataclasses.asdict(teacher_info)),
        target_layer=cfg.target_layer, geometry=cfg.geometry,
        views_per_image=cfg.views, seed=cfg.seed, codec=cfg.codec, pixels=cfg.pixels, tokens=tokens, target_dim=width,
        chunk_views=cfg.chunk_views, source=source_info,
        versions=replay_versions(), teacher_precision=precision,
        shards=tuple(ShardEntry(name=shard_name(r.index), images=r.images, views=r.views, files=r.files, record=d,
                                start=r.start, stop=r.stop, tar=r.tar) for r, d in zip(records, digests)),
        skipped=skipped, codec_error=codec_error,
        views=sum(r.views for r in records), images=images,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        basis=(calibration.record or {}).get("basis"), calibration=calibration.record,
        pixel_encoding={"quality": cfg.pixel_quality, "subsampling": "4:4:4", "decoder": pixel_decoder}
        if cfg.pixels == "jpeg" else lossless.encoding_record() if cfg.pixels == "lossless" else {},
    )
    out.write_text(MANIFEST, manifest.to_json())
    if source.scan_note():
        print(source.scan_note())
    return manifest
