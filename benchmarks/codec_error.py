"""Every codec on the same teacher targets: bytes per view and relative RMS error, and int4's scale layouts.

    python benchmarks/codec_error.py [--images 32] [--arch mae_vit_base_patch16] [--json out.json]

1. Renders `--images` views (view 0, seed 0) of generated photos (or `--data DIR`) at 224 px, runs a random
   teacher (`random:0`, as the README's codec table) and keeps its float32 targets [N, 197, 512].
2. Relative RMS error ||dec(enc(x)) - x|| / ||x|| and mean per-token cosine of every codec on them
   (`g2sd_cache.cache.codecs.codec_error`), plus int4 with one float32 scale per token instead of one float16
   scale per 32 channels (same 16 levels, same dither): the alternative the int4 codec was chosen against.
3. Bytes per view: `g2sd-cache extract --views 1` of the same images in every codec, on disk (all arrays)
   and of the targets alone (target + scale arrays). Low-rank codecs (pcaR) are measured with the basis their
   cache fitted on its calibration views (the same images: in-sample, as `g2sd-cache inspect` would report);
   their basis.npy (stored once per cache) is left out of the bytes per view and listed apart.
4. Low rank per rank R (16 ... 256) and per tiered codec pcaA+B+C (`--tiered`; default the registered ones):
   a PCA basis fitted on the first half of the views, the relative error on the second half (held out) and on
   the first (in-sample) with the stored codes (pcaR: int8 coefficients + a float16 scale per token; tiered:
   8, 4 and 2 dithered bits), and without rounding (the truncation alone, at the same rank).

About 1 minute on 2 CPU cores for 32 ViT-B views.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from g2sd_cache.cache import codecs
from g2sd_cache.cache.reader import open_cache
from g2sd_cache.generic.extract import ExtractConfig, run_extract
from g2sd_cache.models.mae import build_teacher
from g2sd_cache.data.synthetic import make_image_folder
from g2sd_cache.data.views import ViewGeometry, decode_image, normalize, render_view, sample_view

from g2sd_cache.benchmarks.common import dir_bytes


def teacher_targets(data: Path, arch: str, n: int, target_layer: int = 4, teacher_spec: str = "random:0",
                    img_size: int = 224) -> torch.Tensor:
    """float32 targets [n, T, D] of view 0 (seed 0) of the first n images under `data`."""
    teacher, _ = build_teacher(teacher_spec, arch, img_size)
    geometry = ViewGeometry(img_size=img_size, patch_size=teacher.shape.patch_size)
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    out = []
    for start in range(0, len(files), 16):
        pixels, masks = [], []
        for i, path in enumerate(files[start:start + 16], start):
            img = decode_image(str(path))
            view = sample_view(0, i, 0, img.size, geometry)
            pixels.append(render_view(img, view.crop, view.flip, geometry.img_size))
            masks.append(torch.from_numpy(view.mask))
        with torch.no_grad():
            out.append(teacher.targets(normalize(torch.stack(pixels)), torch.stack(masks), target_layer).float())
    return torch.cat(out)


def int4_per_token_error(x: torch.Tensor) -> dict:
    """int4 with one float32 scale = absmax(token) / 7.5 per token (the rejected layout): same levels
    (n - 7.5) * scale and the same dither (codecs._uniform, seeds 0..N-1) as the int4 codec."""
    N, T, D = x.shape
    scale = (x.abs().amax(-1, keepdim=True) / 7.5).clamp_min(2.0 ** -126)
    u = torch.from_numpy(codecs._uniform(torch.arange(N), T * D)).reshape(x.shape)
    y = (torch.floor(x / scale + 7.5 + u).clamp(0, 15) - 7.5) * scale
    rel = float((y - x).norm() / x.norm())
    cos = float(torch.nn.functional.cosine_similarity(y.flatten(0, 1), x.flatten(0, 1), dim=-1).mean())
    return {"rel_rmse": rel, "cosine": cos, "target_bytes_per_view": T * D // 2 + 4 * T}


def lowrank_by_rank(x: torch.Tensor, ranks=(16, 32, 64, 128, 256), tiered: tuple[str, ...] = ()) -> list[dict]:
    """Per rank R <= D, and per tiered codec pcaA+B+C of A + B + C <= D: the codec's relative RMS error on
    held-out views (basis fitted on the first half of x [N, T, D]), the truncation alone (exact coefficients of
    the same rank), and in-sample."""
    from g2sd_cache.cache import lowrank
    half = max(1, len(x) // 2)
    fit, test = x[:half], x[half:] if len(x) > half else x[:half]
    names = [f"pca{r}" for r in ranks if r <= x.shape[-1]]
    names += [n for n in tiered if codecs.get_codec(n).fits(x.shape[-1])]
    out = []
    for name in names:
        codec = codecs.get_codec(name)
        r = codec.basis_rank(x.shape[-1])
        basis = lowrank.fit_basis(fit, r)
        b = basis.double()
        centred = test.double() - b[0]
        truncated = (centred @ b[1:].T) @ b[1:] + b[0]
        out.append({"codec": name, "rank": r, "target_bytes_per_view": codec.bytes_per_view(*x.shape[1:]),
                    "heldout": codecs.codec_error(codec, test, basis)["rel_rmse"],
                    "heldout_truncation": float((truncated - test.double()).norm() / test.double().norm()),
                    "in_sample": codecs.codec_error(codec, fit, basis)["rel_rmse"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="views (one per image) to measure on (default 32)")
    ap.add_argument("--arch", default="mae_vit_base_patch16", help="teacher preset, random weights (random:0)")
    ap.add_argument("--data", default=None, help="an image folder (default: generated photos)")
    ap.add_argument("--teacher", default="random:0", help="random:SEED (default random:0), pretrained-micro[:SEED] "
                    "(with --arch test_mae_micro_patch16) or an MAE checkpoint")
    ap.add_argument("--img-size", type=int, default=224, help="crop size in pixels (default 224)")
    ap.add_argument("--ranks", type=int, nargs="+", metavar="R", help="ranks of the low-rank table (default 16 32 64 "
                    "128 256; those above the target width are left out)")
    ap.add_argument("--tiered", nargs="*", metavar="pcaA+B+C", help="tiered codecs for the low-rank table (default: "
                    "the registered ones; those keeping more coefficients than the target width are left out)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="g2sd-codec-error-") as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else make_image_folder(tmp / "images", args.images, seed=0, classes=4)
        x = teacher_targets(data, args.arch, args.images, teacher_spec=args.teacher, img_size=args.img_size)
        rows = {}
        for name, codec in codecs.CODECS.items():
            if codec.rank is not None and codec.rank >= x.shape[-1]:
                print(f"skipping {name}: it keeps {codec.rank} coefficients, not fewer than the target width "
                      f"{x.shape[-1]}")
                continue
            root = tmp / f"cache-{name}"
            run_extract(ExtractConfig(data=str(data), out=str(root), teacher=args.teacher, arch=args.arch, views=1,
                                      img_size=args.img_size,
                                      seed=0, codec=name, batch_size=16, workers=0, device="cpu",
                                      chunk_views=args.images, shard_size=max(args.images, 8)))
            cache = open_cache(str(root))
            m = cache.manifest
            basis_bytes = dir_bytes(root, ("basis.npy",)) if cache.basis is not None else 0   # once per cache
            rows[name] = {**codecs.codec_error(codec, x, cache.basis), "basis_bytes": basis_bytes,
                          "bytes_per_view": (dir_bytes(root) - basis_bytes) / m.views,
                          "target_bytes_per_view": sum(dir_bytes(root / s.name, ("target", "scale"))
                                                       for s in m.shards) / m.views,
                          "formula_bytes_per_view": codec.bytes_per_view(m.tokens, m.target_dim)}
        rows["int4 (fp32 scale per token)"] = int4_per_token_error(x)
        tiered = tuple(args.tiered if args.tiered is not None else (n for n, c in codecs.CODECS.items() if c.tiers))
        ranks = lowrank_by_rank(x, tuple(args.ranks) if args.ranks else (16, 32, 64, 128, 256), tiered)
    fp16 = rows["fp16"]["bytes_per_view"]
    print(f"{args.images} views of {args.teacher} {args.arch}, targets {list(x.shape[1:])}\n")
    print("| codec | bytes/view on disk | vs fp16 | target bytes/view (formula) | rel. RMS error | cosine |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        disk = f"{r['bytes_per_view']:,.0f}" if "bytes_per_view" in r else "-"
        ratio = f"{r['bytes_per_view'] / fp16:.3f}" if "bytes_per_view" in r else "-"
        tb = f"{r['target_bytes_per_view']:,.0f}" + (f" ({r['formula_bytes_per_view']:,})" if "formula_bytes_per_view"
                                                     in r else " (formula)")
        print(f"| {name} | {disk} | {ratio} | {tb} | {100 * r['rel_rmse']:.3f} % | {r['cosine']:.6f} |")
    print(f"\nLow rank: basis fitted on views 0..{len(x) // 2 - 1}, error on views {len(x) // 2}..{len(x) - 1} "
          "(held out) and on the fitting views (in-sample)\n")
    print("| codec | rank | target bytes/view | held-out rel. RMS (stored codes) | truncation alone | in-sample |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in ranks:
        print(f"| {r['codec']} | {r['rank']} | {r['target_bytes_per_view']:,} | {100 * r['heldout']:.2f} % | "
              f"{100 * r['heldout_truncation']:.2f} % | {100 * r['in_sample']:.2f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps({"views": args.images, "arch": args.arch, "teacher": args.teacher,
                                                "img_size": args.img_size, "codecs": rows, "lowrank": ranks}, indent=1))
    return 0 if all(math.isfinite(r["rel_rmse"]) for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
