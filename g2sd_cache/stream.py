"""Training data: a webdataset pipeline per DataLoader worker, following the epoch plan (plan.py).

Per worker (slot), the stages are webdataset-style iterator -> iterator functions:

    slot windows -> read_windows (block reads of cached views: the shuffle buffer)
                 -> shuffle_and_skip (the window's permutation; resume skips what was consumed)
                 -> replay (decode the source image, redo the stored crop and flip)

and the main process takes one sample from each worker in turn (DataLoader, batch_size=None),
checks every sample arrives in the planned order, and collates batches of (pixels, masks,
target codes) in a background thread. Targets stay in the cache's codec (fp16/bf16 codes or int8/fp8
codes + scales) all the way to the loss kernel, which decodes them on the fly.

Without a cache (online G2SD) the same pipeline samples a fresh view (seed, image, epoch) per image
and carries no target; the trainer runs the teacher. A sample that cannot be read (corrupt chunk,
unreadable image) becomes an invalid stand-in sample under --on-error skip: it keeps its place, so every
rank still runs the same number of steps, and the loss ignores it.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .cache import Cache
from .plan import EpochPlan, Window, consumed_per_slot, expected_order, window_permutation
from .sources import Source, TarSource
from .views import ViewGeometry, decode_image, render_view, sample_view
from .workers import keep_as_is, mp_context


@dataclass(frozen=True)
class StreamSpec:
    """What the workers need to materialise a plan. `view` is the cached view index this epoch uses
    (epoch mod K, cached mode) or the view counter of fresh views (the epoch, online mode)."""

    source: Source
    cache: Cache | None
    geometry: ViewGeometry
    seed: int
    rank: int
    epoch: int
    view: int


@dataclass
class _WindowData:
    """A window's rows, in plan order: cached arrays (or image indices online) and failed rows."""

    index: np.ndarray
    key: list[str]
    arrays: dict[str, np.ndarray | None]
    errors: dict[int, str]
    images: dict[str, bytes] | None = None   # tar sources: the window's image bytes by key


def read_windows(spec: StreamSpec):
    """Stage: Window -> (Window, _WindowData) with one block read per segment (cached) or the image
    indices (online). A failed read marks the segment's rows as errors instead of raising."""

    def stage(windows: Iterator[Window]):
        for window in windows:
            yield window, _read_window(spec, window)
    return stage


def _read_window(spec: StreamSpec, window: Window) -> _WindowData:
    index, keys, errors, parts = [], [], {}, []
    row = 0
    for seg in window.segments:
        if spec.cache is None:
            index.extend(range(seg.start, seg.stop))
            keys.extend(spec.source.keys[seg.start:seg.stop])
        else:
            try:
                b = spec.cache.read_block(seg.unit, spec.view, seg.start, seg.stop)
            except Exception as e:   # the rows become invalid samples; --on-error decides what that means
                errors.update((r, str(e)) for r in range(row, row + len(seg)))
                b = spec.cache.blank_block(len(seg))
                b.source_index[:] = -1
            parts.append(b)
            index.extend(b.source_index.tolist())
            keys.extend(str(k) for k in b.key)
        row += len(seg)
    arrays: dict[str, np.ndarray | None] = {}
    if spec.cache is not None:
        for name in ("codes", "scale", "mask", "crop", "flip"):   # one copy out of the maps, per window
            arrays[name] = None if parts[0].scale is None and name == "scale" else \
                np.concatenate([getattr(p, name) for p in parts])
    data = _WindowData(np.array(index, dtype=np.int64), keys, arrays, errors)
    if isinstance(spec.source, TarSource):
        data.images = _tar_images(spec.source, window, set(k for k in keys if k))
    return data


def _tar_images(source: TarSource, window: Window, wanted: set[str]) -> dict[str, bytes]:
    """Read a window's tar (tar windows hold one tar) up to the last wanted key."""
    found: dict[str, bytes] = {}
    for key, data in source.samples(window.segments[0].unit, on_error=lambda exc: True):
        if key in wanted and data is not None:
            found[key] = data
            if len(found) == len(wanted):
                break
    return found


def shuffle_and_skip(spec: StreamSpec, skip: int, start_seq: int):
    """Stage: (Window, data) -> (data, row, seq): each window's rows in its permuted order (the shuffle
    buffer's draws), numbered by position in the slot's stream from `start_seq`, dropping those before
    `skip` (consumed before a resume)."""

    def stage(src):
        seq = start_seq
        for window, data in src:
            for j, row in enumerate(window_permutation(spec.seed, spec.epoch, spec.rank, window)):
                if seq + j >= skip:
                    yield data, int(row), seq + j
            seq += len(window)
    return stage


def replay(spec: StreamSpec, slot: int):
    """Stage: (data, row, seq) -> sample dict: decode the image and render the view the teacher saw."""
    g = spec.geometry

    def stage(src):
        for data, row, seq in src:
            sample = {"slot": slot, "seq": seq, "index": int(data.index[row]), "view": spec.view,
                      "key": data.key[row], "valid": True, "error": ""}
            try:
                if row in data.errors:
                    raise RuntimeError(data.errors[row])
                key = data.key[row]
                raw = data.images.get(key) if data.images is not None else spec.source.read(key)
                if raw is None:
                    raise FileNotFoundError(f"image {key} is not in its tar shard")
                img = decode_image(raw)
                if spec.cache is None:
                    v = sample_view(spec.seed, sample["index"], spec.view, img.size, g)
                    crop, flip, mask = v.crop, v.flip, v.mask
                else:
                    crop = tuple(int(c) for c in data.arrays["crop"][row])
                    flip, mask = bool(data.arrays["flip"][row]), data.arrays["mask"][row]
                sample["pixels"] = render_view(img, crop, flip, g.img_size)
                sample["mask"] = torch.from_numpy(np.asarray(mask, dtype=bool).copy())
            except Exception as e:
                sample.update(valid=False, error=f"{data.key[row] or 'view'}: {type(e).__name__}: {e}",
                              pixels=torch.zeros(3, g.img_size, g.img_size, dtype=torch.uint8),
                              mask=torch.from_numpy(stand_in_mask(g)))
            if spec.cache is not None:
                sample["codes"] = torch.from_numpy(np.ascontiguousarray(data.arrays["codes"][row]))
                if data.arrays["scale"] is not None:
                    sample["scale"] = torch.from_numpy(np.ascontiguousarray(data.arrays["scale"][row]))
            yield sample
    return stage


def stand_in_mask(g: ViewGeometry) -> np.ndarray:
    """A valid mask (first patches visible) for stand-in samples, which only keep batch shapes."""
    mask = np.ones(g.num_patches, dtype=bool)
    mask[: g.num_visible] = False
    return mask


class ViewStream(IterableDataset):
    """One epoch of one rank. Worker w streams slot rotation[w] from its `consumed` position on."""

    def __init__(self, spec: StreamSpec, plan: EpochPlan, consumed: list[int], rotation: list[int]):
        self.spec, self.plan, self.consumed, self.rotation = spec, plan, consumed, rotation

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        slot = self.rotation[info.id if info else 0]
        windows = list(self.plan.slots[slot])
        skip, start_seq = self.consumed[slot], 0
        while windows and start_seq + len(windows[0]) <= skip:  # consumed windows are not even read
            start_seq += len(windows.pop(0))
        return iter(wds.DataPipeline(
            lambda: iter(windows),
            read_windows(self.spec),
            shuffle_and_skip(self.spec, skip, start_seq),
            replay(self.spec, slot),
        ))


@dataclass
class Batch:
    """A collated micro-batch. pixels [B, 3, S, S] uint8; mask [B, L] bool; valid [B] bool;
    codes [B, T, D] codec dtype and scale [B, T] float32 (cached), or None (online);
    index/view [B] int64 identify the views; errors lists invalid samples."""

    pixels: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor
    codes: torch.Tensor | None
    scale: torch.Tensor | None
    index: torch.Tensor
    view: torch.Tensor
    errors: list[str]

    def __len__(self) -> int:
        return self.pixels.shape[0]


class EpochLoader:
    """Iterates the micro-batches of one rank's epoch from micro-batch `start` on, in the planned order."""

    def __init__(self, spec: StreamSpec, plan: EpochPlan, *, batch_size: int, workers: int, start: int,
                 prefetch: int, pin_memory: bool, codec_dtype: torch.dtype | None):
        self.plan, self.batch_size = plan, batch_size
        self.lengths = plan.slot_lengths()
        self.consumed, self.rotation = consumed_per_slot(self.lengths, min(start * batch_size, plan.rank_views))
        self.remaining = plan.rank_views - sum(self.consumed)
        self.dataset = ViewStream(spec, plan, self.consumed, self.rotation)
        self.workers, self.prefetch, self.pin = workers, prefetch, pin_memory
        self.codec_dtype = codec_dtype

    def __len__(self) -> int:
        return -(-self.remaining // self.batch_size)

    def _samples(self) -> Iterator[dict]:
        if self.workers == 0:
            return iter(self.dataset)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers, collate_fn=keep_as_is,
                            multiprocessing_context=mp_context(self.workers), prefetch_factor=self.prefetch)
        return iter(loader)

    def _batches(self) -> Iterator[Batch]:
        order = expected_order(self.lengths, self.consumed, self.rotation)
        pending: list[dict] = []
        for sample in self._samples():
            expected = next(order, None)
            if expected != (sample["slot"], sample["seq"]):
                raise RuntimeError(f"data order broke: got sample {(sample['slot'], sample['seq'])}, "
                                   f"expected {expected}; resume exactness cannot be kept")
            pending.append(sample)
            if len(pending) == self.batch_size:
                yield self._collate(pending)
                pending = []
        if pending:
            yield self._collate(pending)

    def _collate(self, samples: list[dict]) -> Batch:
        codes = scale = None
        if "codes" in samples[0]:
            codes = torch.stack([s["codes"] for s in samples])
            if self.codec_dtype is not None and codes.dtype != self.codec_dtype:
                codes = codes.view(self.codec_dtype)
            if "scale" in samples[0]:
                scale = torch.stack([s["scale"] for s in samples])
        batch = Batch(pixels=torch.stack([s["pixels"] for s in samples]),
                      mask=torch.stack([s["mask"] for s in samples]),
                      valid=torch.tensor([s["valid"] for s in samples]),
                      codes=codes, scale=scale,
                      index=torch.tensor([s["index"] for s in samples], dtype=torch.int64),
                      view=torch.tensor([s["view"] for s in samples], dtype=torch.int64),
                      errors=[s["error"] for s in samples if not s["valid"]])
        if self.pin:
            for name in ("pixels", "mask", "valid", "codes", "scale"):
                t = getattr(batch, name)
                if t is not None:
                    setattr(batch, name, t.pin_memory())
        return batch

    def __iter__(self) -> Iterator[Batch]:
        """Batches are collated on a background thread, `prefetch` ahead, so collation overlaps the step."""
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def put(item) -> bool:
            """Queue `item` unless the consumer has gone; never block past a stop."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            batches = self._batches()
            try:
                for b in batches:
                    if not put(b):
                        return
                put(None)
            except BaseException as e:
                put(e)
            finally:
                batches.close()   # ends the DataLoader iterator, so its workers exit now

        thread = threading.Thread(target=produce, name="batch-collator", daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)
