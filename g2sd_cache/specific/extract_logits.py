"""`g2sd-cache extract-logits`: run the fine-tuned teacher once over the mixed batches of K epochs of the
stage-2 plan and store its predictions (cache/logits.py), so `finetune --logits` never runs it.

    plan (seed, recipe, labelled folder) -> shards of `shard_groups` groups -> this rank's unfinished shards
      -> DataLoader workers: plan.batch(epoch, group) (decode, augment, mix; a pure function of its key)
      -> main: teacher in fp32 on the mixed group -> top-k values (fp16), indices, argmax of the fp32 logits
      -> background thread: the shard written atomically (writer.ShardWriter)
    rank 0, after every rank is done: manifest.json from the shards' records.

A shard holds the same groups of every cached epoch, so its bytes do not depend on which shards were done
before: after a kill and a rerun, the cache equals an uninterrupted run's. Ranks take shards round-robin.
"""
from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from g2sd_cache.models.classifier import ClassifierInfo, build_teacher
from g2sd_cache.common.config import to_yaml
from g2sd_cache.common.dist import DistEnv, run_on_ranks
from g2sd_cache.common.errors import UserError
from g2sd_cache.cache.logits import (LOGITS_FORMAT, LOGITS_FORMAT_VERSION, LogitsManifest, LogitsShardRecord, index_dtype,
                           logits_specs)
from g2sd_cache.cache.destination import finished_records, open_destination
from g2sd_cache.cache.schema import CONFIG, MANIFEST, shard_name
from g2sd_cache.specific.config import LogitsConfig
from g2sd_cache.specific.plan import MixedGroup, SDPlan, UnreadableImages, open_plan
from g2sd_cache.common.workers import keep_as_is, mp_context
from g2sd_cache.training.precision import recorded_precision, resolve_teacher_precision, teacher_autocast
from g2sd_cache.cache.writer import ShardData, ShardWriter


@dataclasses.dataclass(frozen=True)
class ShardSpan:
    index: int
    first_group: int
    groups: int


def plan_shards(groups_per_epoch: int, shard_groups: int) -> list[ShardSpan]:
    return [ShardSpan(i, a, min(shard_groups, groups_per_epoch - a))
            for i, a in enumerate(range(0, groups_per_epoch, shard_groups))]


class _Groups(Dataset):
    """(shard, epoch, group) items in order -> (item, the mixed group)."""

    def __init__(self, plan: SDPlan, items: list[tuple[int, int, int]]):
        self.plan, self.items = plan, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[tuple[int, int, int], MixedGroup]:
        shard, epoch, group = self.items[i]
        return self.items[i], self.plan.batch(epoch, group)


@torch.no_grad()
def teacher_predictions(teacher: torch.nn.Module, images: torch.Tensor, topk: int,
                        precision: str = "fp32") -> tuple[torch.Tensor, ...]:
    """images: [G, 3, S, S] -> (fp32 logits [G, C], top-k values [G, k] fp16, indices [G, k], argmax [G]).
    The teacher runs in `precision` (resolved; G2SD's is fp32, outside autocast: engine_finetune_dis.py:51);
    argmax is of the logits in float32."""
    with teacher_autocast(precision, images.device)():
        logits = teacher(images).float()
    values, indices = logits.topk(topk, dim=1)
    return logits, values.half(), indices, logits.argmax(dim=1)


def _prepare_output(dest, cfg: LogitsConfig, fingerprints: dict) -> None:
    """Rank 0: claim and lock the cache (a folder or a URL: cache/destination.py, with extract's promises: only a
    cache of this kind is resumed or overwritten, a second writer is refused, dead writers' temporaries are
    removed), then check that an existing cache was made with the same settings. `dest.release()` unlocks."""
    dest.claim(cfg.overwrite)
    old = dest.read_config()
    if old is not None:
        new = dataclasses.asdict(cfg) | fingerprints
        diff = [k for k in (*LogitsConfig.CONTENT, *fingerprints) if old.get(k) != new.get(k)]
        if diff:
            raise UserError(f"--out {cfg.out} holds a cache made with other settings ({', '.join(diff)} differ); pass "
                            f"--overwrite to replace it or choose another --out")
    dest.write_text(CONFIG, to_yaml(cfg, fingerprints))


def write_manifest(out, cfg: LogitsConfig, plan: SDPlan, shards: list[ShardSpan], info: ClassifierInfo,
                   precision: str = "fp32") -> LogitsManifest:
    """`out`: the cache's destination (cache/destination.py: a folder or a URL); the manifest is written last."""
    texts, digests = finished_records(out, [s.index for s in shards])
    records = [LogitsShardRecord.from_json(t) for t in texts]
    manifest = LogitsManifest(
        format=LOGITS_FORMAT, format_version=LOGITS_FORMAT_VERSION, teacher=dataclasses.asdict(info),
        teacher_precision=recorded_precision(precision), plan=plan.describe(), epochs=cfg.cached_epochs, groups_per_epoch=plan.num_groups,
        group_size=cfg.group_size, topk=cfg.topk, num_classes=plan.data.num_classes, shard_groups=cfg.shard_groups,
        shards=[{"name": shard_name(r.index), "first_group": r.first_group, "groups": r.groups, "files": r.files,
                 "record": d} for r, d in zip(records, digests)],
        samples=cfg.cached_epochs * plan.num_groups * cfg.group_size,
        bytes=sum(sum(r.files.values()) for r in records),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    out.write_text(MANIFEST, manifest.to_json())
    return manifest


def run_extract_logits(cfg: LogitsConfig) -> dict:
    """Extract the logits cache described by `cfg`; returns the summary the CLI prints."""
    dests = []       # opened after validation, on every rank (a URL's staging is per rank); released whatever happens

    def body(cfg: LogitsConfig, env: DistEnv) -> dict:
        dests.append(open_destination(cfg.out, cfg.staging, cfg.lease_s, kind="logits"))
        return _extract(cfg, env, dests[0])
    return run_on_ranks(cfg, body, release=lambda: [d.release() for d in dests], command="extract-logits")


def _extract(cfg: LogitsConfig, env: DistEnv, dest) -> dict:
    plan = open_plan(cfg.data, cfg.recipe(), cfg.seed)
    num_classes = plan.data.num_classes
    if cfg.topk > num_classes:
        raise UserError(f"--topk {cfg.topk} is more than the {num_classes} classes of {cfg.data}")
    teacher, info = build_teacher(cfg.teacher, cfg.teacher_arch, num_classes, cfg.img_size)
    teacher.to(env.device)
    resolve_teacher_precision(cfg.teacher_precision, env.device, auto="fp32")     # refuse fp16 on CPU before any work
    fingerprints = {"format": LOGITS_FORMAT, "teacher_sha256": info.sha256, "plan": plan.describe()}
    if env.is_main:
        _prepare_output(dest, cfg, fingerprints)
    env.barrier()
    return _extract_shards(cfg, env, dest, plan, teacher, info)


def _extract_shards(cfg: LogitsConfig, env: DistEnv, dest, plan: SDPlan, teacher, info: ClassifierInfo) -> dict:
    """Every pending shard of this rank, then (rank 0) the manifest."""
    num_classes = plan.data.num_classes
    precision = resolve_teacher_precision(cfg.teacher_precision, env.device, auto="fp32")
    shards = plan_shards(plan.num_groups, cfg.shard_groups)
    mine = [s for s in shards if s.index % env.world == env.rank]
    pending = [s for s in mine if not dest.is_complete(s.index)]
    dest.clear_unfinished([s.index for s in pending])
    if env.is_main and len(pending) < len(mine):
        print(f"resuming: {len(mine) - len(pending)} of {len(mine)} shards of this rank are already complete")
    items = [(s.index, e, s.first_group + g) for s in pending for e in range(cfg.cached_epochs) for g in range(s.groups)]
    loader = DataLoader(_Groups(plan, items), batch_size=None, num_workers=cfg.workers, collate_fn=keep_as_is,
                        multiprocessing_context=mp_context(cfg.workers, __name__),
                        prefetch_factor=2 if cfg.workers else None)
    by_index = {s.index: s for s in pending}
    specs = logits_specs(cfg.topk, num_classes)
    g = cfg.group_size
    writer = ShardWriter(dest.staging, chunk_views=g, what="logits cache", publish=dest.publish)
    buffers: dict[int, dict[str, np.ndarray]] = {}
    filled: dict[int, int] = {}
    crcs: dict[int, dict[str, int]] = {}    # per shard: image index -> crc32c of the bytes its groups read
    bar = tqdm(total=len(items) * g, unit="sample", desc="extract-logits", disable=not env.is_main, dynamic_ncols=True)
    samples = 0
    teacher_s = 0.0
    unreadable = UnreadableImages(cfg.on_error, cfg.data)
    start = time.perf_counter()
    try:
        for (shard, epoch, group), batch in loader:
            for note in unreadable.check(batch):
                tqdm.write(note)
            span = by_index[shard]
            if shard not in buffers:
                n = span.groups * g
                buffers[shard] = {name: np.zeros((cfg.cached_epochs, n, *spec.per_view_shape), dtype=spec.dtype)
                                  for name, spec in specs.items()}
                filled[shard] = 0
                crcs[shard] = {}
            t0 = time.perf_counter()
            logits, values, indices, argmax = teacher_predictions(teacher, batch.images.to(env.device), cfg.topk,
                                                                  precision)
            if not bool(torch.isfinite(logits).all()):
                raise UserError(f"the teacher's logits are not finite (NaN or Inf) on group {group} of epoch {epoch}; "
                                f"nothing of shard {shard_name(shard)} was written. Check the teacher checkpoint")
            rows = slice((group - span.first_group) * g, (group - span.first_group + 1) * g)
            b = buffers[shard]
            b["values"][epoch, rows] = values.cpu().numpy()
            b["indices"][epoch, rows] = indices.cpu().numpy().astype(b["indices"].dtype)
            b["argmax"][epoch, rows] = argmax.cpu().numpy().astype(b["argmax"].dtype)
            crcs[shard].update(zip(map(str, batch.indices.tolist()), batch.crc32c.tolist()))
            teacher_s += time.perf_counter() - t0
            samples += g
            bar.update(g)
            filled[shard] += 1
            if filled[shard] == span.groups * cfg.cached_epochs:
                record = LogitsShardRecord(index=shard, first_group=span.first_group, groups=span.groups,
                                           group_size=g, epochs=cfg.cached_epochs,
                                           image_crc32c=dict(sorted(crcs.pop(shard).items(), key=lambda kv: int(kv[0]))))
                writer.submit(ShardData(record, buffers.pop(shard)))
        writer.close()
    finally:
        writer.abandon()
        bar.close()
    elapsed = time.perf_counter() - start
    env.barrier()
    summary = {"samples": samples, "seconds": elapsed, "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
               "teacher_s": teacher_s, "teacher_samples_per_s": samples / teacher_s if teacher_s > 0 else 0.0,
               "index_dtype": index_dtype(num_classes), "teacher_precision": precision,
               "unreadable": sorted(unreadable.seen)}
    if env.is_main:
        dest.check()
        manifest = write_manifest(dest, cfg, plan, shards, info, precision)
        summary.update(cache_samples=manifest.samples, cache_bytes=manifest.bytes,
                       bytes_per_sample=manifest.bytes_per_sample, epochs=manifest.epochs,
                       groups_per_epoch=manifest.groups_per_epoch)
    return summary
