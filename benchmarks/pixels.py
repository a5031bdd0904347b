"""How to store the views' pixels: bytes per view, error and decode cost of every candidate (issue 18, pixel half).

    python benchmarks/pixels.py [--views-per-image 8] [--feed CODEC:PIXELS ...] [--json docs/pixels-cpu.json]

1. Renders views (MAE's crop, flip and 75 % mask, 224 px, seed 0) of scikit-image's photographs (the same
   ones the pretrained micro teacher learns from) and keeps each view's 49 visible patches, uint8.
2. Encodes them every way considered, per view: `visible` (the exact patches, today's default); JPEG of the
   7 x 7 tiled patches at several qualities, 4:4:4 (what `--pixels jpeg` stores) and 4:2:0; lossless: PNG of
   the tiled image, zstd (levels 3 and 19) of the raw patches and of left-difference-filtered patches (PNG's
   Sub filter, per patch row), and `--pixels lossless` as shipped (cache/lossless.py: colour-decorrelated 2-D
   difference residuals, Blosc LZ4HC), whole and its host part alone, and the same residuals under zstd-19.
3. Per candidate: mean bytes per view, max abs / mean abs error and PSNR against the exact patches (lossy
   only), and the CPU time of decoding one view into the [49, 16, 16, 3] batch layout (one thread, batches of
   64, process CPU time): what the pixel path would spend per sample.
4. Feed (`feed`, `--feed CODEC:PIXELS ...`): a pca64 cache in each pixel mode (visible, lossless, jpeg), and the
   tiered pca16+64+128 with lossless and pca32+128+256 with jpeg pixels, of the same photographs (a random
   ViT-B teacher: 197 x 512 targets, so ViT-B's bytes per view), its bytes per view (total, targets, pixels), and
   the host's cost of feeding it, per CPU-second of one core, at batch 16 (the CPU benchmark's) and 256 (a GPU's):
   `take_samples_per_s_per_core`, the read alone (`Cache.take` of pixels -- for lossless the decompressed residual
   planes --, codes, scales, masks of random rows), and `cached_samples_per_s_per_core`, train's whole pixel-path
   loader (StepLoader: read_cached on its background thread, webdataset stages, buffer pool);
   `device_ms_per_batch_on_this_cpu`: what training then runs on the device (the low-rank decode, the lossless
   unfilter), timed on this CPU. `feed_cores_per_gpu` {take, loader}: the ESTIMATED feed rate (250 TFLOPS / the
   student's GFLOP per sample, ViT-S and ViT-T) over the per-core rate at batch 256.
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from g2sd_cache.benchmarks.common import log
from g2sd_cache.cache.pixel_codecs import decode_jpegs, tile, untile
from g2sd_cache.data.views import ViewGeometry, render_view, sample_view, visible_patches

QUALITIES = (75, 85, 90, 95)
VIT_S, VIT_T = "mae_vit_small_patch16_dec256d4b", "mae_vit_tiny_patch16_dec128d4b"


def views(per_image: int) -> np.ndarray:
    """uint8 [V, 49, 16, 16, 3]: visible patches of `per_image` views of every photograph."""
    from g2sd_cache.models.pretrain import PHOTOS, photographs
    g = ViewGeometry()
    out = []
    for i, img in enumerate(photographs(PHOTOS, side=10_000)):
        for v in range(per_image):
            view = sample_view(0, i, v, img.size, g)
            px = render_view(img, view.crop, view.flip, g.img_size)
            out.append(visible_patches(px[None], torch.from_numpy(view.mask)[None], g.patch_size)[0].numpy())
    return np.stack(out)


def _jpeg(patches: np.ndarray, quality: int, subsampling: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(tile(patches)).save(buf, format="JPEG", quality=quality, subsampling=subsampling, optimize=True)
    return buf.getvalue()


def _png(patches: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(tile(patches)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _sub_filter(patches: np.ndarray) -> np.ndarray:
    """PNG's Sub filter inside each patch row: each pixel minus its left neighbour, mod 256."""
    out = patches.copy()                                  # [..., p, p, 3]: axis -2 runs along a patch row
    out[..., 1:, :] = patches[..., 1:, :] - patches[..., :-1, :]
    return out


def _unsub(filtered: np.ndarray) -> np.ndarray:
    return np.cumsum(filtered, axis=-2, dtype=np.uint8)


def candidates():
    """name -> (encode(patches) -> bytes, decode(list of bytes) -> uint8 [B, 49, 16, 16, 3])."""
    from numcodecs import Zstd
    shape = (49, 16, 16, 3)
    out = {"visible": (lambda p: p.tobytes(),
                       lambda bs: np.stack([np.frombuffer(b, np.uint8).reshape(shape) for b in bs]))}
    jdec = lambda bs: decode_jpegs(bs, 49, 16).numpy()   # noqa: E731
    for q in QUALITIES:
        out[f"jpeg-q{q}-444"] = (lambda p, q=q: _jpeg(p, q, 0), jdec)
    out["jpeg-q90-420"] = (lambda p: _jpeg(p, 90, 2), jdec)
    out["png"] = (_png, lambda bs: np.stack([untile(torch.from_numpy(np.array(Image.open(io.BytesIO(b)))).permute(
        2, 0, 1), 49, 16).numpy() for b in bs]))
    for level in (3, 19):
        z = Zstd(level=level)
        out[f"zstd{level}"] = (lambda p, z=z: z.encode(p.tobytes()),
                               lambda bs, z=z: np.stack([np.frombuffer(z.decode(b), np.uint8).reshape(shape) for b in bs]))
        out[f"sub+zstd{level}"] = (lambda p, z=z: z.encode(_sub_filter(p).tobytes()),
                                   lambda bs, z=z: _unsub(np.stack([np.frombuffer(z.decode(b), np.uint8).reshape(shape)
                                                                    for b in bs])))
    from g2sd_cache.cache import lossless

    def host_part(bs):    # what the feed's host does for --pixels lossless: decompress into the batch buffer
        res = np.empty((len(bs), *lossless.residual_shape(49, 16)), np.uint8)
        for i, b in enumerate(bs):
            lossless.decompress_into(b, res[i])
        return res

    # --pixels lossless as shipped: the host's part alone (the device undoes the filter), and all of it on a CPU
    out["lossless"] = (lossless.encode, lambda bs: lossless.unfilter(torch.from_numpy(host_part(bs))).numpy())
    out["lossless-host-part"] = (lossless.encode, host_part)
    z19 = Zstd(level=19)    # the same residuals under zstd: fewer bytes, slower to decompress
    out["lossless-filter+zstd19"] = (lambda p: z19.encode(lossless.filter_patches(p).tobytes()),
                                     lambda bs: lossless.unfilter(torch.from_numpy(np.stack(
                                         [np.frombuffer(z19.decode(b), np.uint8).reshape(49, 3, 16, 16) for b in bs]))
                                     ).numpy())
    return out


def candidates_unfilter(res: np.ndarray) -> np.ndarray:
    from g2sd_cache.cache.lossless import unfilter
    return unfilter(torch.from_numpy(res)).numpy()


def measure(patches: np.ndarray) -> dict:
    res = {}
    for name, (enc, dec) in candidates().items():
        blobs = [enc(p) for p in patches]
        back = dec(blobs)
        if name.endswith("host-part"):   # residual planes, not pixels: exact iff the whole decode is
            back = candidates_unfilter(back)
        diff = back.astype(np.int16) - patches.astype(np.int16)
        mse = float((diff.astype(np.float64) ** 2).mean())
        batches = [blobs[i:i + 64] for i in range(0, len(blobs), 64)]
        t0, n = time.process_time(), 0
        while time.process_time() - t0 < 1.0:
            for b in batches:
                dec(b)
                n += len(b)
        us = (time.process_time() - t0) / n * 1e6
        res[name] = {"bytes_per_view": float(np.mean([len(b) for b in blobs])), "max_abs_err": int(np.abs(diff).max()),
                     "mean_abs_err": float(np.abs(diff).mean()),
                     "psnr_db": None if mse == 0 else 10 * np.log10(255 ** 2 / mse), "decode_us_per_view": us}
        log(f"{name:>14}: {res[name]['bytes_per_view']:8.0f} B/view, mean |err| {res[name]['mean_abs_err']:.2f}, "
            f"decode {us:.0f} us/view")
    return res


FEED_TEACHER = "mae_vit_base_patch16"   # ViT-B's 197 x 512 targets
# (codec, pixels) of the caches fed: pca64 in every pixel mode, and the two tiered presets in the pixel mode whose
# 40 KB budget each was sized for
FEED = (("pca64", "visible"), ("pca64", "lossless"), ("pca64", "jpeg"), ("pca16+64+128", "lossless"),
        ("pca32+128+256", "jpeg"))
FEED_BATCHES = (16, 256)      # the CPU benchmark's batch and a GPU's


def _feed_caches(folder: Path, work: Path, per_image: int, combos=FEED) -> dict:
    """{(codec, pixels): a cache of the photographs (random ViT-B, K = per_image views)} for each of `combos`."""
    from g2sd_cache.benchmarks.common import quiet
    from g2sd_cache.cache.reader import open_cache
    from g2sd_cache.generic.extract import ExtractConfig, run_extract
    out = {}
    for codec, pixels in combos:
        log(f"feed: extracting a {codec} + --pixels {pixels} cache ({FEED_TEACHER}, random weights)")
        root = work / f"{codec}-{pixels}"
        with quiet():
            run_extract(ExtractConfig(data=str(folder), out=str(root), teacher="random", arch=FEED_TEACHER,
                                      views=per_image, codec=codec, pixels=pixels, workers=0, device="cpu",
                                      shard_size=256, chunk_views=16, calibration_views=64))
        out[codec, pixels] = open_cache(str(root))
    return out


def _bytes_per_view(cache) -> dict:
    m = cache.manifest
    per = lambda *arrays: sum(n for e in m.shards for rel, n in e.files.items()   # noqa: E731
                              if rel.split("/")[0] in arrays) / m.views
    return {"bytes_per_view": per(*{rel.split("/")[0] for e in m.shards for rel in e.files}),
            "target_bytes_per_view": per("target", "scale"), "pixel_bytes_per_view": per("pixels", "jpeg", "lossless")}


def _take_rate(cache, batch: int, seconds: float) -> float:
    """views/s per core of the host's read alone: Cache.take of the pixels (a lossless cache: decompressed
    residual planes only), codes, scales and masks of `batch` random rows into batch buffers."""
    specs = cache.specs
    pix = ("lossless", cache.residual_shape) if cache.lossless else ("pixels", cache.pixel_shape)
    bufs = {pix[0]: np.empty((batch, *pix[1]), np.uint8)} | {
        k: np.empty((batch, *specs[k].per_view_shape), specs[k].dtype) for k in ("target", "scale", "mask")}
    n, k = cache.shard_images[0], cache.views_per_image
    rng = np.random.default_rng(0)
    for v in range(k):   # warm: maps opened, every chunk's crc32c checked once
        cache.take(0, v, np.arange(n), {a: np.empty((n, *b.shape[1:]), b.dtype) for a, b in bufs.items()}, np.arange(n))
    t0, done = time.process_time(), 0
    while time.process_time() - t0 < seconds:
        cache.take(0, done // batch % k, rng.integers(0, n, batch), bufs, np.arange(batch))
        done += batch
    return done / (time.process_time() - t0)


def _loader_rate(cache, batch: int, views: int) -> float:
    """views/s per core (CPU time of the process, all threads) of train's own pixel-path loader (StepLoader,
    read_cached on its background thread, webdataset stages, buffer pool), `views` random views in batches."""
    from g2sd_cache.benchmarks.common import cpu_clock
    from g2sd_cache.generic.plan import EpochOrder
    from g2sd_cache.generic.stream import StepLoader, StreamSpec
    n = cache.shard_images[0]
    order = EpochOrder(0, np.zeros(n, np.int64), np.arange(n, dtype=np.int64))
    spec = StreamSpec(source=None, cache=cache, geometry=cache.manifest.geometry, seed=0, view=0, order=order)
    steps = max(4, views // batch)
    pos = np.random.default_rng(1).integers(0, n, (steps, batch))
    for _ in StepLoader(spec, pos[:2], batch_size=batch, workers=0, prefetch=2, pin_memory=False):
        pass
    with cpu_clock() as got:
        done = sum(len(b) for step in StepLoader(spec, pos, batch_size=batch, workers=0, prefetch=2,
                                                   pin_memory=False) for b in step)
    return done / got["cpu_s"]


def _device_ms(cache, batch: int, repeats: int = 5) -> dict:
    """ms per batch of what training runs on the device after the copy (timed here on the CPU, one thread:
    on a GPU each is a few kernels): the low-rank decode, and a lossless cache's unfilter."""
    from g2sd_cache.cache import codecs, lossless
    b = cache.read_block(0, 0, 0, cache.shard_images[0])
    reps = -(-batch // len(b))
    codes = codecs.from_storage(cache.codec, np.array(b.codes)).repeat(reps, 1, 1)[:batch]
    scale = torch.from_numpy(np.array(b.scale))
    scale = scale.repeat(reps, *[1] * (scale.dim() - 1))[:batch]
    res = torch.from_numpy(lossless.filter_patches(b.pixels)).repeat(reps, 1, 1, 1, 1)[:batch]
    out = {}
    for name, fn in (("lowrank_decode", lambda: codecs.decode(cache.codec, codes, scale, basis=cache.basis)),
                     ("lossless_unfilter", lambda: lossless.unfilter(res))):
        t0 = time.process_time()
        for _ in range(repeats):
            fn()
        out[name] = 1e3 * (time.process_time() - t0) / repeats
    return out


def feed(folder: Path, work: Path, per_image: int, seconds: float = 2.0, combos=FEED) -> dict:
    """Per (codec, pixel mode), the cache's bytes per view and the host's cost of feeding it: the read alone
    (`take_samples_per_s_per_core`) and train's whole loader (`cached_samples_per_s_per_core`), at each batch."""
    out = {}
    for (codec, pixels), cache in _feed_caches(folder, work, per_image, combos).items():
        r = {**_bytes_per_view(cache), "codec": codec, "teacher": f"{FEED_TEACHER} (random)",
             "take_samples_per_s_per_core": {}, "cached_samples_per_s_per_core": {}}
        for batch in FEED_BATCHES:
            r["take_samples_per_s_per_core"][str(batch)] = _take_rate(cache, batch, seconds)
            r["cached_samples_per_s_per_core"][str(batch)] = _loader_rate(cache, batch, 8192)
            log(f"{codec} + {pixels}, batch {batch}: Cache.take {r['take_samples_per_s_per_core'][str(batch)]:,.0f}"
                f", train's loader {r['cached_samples_per_s_per_core'][str(batch)]:,.0f} views/s per core")
        r["device_ms_per_batch_on_this_cpu"] = _device_ms(cache, FEED_BATCHES[-1])
        out[f"{codec}+{pixels}"] = r
    return out


def rates() -> dict:
    from g2sd_cache.benchmarks.sections.data import ASSUMED_GPU_TFLOPS
    from g2sd_cache.benchmarks.sections.flops import student_gflop
    from g2sd_cache.models.mae import build_student
    g = ViewGeometry()
    out = {}
    for name in (VIT_S, VIT_T):
        gflop = student_gflop(build_student(name, 512, 224), g)
        out[name] = {"gflop_per_sample": gflop, "feed_rate_samples_per_s": ASSUMED_GPU_TFLOPS * 1e3 / gflop}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--views-per-image", type=int, default=8)
    ap.add_argument("--feed", nargs="+", metavar="CODEC:PIXELS", help="the caches of the feed part (default: "
                    + " ".join(f"{c}:{p}" for c, p in FEED) + ")")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    combos = tuple(tuple(f.split(":", 1)) for f in args.feed) if args.feed else FEED
    if any(len(c) != 2 for c in combos):
        ap.error("--feed takes CODEC:PIXELS, e.g. pca64:lossless")
    torch.set_num_threads(1)
    patches = views(args.views_per_image)
    log(f"{len(patches)} views of {len(patches) // args.views_per_image} photographs, 49 visible patches each")
    report = {"views": len(patches), "candidates": measure(patches)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        from g2sd_cache.models.pretrain import PHOTOS, photographs
        for i, img in enumerate(photographs(PHOTOS, side=10_000)):
            img.save(folder / f"{i:03d}.png")
        report["feed"] = feed(folder, Path(tmp), args.views_per_image, combos=combos)
    report["feed_rates"] = rates()
    report["feed_rate_basis"] = "ESTIMATE: 250 TFLOPS sustained / the student's GFLOP per sample (forward + backward)"
    for combo, r in report["feed"].items():
        r["feed_cores_per_gpu"] = {what: {name: fr["feed_rate_samples_per_s"] / r[key][str(FEED_BATCHES[-1])]
                                          for name, fr in report["feed_rates"].items()}
                                   for what, key in (("take", "take_samples_per_s_per_core"),
                                                     ("loader", "cached_samples_per_s_per_core"))}
        need = r["feed_cores_per_gpu"]["loader"]
        log(f"{combo}: {r['bytes_per_view']:,.0f} B/view; train's loader at batch {FEED_BATCHES[-1]} needs "
            f"{need[VIT_S]:.2f} cores per GPU at the ViT-S rate, {need[VIT_T]:.2f} at the ViT-T rate")
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
