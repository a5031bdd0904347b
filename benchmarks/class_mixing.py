"""Distinct classes per training batch on a class-sorted image folder: how well extract's shard order and the
trainer's epoch order mix classes, against the official global shuffle.

    python benchmarks/class_mixing.py [--classes 100] [--per-class 50] [--batch 64] [--chunk-views 64]
                                      [--shard-size 2048] [--windows 256 1024] [--workers 4] [--epochs 20]
                                      [--no-extract] [--json OUT.json]

Writes a class-sorted folder of tiny JPEGs (class after class, like ImageNet's train/ listing), extracts a
real cache from it with `run_extract` (micro teacher, 32-px views, one view per image) and reads every
shard's stored `source_index`. Batches are then cut in two trainer orders, both modelled here with numpy
(independent of generic/train.py / generic/plan.py, whose API may change):

- per-worker windows (the trainer's order before the elastic epoch plan): every shard cut into blocks of chunk_views
  rows, the blocks shuffled and concatenated, cut into windows of `window` rows dealt round-robin to
  `workers` DataLoader slots, every window permuted, the slots interleaved one sample at a time (the
  DataLoader's order), then batches;
- global (the trainer's order now, plan.epoch_order): the blocks shuffled, the windows permuted, batches
  cut in order (a global batch that ranks slice has the same statistics).

Each for two layouts of the same images: the cache's (a seeded random order of the listing, what extract
writes now) and shards that follow the sorted listing (what extract wrote before). The global-shuffle
figure (the official G2SD sampler) is exact: sum over classes of 1 - C(N - n_c, B) / C(N, B).

--no-extract skips the images and the cache and takes the shards from extract's own planning code
(`plan_shards` and `schema.folder_order` on a listing of N names): the same rows, at any scale (ImageNet:
--classes 1000 --per-class 1281 --batch 256 --shard-size 512 --epochs 2 --no-extract).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from math import comb
from pathlib import Path

import numpy as np


def make_class_sorted_folder(root: Path, classes: int, per_class: int, size=(40, 36)) -> Path:
    """`classes` folders n000, n001, ... of `per_class` tiny JPEGs each; the sorted listing is class by class."""
    from g2sd_cache.data.synthetic import jpeg_bytes, synthetic_image
    for c in range(classes):
        (root / f"n{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / f"n{c:03d}" / f"{i:03d}.jpg").write_bytes(jpeg_bytes(synthetic_image(c * 100_000 + i, size)))
    return root


def _shuffled_blocks(shard_rows: list[np.ndarray], block: int, rng: np.random.Generator) -> np.ndarray:
    blocks = [rows[i:i + block] for rows in shard_rows for i in range(0, len(rows), block)]
    return np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])


def global_order(shard_rows: list[np.ndarray], block: int, window: int, seed: int) -> np.ndarray:
    """Rows (source indices) in the order a global block + window shuffle reads them."""
    rng = np.random.default_rng(seed)
    flat = _shuffled_blocks(shard_rows, block, rng)
    return np.concatenate([w[rng.permutation(len(w))] for w in np.split(flat, range(window, len(flat), window))])


def per_worker_order(shard_rows: list[np.ndarray], block: int, window: int, workers: int, seed: int) -> np.ndarray:
    """Rows in the order of windows dealt to `workers` slots and interleaved one sample per slot in turn."""
    rng = np.random.default_rng(seed)
    flat = _shuffled_blocks(shard_rows, block, rng)
    windows = [w[rng.permutation(len(w))] for w in np.split(flat, range(window, len(flat), window))]
    streams = [np.concatenate(windows[s::workers]) for s in range(min(workers, len(windows)))]
    # round-robin with exhausted slots skipped = sort all samples by (position in own stream, slot)
    rows = np.concatenate(streams)
    key = np.concatenate([np.arange(len(x)) * len(streams) + s for s, x in enumerate(streams)])
    return rows[np.argsort(key, kind="stable")]


def classes_per_batch(order: np.ndarray, classes: np.ndarray, batch: int) -> list[int]:
    """Distinct classes in each full batch of `order` (source indices; classes[i] = class of image i)."""
    return [len(np.unique(classes[order[i:i + batch]])) for i in range(0, len(order) - batch + 1, batch)]


def global_shuffle_expectation(class_sizes: list[int], batch: int) -> float:
    """E[distinct classes] among `batch` images drawn without replacement, exactly."""
    n = sum(class_sizes)
    return sum(1 - comb(n - k, batch) / comb(n, batch) for k in class_sizes)


def _extract_config(data: str, out: str, args):
    from g2sd_cache.generic.extract import ExtractConfig
    return ExtractConfig(data=data, out=out, arch="test_mae_micro_patch16", img_size=32, views=1,
                         shard_size=args.shard_size, chunk_views=args.chunk_views, workers=0, device="cpu")


def _extracted_shards(args) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """A real cache of a generated folder: every shard's stored source_index (view 0), and the listing."""
    import zarr

    from g2sd_cache import open_cache
    from g2sd_cache.generic.extract import run_extract
    from g2sd_cache.data.sources import FolderSource
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_class_sorted_folder(Path(tmp) / "images", args.classes, args.per_class)
        out = Path(tmp) / "cache"
        run_extract(_extract_config(str(folder), str(out), args))
        stored = [zarr.open_group(str(out / s.name), mode="r")["source_index"][0]
                  for s in open_cache(out).manifest.shards]
        return stored, FolderSource.scan(str(folder)).keys


def _planned_shards(args) -> tuple[list[np.ndarray], tuple[str, ...]]:
    """The same rows from extract's planning code alone: plan_shards over a listing of names, folder_order."""
    from g2sd_cache.generic.extract import plan_shards
    from g2sd_cache.cache.schema import folder_order
    from g2sd_cache.data.sources import FolderSource
    keys = tuple(f"n{c:03d}/{i:04d}.jpg" for c in range(args.classes) for i in range(args.per_class))
    cfg = _extract_config("-", "-", args)
    order = folder_order(cfg.seed, len(keys))
    plans = plan_shards(FolderSource("-", keys, (0,) * len(keys)), cfg)
    return [order[p.start:p.stop] for p in plans], keys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--batch", type=int, default=64, help="batch per rank")
    p.add_argument("--chunk-views", type=int, default=64, help="extract --chunk-views: the trainer's block")
    p.add_argument("--shard-size", type=int, default=2048, help="extract --shard-size")
    p.add_argument("--windows", type=int, nargs="+", default=[256, 1024], help="train --shuffle-window values")
    p.add_argument("--workers", type=int, default=4, help="train --workers (per-worker order)")
    p.add_argument("--epochs", type=int, default=20, help="data orders averaged")
    p.add_argument("--no-extract", action="store_true", help="plan the shards without writing images or a cache")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)

    stored, keys = (_planned_shards if args.no_extract else _extracted_shards)(args)
    classes = np.array([int(k[1:4]) for k in keys])
    per_shard = len(stored[0])
    listing = np.split(np.arange(len(keys)), range(per_shard, len(keys), per_shard))
    expected = global_shuffle_expectation([args.per_class] * args.classes, args.batch)

    report = {"images": len(keys), "classes": args.classes, "batch": args.batch, "chunk_views": args.chunk_views,
              "images_per_shard": per_shard, "workers": args.workers, "global_shuffle": expected, "rows": []}
    print(f"{len(keys)} images, {args.classes} classes (class-sorted listing), {per_shard} images per shard, "
          f"blocks of {args.chunk_views}, batch {args.batch}, mean over {args.epochs} epochs")
    print(f"global shuffle (exact): {expected:.2f} distinct classes per batch\n")
    print("| shard layout | trainer order | window | distinct classes per batch | vs global shuffle |")
    print("|---|---|---|---|---|")
    for layout, rows in (("sorted listing (before)", listing), ("seeded order (now)", stored)):
        for window in args.windows:
            for name, order in (("per-worker windows", lambda s: per_worker_order(rows, args.chunk_views, window,
                                                                                   args.workers, s)),
                                ("global", lambda s: global_order(rows, args.chunk_views, window, s))):
                got = float(np.mean([c for s in range(args.epochs) for c in classes_per_batch(order(s), classes,
                                                                                                   args.batch)]))
                report["rows"].append({"layout": layout, "order": name, "window": window, "classes": got,
                                       "ratio": got / expected})
                print(f"| {layout} | {name} | {window} | {got:.2f} | {got / expected:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
