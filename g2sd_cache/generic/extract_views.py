"""Extract's data side: the DataLoader workers decode each image of the pending shards, sample its K views,
crop and flip them and cut each view's visible patches (all the teacher sees); with `--pixels jpeg` they also
encode the patches as one JPEG per view and hand on the *decoded* patches, so the teacher sees what the cache
will return (cache/pixel_codecs.py); with `--pixels lossless` they encode them losslessly (cache/lossless.py) and
hand on the patches themselves.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from g2sd_cache.cache import lossless
from g2sd_cache.cache.digests import image_crc32c
from g2sd_cache.cache.pixel_codecs import encode_jpeg, jpeg_round_trip
from g2sd_cache.cache.schema import folder_order, source_index_for_tar
from g2sd_cache.data.sources import FolderSource, Source, TarMemberError, TarSource
from g2sd_cache.data.views import decode_image, render_view, sample_view, visible_patches

if TYPE_CHECKING:
    from g2sd_cache.generic.extract import ExtractConfig


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` holds the folder images at positions [start, stop) of `folder_order(seed, n)`,
    or tar number `index` (start = stop = 0)."""

    index: int
    start: int = 0
    stop: int = 0




class RenderedImages(IterableDataset):
    """Yields, per image of the pending shards, in order: {"shard", "pos", "key", "index", "patches"
    [K, n_keep, p, p, 3] uint8 (the visible patches of each view, as rendered), "crop" [K,4], "flip" [K],
    "mask" [K,L]} or {..., "error"}; for tars also {"shard", "end": count}.

    Folder images are dealt to workers round-robin and tars whole, so the DataLoader (which takes
    items from workers in turn) returns folder images in shard order: each shard's run of the seeded
    listing order. "index" is the image's index in the sorted listing; its views depend on nothing else."""

    def __init__(self, source: Source, shards: list[ShardPlan], cfg: ExtractConfig, jpeg_decoder: str = "cpu"):
        self.source, self.shards, self.cfg, self.jpeg_decoder = source, shards, cfg, jpeg_decoder
        self.geometry = cfg.geometry
        self.offsets = np.cumsum([0] + [p.stop - p.start for p in shards]).tolist()
        self.order = folder_order(cfg.seed, len(source)) if isinstance(source, FolderSource) else None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if isinstance(self.source, TarSource):
            for plan in self.shards[worker::workers]:
                yield from self._tar_items(plan)
            return
        for j in range(worker, self.offsets[-1], workers):
            s = bisect.bisect_right(self.offsets, j) - 1
            plan, pos = self.shards[s], j - self.offsets[s]
            index = int(self.order[plan.start + pos])
            key = self.source.keys[index]
            yield self._render(plan.index, pos, index, key, lambda: self.source.read(key))

    def _tar_items(self, plan: ShardPlan) -> Iterator[dict]:
        tar_errors: list[tuple[str, str]] = []   # (key, error): each problem the tar reader reports, once

        def on_error(exc: Exception) -> bool:
            key = exc.key if isinstance(exc, TarMemberError) else f"{self.source.urls[plan.index]} (tar)"
            tar_errors.append((key, str(exc) if isinstance(exc, TarMemberError) else f"{type(exc).__name__}: {exc}"))
            return self.cfg.on_error == "skip"

        pos = 0
        for key, data in self.source.samples(plan.index, on_error):
            for bad, msg in tar_errors:
                yield {"shard": plan.index, "key": bad, "error": msg}
            tar_errors.clear()
            item = self._render(plan.index, pos, source_index_for_tar(plan.index, pos), key,
                                lambda: data if data is not None else _no_image(key))
            if "error" not in item:
                pos += 1
            yield item
        for bad, msg in tar_errors:
            yield {"shard": plan.index, "key": bad, "error": msg}
        yield {"shard": plan.index, "end": pos}

    def _render(self, shard: int, pos: int, index: int, key: str, read) -> dict:
        try:
            data = read()
            img = decode_image(data)
        except Exception as e:  # unreadable, truncated or not an image
            return {"shard": shard, "pos": pos, "key": key, "error": f"{type(e).__name__}: {e}"}
        g, k = self.geometry, self.cfg.views
        views = [sample_view(self.cfg.seed, index, v, img.size, g) for v in range(k)]
        mask = np.stack([v.mask for v in views])
        pixels = torch.stack([render_view(img, v.crop, v.flip, g.img_size) for v in views])
        patches = visible_patches(pixels, torch.from_numpy(mask), g.patch_size)
        blobs = None
        if self.cfg.pixels == "jpeg":   # the teacher gets the decoded JPEG: what the cache will give the student
            if self.jpeg_decoder == "cpu":
                patches, blobs = jpeg_round_trip(patches, self.cfg.pixel_quality)
            else:                       # decoded by the main process on the GPU (_ShardAssembler.add)
                patches, blobs = None, [encode_jpeg(v.numpy(), self.cfg.pixel_quality) for v in patches]
        exact = [lossless.encode(v.numpy()) for v in patches] if self.cfg.pixels == "lossless" else None
        return {
            "shard": shard, "pos": pos, "key": key, "index": index, "crc32c": image_crc32c(data),
            # only the visible patches leave the worker: a quarter of the bytes, all the teacher sees
            "patches": patches, "jpeg": blobs, "lossless": exact,
            "crop": np.array([v.crop for v in views], dtype=np.int32),
            "flip": np.array([v.flip for v in views], dtype=bool),
            "mask": mask,
        }


def _no_image(key: str) -> bytes:
    raise ValueError(f"sample {key} has no jpg/jpeg/png/webp member")
