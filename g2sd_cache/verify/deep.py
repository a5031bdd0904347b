"""verify, third layer (`--deep N`): N random views replayed through the live teacher, stored against live targets.

A cache with stored pixels replays from them (what training reads: no images needed); a `--pixels none` cache
decodes each view's image from --data and renders the stored crop and flip.

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
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from g2sd_cache.common.errors import CacheCorruptError, UserError
from g2sd_cache.cache.schema import Manifest
from g2sd_cache.training.precision import replay_precision, teacher_autocast
from g2sd_cache.verify.files import VerifyReport

CODEC_TOLERANCE = {"fp16": 2e-3, "bf16": 1e-2, "int8": 2e-2, "fp8": 6e-2, "int4": 4e-1}
BF16_COMPUTE_TOLERANCE = 2e-2
# fp16 autocast on either side: the teacher's own compute error measured 5.8e-4 on ViT-B (issue 21), ~9x margin
FP16_COMPUTE_TOLERANCE = 5e-3


def compute_allowance(*precisions: str) -> float:
    """The tolerance added (in quadrature) for the teachers' own arithmetic on both sides of the comparison."""
    names = {p.split("-")[0] for p in precisions}
    return BF16_COMPUTE_TOLERANCE if "bf16" in names else FP16_COMPUTE_TOLERANCE if "fp16" in names else 0.0


def codec_tolerance(m: Manifest) -> float:
    """A view's largest relative RMS error a sound cache can show in its codec. Low-rank codecs (pcaR) have no
    fixed bound: twice the worst held-out view of their calibration, at least 5e-2 and at most 0.5 (a wrong
    crop or mask misses by ~1 and more)."""
    if m.codec in CODEC_TOLERANCE:
        return CODEC_TOLERANCE[m.codec]
    worst = ((m.calibration or {}).get("errors") or {}).get(m.codec, {}).get("max_view_rel_rmse", 0.25)
    return min(0.5, max(5e-2, 2 * float(worst)))


def deep_check(report: VerifyReport, m: Manifest, cache_path: str, data: str | None, n: int,
               teacher_spec: str | None, device: str, seed: int, teacher_precision: str | None = None) -> None:
    """Replay `n` random views through the live teacher and compare with the stored targets."""
    from g2sd_cache.cache.reader import open_cache
    from g2sd_cache.models.mae import build_teacher
    from g2sd_cache.data.views import normalize_patches
    if not m.stores_pixels and not data:
        raise UserError("--deep on a cache without pixels (--pixels none) replays views from their images: pass --data")
    spec = teacher_spec or m.teacher.source
    if not (spec.startswith(("random", "pretrained-micro")) or os.path.isfile(spec)):
        raise UserError(f"--deep: the cache's teacher {spec} is not here; pass --teacher CKPT (the same weights)")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    teacher, info = build_teacher(spec, m.teacher.arch, m.geometry.img_size)
    if info.sha256 != m.teacher.sha256:
        raise UserError(f"--teacher {spec} is not the teacher that made the cache ({m.teacher.source}, sha256 "
                        f"{m.teacher.sha256[:12]}..., this one {info.sha256[:12]}...); --deep needs the same weights")
    teacher.to(dev)
    cache = open_cache(cache_path)
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(cache), size=min(n, len(cache)), replace=False).tolist()) if len(cache) else []
    records, passed_over = [], 0     # (global view index, record); views of shards already reported are not replayed
    for i in picks:
        shard = cache.shard_name(cache.locate(i)[0])
        if shard in report.broken:
            passed_over += 1
            continue
        try:
            records.append((i, cache[i]))
        except CacheCorruptError as e:
            report.add(shard, f"view {i} cannot be read for --deep ({e})")
    patches_of = _stored_patches if m.stores_pixels else _image_patches(report, m, data, records)
    precision = replay_precision(teacher_precision, m.teacher_precision, dev)
    allowance = compute_allowance(precision, m.teacher_precision)
    tol = math.hypot(codec_tolerance(m), allowance)
    sq_err = sq_ref = count = max_abs = worst = 0.0
    for b in range(0, len(records), 32):
        batch = [(i, r, p) for i, r in records[b:b + 32] if (p := patches_of(r)) is not None]
        if not batch:
            continue
        patches = normalize_patches(torch.stack([p for _, _, p in batch]).to(dev))
        mask = torch.stack([r.mask for _, r, _ in batch]).to(dev)
        with teacher_autocast(precision, dev)():
            live = teacher.targets_visible(patches, mask, m.target_layer).float().cpu()
        stored = torch.stack([r.target for _, r, _ in batch])
        err = stored - live
        for (i, r, _), e, ref in zip(batch, err, live):
            rel = float(e.norm() / ref.norm().clamp_min(1e-12))
            worst = max(worst, rel)
            if not rel <= tol:
                report.add(cache.shard_name(cache.locate(i)[0]), f"view {r.view} of {r.key}: stored target differs "
                           f"from the live teacher by rel RMS {rel:.2e} > tolerance {tol:.1e} ({m.codec}), max abs "
                           f"{float(e.abs().max()):.2e}")
        sq_err += float(err.double().pow(2).sum())
        sq_ref += float(live.double().pow(2).sum())
        count += err.numel()
        max_abs = max(max_abs, float(err.abs().max()))
    report.summary["deep"] = {
        "views": len(records), "passed_over": passed_over, "device": str(dev),
        "from": "stored pixels" if m.stores_pixels else "images",
        "precision": precision, "extract_precision": m.teacher_precision,
        "rel_rmse": math.sqrt(sq_err / sq_ref) if sq_ref else 0.0, "worst_rel_rmse": worst,
        "rmse": math.sqrt(sq_err / count) if count else 0.0, "max_abs": max_abs, "tolerance": tol,
        "compute_allowance": allowance}


def _stored_patches(record):
    return record.pixels


def _image_patches(report: VerifyReport, m: Manifest, data: str, records: list):
    """A function: record -> its view's visible patches, rendered from its image in --data (None if unreadable)."""
    from g2sd_cache.data.sources import FolderSource, open_source
    from g2sd_cache.data.views import decode_image, render_view, visible_patches
    source = open_source(data)
    images: dict[str, bytes] = {}
    if not isinstance(source, FolderSource):
        wanted = {r.key for _, r in records}
        for t in range(len(source)):
            for key, raw in source.samples(t, on_error=lambda exc: True):
                if key in wanted and raw is not None:
                    images[key] = raw

    def patches(r):
        try:
            raw = source.read(r.key) if isinstance(source, FolderSource) else images[r.key]
            pixels = render_view(decode_image(raw), r.crop, r.flip, m.geometry.img_size)
        except Exception as e:
            report.add("data", f"image {r.key} cannot be decoded for --deep ({type(e).__name__}: {e})")
            return None
        return visible_patches(pixels[None], r.mask[None], m.geometry.patch_size)[0]
    return patches
