"""Storage section: bytes per view of a cache in every codec of `g2sd_cache.cache.codecs.CODECS`, and each
codec's error on real teacher targets.

One small cache per codec, written by `run_extract` with the first teacher (pixels stored: the default).
Figures per codec (`storage.<codec>.*`):
- `bytes_per_view`: every file of the cache over its views (targets + pixels + masks, crops, keys, ...);
- `target_bytes_per_view`: the target codes and their scales alone (what the codec decides);
- `pixel_bytes_per_view`: the stored visible patches alone (uint8, n_keep x p x p x 3: 37,632 B at mask
  0.75; the same in every codec); `<codec>+lossless`, `<codec>+jpeg` (COMPACT): the same codec with
  `--pixels lossless` / `--pixels jpeg`, their pixel bytes as stored (a tiered pcaA+B+C that keeps more
  coefficients than the teacher's width is left out and listed in `storage.skipped`);
- `formula_*`: the same from the manifest's array shapes, without shard indexes and checksums;
- `vs_fp16` / `target_vs_fp16`: the ratios to fp16 (target: int8 targets <= 0.51x fp16);
- `rel_rmse`, `cosine`: the codec's round trip (low-rank codecs, pcaR: with the basis their cache fitted on
  its own first views, so these are held-out errors) on float32 targets of the extract section's bare-teacher pass
  (a random-weight teacher on synthetic images: real MAE features have outlier channels, so re-check on
  your teacher; `g2sd-cache inspect` prints the same for a real cache);
- `basis_bytes`, `calibration_rel_rmse`: pcaR only: the stored basis (once per cache, left out of
  `bytes_per_view`: ImageNet amortises it to < 1 B per view) and the error extract's calibration measured on its held-out views;
- `imagenet_gb`: ImageNet-1k (1,281,167 images) at K = 1, 4, 10 views per image;
- `read_gb_per_s_per_gpu`: the read bandwidth one GPU needs at the data section's feed rate R (an estimate
  where R is): a cache larger than the page cache must come off disk at this rate.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from g2sd_cache.models.mae import TEACHER_PRESETS

from g2sd_cache.benchmarks.sections import Bench, section
from g2sd_cache.benchmarks.common import IMAGENET_IMAGES, Profile, dir_bytes, log
from g2sd_cache.benchmarks.sections.extract import extract_config, timed_extract


# Caches of <= 40 KB per ViT-B view: low-rank targets with compressed pixels (storage.<codec>+<pixels>); on
# synthetic JPEGs, whose views compress differently from photographs (benchmarks/pixels.py measures those).
COMPACT = (("pca64", "lossless"), ("pca64", "jpeg"), ("pca16+64+128", "lossless"), ("pca32+128+256", "jpeg"))


def _formula(specs: dict, names: tuple[str, ...]) -> int:
    return sum(math.prod(specs[n].per_view_shape) * np.dtype(specs[n].dtype).itemsize for n in names if n in specs)


def storage_section(ws: dict, prof: Profile, device: torch.device, feed: dict) -> dict:
    from g2sd_cache.cache import codecs
    from g2sd_cache.cache.reader import open_cache

    arch, targets, out = prof.teachers[0], ws.get("targets_fp32"), {}
    rate = feed["feed_rate_samples_per_s"]
    width = TEACHER_PRESETS[arch].decoder_embed_dim
    caches = [(name, codec, "visible") for name, codec in codecs.CODECS.items()]
    caches += [(f"{name}+{pixels}", codecs.CODECS[name], pixels) for name, pixels in COMPACT]
    skipped = [name for name, codec, _ in caches if not codec.fits(width)]   # tiered codes wider than the targets
    if skipped:
        log(f"storage: skipping {', '.join(skipped)}: more coefficients than {arch}'s {width}-wide targets")
    caches = [c for c in caches if c[0] not in skipped]
    for name, codec, pixels in caches:
        log(f"storage: {prof.store_images}-view {name} cache")
        root = ws["tmp"] / f"store-{name}"
        timed_extract(extract_config(ws["store"], root, arch, prof, device, views=1, codec=codec.name, workers=0,
                                     chunk_views=prof.store_images, pixels=pixels))
        cache = open_cache(str(root))
        m = cache.manifest
        specs = m.specs()
        shards = [root / s.name for s in m.shards]
        # a low-rank cache's basis (pca128 of ViT-B: 264 KB, once per cache) is reported apart: per view it is
        # 8 KB in this 32-view cache and 0.2 B in ImageNet's
        basis_bytes = dir_bytes(root, ("basis.npy",)) if cache.basis is not None else 0
        on_disk = dir_bytes(root) - basis_bytes
        # low-rank codecs: the basis this cache fitted on its own calibration views, applied to other targets
        err = codecs.codec_error(codec, targets, cache.basis) if targets is not None else {"rel_rmse": None,
                                                                                            "cosine": None}
        out[name] = {
            "bytes_per_view": on_disk / m.views,
            "target_bytes_per_view": sum(dir_bytes(s, ("target", "scale")) for s in shards) / m.views,
            "pixel_bytes_per_view": sum(dir_bytes(s, ("pixels", "jpeg", "lossless")) for s in shards) / m.views,
            "pixels": pixels,
            "formula_target_bytes_per_view": _formula(specs, ("target", "scale")),
            "formula_pixel_bytes_per_view": _formula(specs, ("pixels",)),
            "rel_rmse": err["rel_rmse"], "cosine": err["cosine"], "views": m.views,
            "imagenet_gb": {str(k): on_disk / m.views * IMAGENET_IMAGES * k / 1e9 for k in (1, 4, 10)},
            "read_gb_per_s_per_gpu": on_disk / m.views * rate / 1e9,
            "basis_bytes": basis_bytes,
            "calibration_rel_rmse": ((m.calibration or {}).get("errors") or {}).get(codec.name, {}).get("rel_rmse"),
        }
    for name, c in out.items():
        c["vs_fp16"] = c["bytes_per_view"] / out["fp16"]["bytes_per_view"]
        c["target_vs_fp16"] = c["target_bytes_per_view"] / out["fp16"]["target_bytes_per_view"]
    return {**out, "codecs": list(out), "skipped": skipped, "tokens": m.tokens, "target_dim": m.target_dim, "teacher": arch,
            "error_views": int(targets.shape[0]) if targets is not None else 0, "imagenet_images": IMAGENET_IMAGES,
            "feed_rate_samples_per_s": rate, "feed_rate_is_estimate": feed["feed_rate_is_estimate"]}


@section("storage")
def run_section(bench: Bench) -> dict:
    return storage_section(bench.ws, bench.prof, bench.device, bench.report["data"])
