"""How low-rank a teacher's targets are: the held-out error of a per-token PCA, random vs pretrained micro teacher.

    python benchmarks/spectrum.py [--images 128] [--arch test_mae_micro_dec128_patch16]

View 0 (seed 0) of generated images and of scikit-image's photographs at 96 px through `random:0` and
`pretrained-micro:0` (--arch test_mae_micro_patch16, targets [37, 32], or test_mae_micro_dec128_patch16,
targets [37, 128]); a PCA (centre included) fitted on the first half of the tokens, relative RMS error of the
rank-R reconstruction of the other half, at the same fractions of the width as ViT-B's pca64 / pca128 / pca176
(the largest rank whose ViT-B cache with JPEG pixels stays within 40 KB per view) / pca256. A random teacher's
features are a poor proxy for the spectrum a low-rank codec exploits: this says by how much.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from g2sd_cache.benchmarks.codec_error import teacher_targets
from g2sd_cache.data.synthetic import make_image_folder
from g2sd_cache.models.pretrain import PHOTOS, photographs

FRACTIONS = (64 / 512, 128 / 512, 176 / 512, 256 / 512)   # of ViT-B's 512-wide targets


def ranks_for(width: int) -> tuple[int, ...]:
    """The ranks at FRACTIONS of `width` (rounded; 32 -> 4, 8, 11, 16; 128 -> 16, 32, 44, 64)."""
    return tuple(sorted({max(1, round(f * width)) for f in FRACTIONS}))


def held_out_pca_error(x: torch.Tensor, rank: int) -> float:
    """x [N, D]: fit on the first half, relative RMS error of the rank-`rank` reconstruction of the second."""
    fit, held = x[: len(x) // 2], x[len(x) // 2:]
    mu = fit.mean(0)
    basis = torch.linalg.svd(fit - mu, full_matrices=False)[2][:rank]
    return float(((held - mu) @ basis.T @ basis + mu - held).norm() / held.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128, help="generated images (default 128)")
    ap.add_argument("--arch", default="test_mae_micro_patch16", choices=("test_mae_micro_patch16",
                    "test_mae_micro_dec128_patch16"), help="the micro teacher (default test_mae_micro_patch16)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"synthetic": (make_image_folder(Path(tmp) / "syn", args.images, seed=0, classes=4), args.images)}
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for i, img in enumerate(photographs(PHOTOS, side=10_000)):
            img.save(photos / f"{i:03d}.png")
        folders["photographs"] = (photos, len(PHOTOS))
        for data, (folder, n) in folders.items():
            for teacher in ("random:0", "pretrained-micro:0"):
                x = teacher_targets(folder, args.arch, n, teacher_spec=teacher, img_size=96)
                x = x.reshape(-1, x.shape[-1])
                ranks = ranks_for(x.shape[-1])
                out.setdefault(data, {})[teacher] = {f"rank{r}": held_out_pca_error(x, r) for r in ranks}
                print(f"{data:12s} {teacher:20s} " + ", ".join(
                    f"rank {r}: {100 * out[data][teacher][f'rank{r}']:.1f} %" for r in ranks))
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, **out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
