"""Finetune section: G2SD's second stage (specific distillation), online against cached teacher logits.

Everything runs through the product's own stage-2 code: the data plan (`open_plan`), `FineTuner.step`,
`teacher_predictions` and `run_extract_logits`. Teachers and students are classifier presets
(g2sd_cache.models.classifier), a random fine-tuned teacher (`random:0`); the student runs under bf16 autocast on
CUDA (fp32 on CPU), the teacher in fp32, as `finetune` does. Figures (`finetune.*`):

- `step[]`, per (teacher, student) pair, seconds per sample, medians over `reps` rounds after one warm-up
  round; a round times, one after the other on the same mixed group, the teacher forward alone, an online
  step and a cached step, so a shared machine's drift hits the three alike:
  - `teacher_s_per_sample`: the teacher's fp32 forward on the mixed group;
  - `online_s_per_sample`: `FineTuner.step` with the teacher in the loop (its forward, then the student's step);
  - `cached_s_per_sample`: `FineTuner.step` of the same student on stored predictions (no teacher);
  - `speedup` = online / cached; `ideal_speedup` = (t_teacher + t_cached) / t_cached, what removing the
    teacher can give at most; `efficiency` = speedup / ideal (target >= 0.95, as stage 1's).
  Data loading is left out: both modes decode and augment the same images.
- `storage`: bytes per sample per cached epoch of a real logits cache (top-5 fp16 logits, their uint16
  classes, the uint16 argmax: `payload_bytes_per_sample` = 22), as measured on disk with zarr metadata and
  checksums, and projected for ImageNet-1k (1,281,167 images, groups of 128, 256 groups per shard).
- `extract`: `run_extract_logits` samples/s end to end (decoding, augmenting and mixing in `workers`
  DataLoader processes, worker start-up included) against the bare teacher forward on the same mixed groups
  (`ratio`); `data_s_per_sample` is what building one mixed sample costs on one core.

Default pairs: ViT-B -> ViT-S and ViT-B -> ViT-T at 224 px (G2SD's); the quick profile runs micro models at
64 px (seconds, a smoke test: its ratios mean nothing). benchmarks/finetune.py runs this section alone.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from g2sd_cache.benchmarks.sections import Bench, section
from g2sd_cache.benchmarks.common import IMAGENET_IMAGES, generate_images, log, make_images, quiet, sync, usable_cores

TOPK = 5
GROUP, SHARD_GROUPS = 128, 256   # ImageNet's layout: G2SD's per-GPU batch, extract-logits' default shard


@dataclasses.dataclass(frozen=True)
class FinetuneProfile:
    pairs: tuple[tuple[str, str], ...]   # (teacher, student) classifier presets
    img_size: int
    batch: int            # samples per step: one mixing group
    reps: int             # timed rounds of the step, after one warm-up round
    extract_images: int   # images of the extract measurement (and of the step's groups)
    storage_images: int   # tiny images of the storage cache (100 classes)
    workers: int          # extract-logits DataLoader workers


def finetune_profile(device: torch.device, quick: bool) -> FinetuneProfile:
    if quick:   # micro models, in-process extract (no worker start-up): a few seconds
        return FinetuneProfile((("test_vit_micro_patch16", "test_vit_micro_patch16"),), img_size=64, batch=16,
                               reps=3, extract_images=64, storage_images=256, workers=0)
    pairs = (("vit_base_patch16", "vit_small_patch16"), ("vit_base_patch16", "vit_tiny_patch16"))
    cuda = device.type == "cuda"
    return FinetuneProfile(pairs, img_size=224, batch=128 if cuda else 16, reps=3,
                           extract_images=4096 if cuda else 128, storage_images=1024,
                           workers=min(8, max(1, usable_cores() - 1)))


def step_times(teacher_arch: str, student_arch: str, prof: FinetuneProfile, device: torch.device, data: Path) -> dict:
    """Seconds per sample of the teacher forward, an online step and a cached step (see the module docstring)."""
    from g2sd_cache.models.classifier import build_teacher
    from g2sd_cache.common.dist import DistEnv
    from g2sd_cache.specific.extract_logits import teacher_predictions
    from g2sd_cache.specific.plan import open_plan
    from g2sd_cache.cache.logits import TeacherPredictions
    from g2sd_cache.specific.config import FinetuneConfig
    from g2sd_cache.specific.step import FineTuner

    batch = prof.batch
    cfg = FinetuneConfig(data=str(data), out="-", init="-", arch=student_arch, teacher_arch=teacher_arch,
                         img_size=prof.img_size, group_size=batch, teacher="random:0")
    plan = open_plan(cfg.data, cfg.recipe(), cfg.seed)
    classes = plan.data.num_classes
    teacher = build_teacher("random:0", teacher_arch, classes, prof.img_size)[0].to(device)
    env = DistEnv(0, 1, 0, device)
    online = FineTuner(cfg, classes, teacher, env, load_init=False)
    cached = FineTuner(cfg, classes, None, env, load_init=False)
    groups = [plan.batch(0, g % plan.num_groups) for g in range(prof.reps + 1)]
    stored = []
    for g in groups:
        _, values, indices, argmax = teacher_predictions(teacher, g.images.to(device), min(TOPK, classes))
        stored.append(TeacherPredictions(values.float().cpu(), indices.cpu(), argmax.cpu()))
    t = {"teacher": [], "online": [], "cached": []}
    for r, (g, s) in enumerate(zip(groups, stored)):       # round 0 warms up every path
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher(g.images.to(device))
        sync(device)
        t1 = time.perf_counter()
        online.step([g], [None], lr=1e-4)
        sync(device)
        t2 = time.perf_counter()
        cached.step([g], [s], lr=1e-4)
        sync(device)
        t3 = time.perf_counter()
        if r:
            t["teacher"].append((t1 - t0) / batch)
            t["online"].append((t2 - t1) / batch)
            t["cached"].append((t3 - t2) / batch)
    med = {k: statistics.median(v) for k, v in t.items()}
    speedup, ideal = med["online"] / med["cached"], (med["teacher"] + med["cached"]) / med["cached"]
    return {"teacher": teacher_arch, "student": student_arch, "img_size": prof.img_size, "batch": batch,
            "precision": online.precision, "teacher_s_per_sample": med["teacher"],
            "online_s_per_sample": med["online"], "cached_s_per_sample": med["cached"],
            "speedup": speedup, "ideal_speedup": ideal, "efficiency": speedup / ideal,
            "spread": {k: [min(v), max(v)] for k, v in t.items()}}


def storage(tmp: Path, images: int) -> dict:
    """Bytes per sample of a real logits cache: `images` tiny images of 100 classes in groups of 128, one shard."""
    from g2sd_cache.specific.extract_logits import run_extract_logits
    from g2sd_cache.cache.logits import open_logits
    from g2sd_cache.specific.config import LogitsConfig

    data = generate_images(tmp / "storage-images", images, sides=(32, 48), classes=100)
    out = tmp / "storage-logits"
    with quiet():
        run_extract_logits(LogitsConfig(data=str(data), out=str(out), teacher="random:0",
                                        teacher_arch="test_vit_micro_patch16", img_size=32, group_size=GROUP,
                                        shard_groups=SHARD_GROUPS, cached_epochs=1, topk=TOPK, workers=0,
                                        device="cpu"))
    m = open_logits(out).manifest
    payload = TOPK * (2 + 2) + 2
    metadata = sum(size for s in m.shards for rel, size in s["files"].items() if "/c/" not in rel)
    # ImageNet: 10,009 groups of 128 per epoch, shards of 256 groups; per shard file 4 B crc per group, a 16 B index
    # entry per group and a 4 B index crc; metadata (zarr.json, shard.json) as measured here, per shard.
    groups = IMAGENET_IMAGES // GROUP
    shards = -(-groups // SHARD_GROUPS)
    imagenet = groups * GROUP * payload + 3 * (groups * 20 + shards * 4) + shards * metadata
    return {"topk": TOPK, "payload_bytes_per_sample": payload, "measured_bytes_per_sample": m.bytes_per_sample,
            "measured_samples": m.samples, "metadata_bytes_per_shard": metadata,
            "imagenet_bytes_per_sample": imagenet / (groups * GROUP), "imagenet_mb_per_epoch": imagenet / 1e6}


def extract_rate(tmp: Path, data: Path, prof: FinetuneProfile, device: torch.device) -> dict:
    """extract-logits end to end against the bare teacher forward on the same mixed groups."""
    from g2sd_cache.models.classifier import build_teacher
    from g2sd_cache.specific.extract_logits import run_extract_logits, teacher_predictions
    from g2sd_cache.specific.plan import open_plan
    from g2sd_cache.specific.config import LogitsConfig

    teacher_arch, batch = prof.pairs[0][0], prof.batch
    cfg = LogitsConfig(data=str(data), out=str(tmp / "extract-logits"), teacher="random:0", teacher_arch=teacher_arch,
                       img_size=prof.img_size, group_size=batch, cached_epochs=1, topk=TOPK, workers=prof.workers,
                       device=str(device))
    plan = open_plan(cfg.data, cfg.recipe(), cfg.seed)
    t0 = time.perf_counter()
    groups = [plan.batch(0, g) for g in range(plan.num_groups)]
    data_s = (time.perf_counter() - t0) / (len(groups) * batch)
    teacher = build_teacher("random:0", teacher_arch, plan.data.num_classes, prof.img_size)[0].to(device)
    teacher_predictions(teacher, groups[0].images.to(device), TOPK)    # warm-up
    sync(device)
    t0 = time.perf_counter()
    for g in groups:
        teacher_predictions(teacher, g.images.to(device), TOPK)
    sync(device)
    bare = len(groups) * batch / (time.perf_counter() - t0)
    with quiet():
        summary = run_extract_logits(cfg)
    return {"teacher": teacher_arch, "samples": summary["samples"], "extract_samples_per_s": summary["samples_per_s"],
            "teacher_only_samples_per_s": bare, "ratio": summary["samples_per_s"] / bare, "workers": prof.workers,
            "teacher_inside_extract_samples_per_s": summary["teacher_samples_per_s"],
            "data_s_per_sample": data_s}


def finetune_section(tmp: Path, prof: FinetuneProfile, device: torch.device,
                     parts: tuple[str, ...] = ("step", "storage", "extract")) -> dict:
    """The section's figures ({"config", "step", "storage", "extract"}: those of `parts`), working in `tmp`."""
    out: dict = {"config": dataclasses.asdict(prof)}
    if "step" in parts or "extract" in parts:   # 10 classes: enough for top-5 predictions
        log(f"finetune: {prof.extract_images} synthetic JPEGs of 10 classes")
        data = make_images(tmp / "finetune-images", max(prof.extract_images, prof.batch), classes=10)
    if "step" in parts:
        out["step"] = []
        for teacher, student in prof.pairs:
            log(f"finetune: step {teacher} -> {student}, batch {prof.batch}, {prof.reps} rounds")
            out["step"].append(step_times(teacher, student, prof, device, data))
    if "storage" in parts:
        log(f"finetune: storage, a logits cache of {prof.storage_images} samples")
        out["storage"] = storage(tmp, prof.storage_images)
    if "extract" in parts:
        log(f"finetune: extract-logits of {prof.extract_images} images against the bare teacher")
        out["extract"] = extract_rate(tmp, data, prof, device)
    return out


@section("finetune")
def run_section(bench: Bench) -> dict:
    return finetune_section(bench.ws["tmp"], finetune_profile(bench.device, bench.quick), bench.device)
