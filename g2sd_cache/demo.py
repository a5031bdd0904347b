"""`g2sd-cache demo`: the whole product on an embedded default, no downloads, a few minutes on a laptop CPU.

1. generate JPEG images of ImageNet-like size;
2. build a seeded random mae_vit_base_patch16 teacher and extract a cache with 2 views per image;
3. train the default small student from the cache (no teacher) for a few dozen steps;
4. run the same number of online G2SD steps (teacher in the loop) — the baseline;
5. print what the cache costs and what it saves.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .extract import ExtractConfig, run_extract
from .inspect_cache import inspect_report
from .synthetic import make_image_folder
from .train import TrainConfig, train


@dataclass(frozen=True)
class DemoConfig:
    out: str = "g2sd-demo"
    images: int = 48
    steps: int = 24
    batch_size: int = 16
    workers: int = 1
    device: str = "auto"


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    images = out / "images"
    print(f"[1/4] writing {cfg.images} synthetic JPEGs (320-640 px) to {images}")
    make_image_folder(images, cfg.images, seed=0, classes=4)

    print("[2/4] extracting a cache: random mae_vit_base_patch16 teacher, 2 views per image, fp16 targets")
    ex = run_extract(ExtractConfig(data=str(images), out=str(out / "cache"), teacher="random",
                                   arch="mae_vit_base_patch16", views=2, batch_size=cfg.batch_size,
                                   workers=cfg.workers, device=cfg.device, shard_size=32, chunk_views=16))
    report = inspect_report(str(out / "cache"), sample_views=16)

    common = dict(data=str(images), student="mae_vit_small_patch16_dec256d4b", steps=cfg.steps,
                  batch_size=cfg.batch_size, blr=1.5e-3, warmup_epochs=1.0, workers=cfg.workers,
                  device=cfg.device, log_every=max(1, cfg.steps // 6), save_every=cfg.steps, seed=0)
    print(f"[3/4] training the small student from the cache for {cfg.steps} steps (no teacher forward)")
    cached = train(TrainConfig(out=str(out / "run-cached"), cache=str(out / "cache"), **common))
    print(f"[4/4] the same {cfg.steps} steps online: the teacher runs every step (G2SD's original recipe)")
    online = train(TrainConfig(out=str(out / "run-online"), teacher="random", arch="mae_vit_base_patch16", **common))

    losses = [json.loads(line)["loss"] for line in (out / "run-cached" / "metrics.jsonl").read_text().splitlines()]
    ratio = cached["samples_per_s"] / online["samples_per_s"] if online["samples_per_s"] else float("nan")
    summary = {
        "views_cached": report["views"], "bytes_per_view": report["bytes_per_view"],
        "extract_views_per_s": ex["views_per_s"], "loss_first": losses[0], "loss_last": losses[-1],
        "cached_samples_per_s": cached["samples_per_s"], "online_samples_per_s": online["samples_per_s"],
        "speedup": ratio,
    }
    print("\n=== g2sd-cache demo ===")
    print(f"views cached       {summary['views_cached']} ({cfg.images} images x 2 views), "
          f"{summary['bytes_per_view'] / 1024:.0f} KiB per view on disk, extract {ex['views_per_s']:.1f} views/s")
    print(f"student loss       {' -> '.join(f'{x:.4f}' for x in losses)} (cached training, logged every "
          f"{common['log_every']} steps)")
    print(f"cached training    {cached['samples_per_s']:.1f} samples/s (student only)")
    print(f"online training    {online['samples_per_s']:.1f} samples/s (teacher forward every step)")
    print(f"speedup            {ratio:.2f}x from the cache on this machine")
    print(f"outputs            {out}/ (cache/, run-cached/, run-online/); "
          f"`g2sd-cache inspect {out / 'cache'}` shows the cache")
    return summary
