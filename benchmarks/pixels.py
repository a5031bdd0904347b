"""How to store the views' pixels: bytes per view, error and decode cost of every candidate (issue 18, pixel half).

    python benchmarks/pixels.py [--views-per-image 8] [--json docs/pixels-cpu.json]

1. Renders views (MAE's crop, flip and 75 % mask, 224 px, seed 0) of scikit-image's photographs (the same
   ones the pretrained micro teacher learns from) and keeps each view's 49 visible patches, uint8.
2. Encodes them every way considered, per view: `visible` (the exact patches, today's default); JPEG of the
   7 x 7 tiled patches at several qualities, 4:4:4 (what `--pixels jpeg` stores) and 4:2:0; lossless: PNG of
   the tiled image, zstd (levels 3 and 19) of the raw patches and of left-difference-filtered patches (PNG's
   Sub filter, per patch row).
3. Per candidate: mean bytes per view, max abs / mean abs error and PSNR against the exact patches (lossy
   only), and the CPU time of decoding one view into the [49, 16, 16, 3] batch layout (one thread, batches of
   64, process CPU time): what the pixel path would spend per sample.
4. Feed: `cached_samples_per_s_per_core` of the training read itself (`Cache.take` of pixels, targets, scales
   and masks for batches of 64 random rows: memory-mapped reads, checksums and, for jpeg, the decode) on two
   caches of the same views, `--pixels visible` and `--pixels jpeg`, int8 targets; and the cores per GPU that
   rate needs at the data section's estimated feed rate for ViT-S and for ViT-T (250 TFLOPS / GFLOP per sample).
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
    return out


def measure(patches: np.ndarray) -> dict:
    res = {}
    for name, (enc, dec) in candidates().items():
        blobs = [enc(p) for p in patches]
        back = dec(blobs)
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


def feed(folder: Path, work: Path, per_image: int) -> dict:
    """cached_samples_per_s_per_core of Cache.take on a visible and a jpeg cache of the same views."""
    from g2sd_cache.cache.reader import open_cache
    from g2sd_cache.generic.extract import ExtractConfig, run_extract
    out = {}
    for pixels in ("visible", "jpeg"):
        cache_dir = work / pixels
        run_extract(ExtractConfig(data=str(folder), out=str(cache_dir), teacher="random", arch="test_mae_micro_patch16",
                                  views=1, codec="int8", pixels=pixels, workers=0, device="cpu", shard_size=256,
                                  chunk_views=16))
        cache = open_cache(str(cache_dir))
        n = cache.shard_images[0]
        specs = cache.specs
        bufs = {"pixels": np.empty((64, *cache.pixel_shape), np.uint8)} | {
            k: np.empty((64, *specs[k].per_view_shape), specs[k].dtype) for k in ("target", "scale", "mask") if k in specs}
        rng = np.random.default_rng(0)
        cache.take(0, 0, np.arange(n), {k: np.empty((n, *v.shape[1:]), v.dtype) for k, v in bufs.items()}, np.arange(n))
        t0, done = time.process_time(), 0
        while time.process_time() - t0 < 2.0:
            cache.take(0, 0, rng.choice(n, 64, replace=n < 64), bufs, np.arange(64))
            done += 64
        out[pixels] = done / (time.process_time() - t0)
        log(f"Cache.take, {pixels} pixels + int8 targets: {out[pixels]:,.0f} samples/s per core")
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
    ap.add_argument("--json")
    args = ap.parse_args(argv)
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
        report["cached_samples_per_s_per_core"] = feed(folder, Path(tmp), args.views_per_image)
    report["feed_rates"] = rates()
    report["feed_cores_per_gpu"] = {
        pixels: {name: r["feed_rate_samples_per_s"] / per_core for name, r in report["feed_rates"].items()}
        for pixels, per_core in report["cached_samples_per_s_per_core"].items()}
    report["feed_rate_basis"] = "ESTIMATE: 250 TFLOPS sustained / the student's GFLOP per sample (forward + backward)"
    for pixels, need in report["feed_cores_per_gpu"].items():
        log(f"{pixels}: {need[VIT_S]:.2f} cores per GPU at the ViT-S rate, {need[VIT_T]:.2f} at the ViT-T rate")
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
