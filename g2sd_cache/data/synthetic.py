"""Seeded synthetic datasets for the demo, tests and benchmarks (nothing is ever downloaded).

Images are JPEGs of ImageNet-like size and content statistics: smooth colour gradients with a few
shapes and noise, so that decoding and cropping cost what real photos cost.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def synthetic_image(seed: int, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A deterministic RGB image of `size` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(20, 120) + rng.uniform(0, 6)) +
                     np.cos(yy / rng.uniform(20, 120) + rng.uniform(0, 6)) for _ in range(3)], axis=-1)
    pixels = (base - base.min()) / (np.ptp(base) + 1e-6) * 200 + rng.normal(0, 12, (h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return img


def _size(rng: np.random.Generator, vary: bool) -> tuple[int, int]:
    return (int(rng.integers(320, 640)), int(rng.integers(240, 480))) if vary else (500, 375)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_image_folder(root: str | Path, count: int, seed: int = 0, classes: int = 4, vary_size: bool = True) -> Path:
    """Write `count` JPEGs into `classes` sub-folders of `root` (ImageFolder layout)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:06d}.jpg").write_bytes(jpeg_bytes(synthetic_image(seed * 100_003 + i, _size(rng, vary_size))))
    return root


def make_tar_shards(root: str | Path, count: int, per_shard: int, seed: int = 0) -> list[Path]:
    """Write `count` JPEG samples into webdataset tars of `per_shard` samples; returns the tar paths."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s, start in enumerate(range(0, count, per_shard)):
        path = root / f"train-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(count, start + per_shard)):
                data = jpeg_bytes(synthetic_image(seed * 100_003 + i, _size(rng, True)))
                info = tarfile.TarInfo(f"sample{i:08d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
