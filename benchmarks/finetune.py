"""Stage 2 (specific distillation): what the logits cache saves, measured side by side in one run.

    python benchmarks/finetune.py [--quick] [--device cpu|cuda] [--batch 16] [--reps 3] [--threads N] [--json OUT.json]

1. Step: one optimizer step of the student per sample, online (the fine-tuned teacher's fp32 forward on the
   mixed batch, then the student's step) against cached (the student's step on stored argmax labels), same
   student, same mixed groups, the two modes interleaved rep by rep so both see the same machine load. Also the
   teacher's forward alone, and the ideal speedup (t_teacher + t_student) / t_student. Data loading is left
   out: both modes decode and augment the same images.
2. Storage: bytes per sample per cached epoch of a real logits cache (k = 5), and the projection for ImageNet-1k
   (1,281,167 images, groups of 128, 256 groups per shard).
3. Extract: `run_extract_logits` samples/s end to end (decoding, augmenting and mixing in a worker) against the
   bare teacher forward on the same mixed groups.

Default pairs: ViT-B -> ViT-S and ViT-B -> ViT-T at 224 px (G2SD's); --quick uses micro models at 64 px
(seconds, for a smoke test: its ratios mean nothing). The student runs under bf16 autocast on CUDA (fp32 on CPU),
the teacher in fp32, as `finetune` does.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from g2sd_cache.classifier import build_teacher
from g2sd_cache.dist import DistEnv, resolve_device
from g2sd_cache.extract_logits import open_plan, run_extract_logits, teacher_predictions
from g2sd_cache.logits_cache import TeacherPredictions, open_logits
from g2sd_cache.sd_config import FinetuneConfig, LogitsConfig
from g2sd_cache.sd_trainer import FineTuner
from g2sd_cache.synthetic import make_image_folder

IMAGENET_IMAGES = 1_281_167


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(teacher_arch: str, student_arch: str, img: int, batch: int, reps: int, device: torch.device,
               data: Path) -> dict:
    """Seconds per sample of: the teacher forward, an online step, a cached step (medians over `reps`)."""
    cfg = FinetuneConfig(data=str(data), out="-", init="-", arch=student_arch, teacher_arch=teacher_arch, img_size=img,
                         group_size=batch, teacher="random:0")
    plan = open_plan(cfg.data, cfg.recipe(), cfg.seed)
    classes = plan.data.num_classes
    teacher = build_teacher("random:0", teacher_arch, classes, img)[0].to(device)
    env = DistEnv(0, 1, 0, device)
    online = FineTuner(cfg, classes, teacher, env, load_init=False)
    cached = FineTuner(cfg, classes, None, env, load_init=False)
    groups = [plan.batch(0, g % plan.num_groups) for g in range(reps + 1)]
    stored = []
    for g in groups:
        _, values, indices, argmax = teacher_predictions(teacher, g.images.to(device), min(5, classes))
        stored.append(TeacherPredictions(values.float().cpu(), indices.cpu(), argmax.cpu()))
    t = {"teacher": [], "online": [], "cached": []}
    for r, (g, s) in enumerate(zip(groups, stored)):       # rep 0 warms up every path
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher(g.images.to(device))
        _sync(device)
        t1 = time.perf_counter()
        online.step([g], [None], lr=1e-4)
        _sync(device)
        t2 = time.perf_counter()
        cached.step([g], [s], lr=1e-4)
        _sync(device)
        t3 = time.perf_counter()
        if r:
            t["teacher"].append((t1 - t0) / batch)
            t["online"].append((t2 - t1) / batch)
            t["cached"].append((t3 - t2) / batch)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"teacher": teacher_arch, "student": student_arch, "img_size": img, "batch": batch,
            "precision": online.precision, "teacher_s_per_sample": med["teacher"],
            "online_s_per_sample": med["online"], "cached_s_per_sample": med["cached"],
            "speedup": med["online"] / med["cached"], "ideal_speedup": (med["teacher"] + med["cached"]) / med["cached"],
            "spread": {k: [min(v), max(v)] for k, v in t.items()}}


def storage(tmp: Path, topk: int = 5) -> dict:
    """Bytes per sample of a real logits cache: 1024 tiny images, 100 classes, one shard of 8 groups of 128."""
    data = make_image_folder(tmp / "storage-images", 1024, seed=3, classes=100, vary_size=False)
    out = tmp / "storage-logits"
    run_extract_logits(LogitsConfig(data=str(data), out=str(out), teacher="random:0", teacher_arch="test_vit_micro_patch16",
                                    img_size=32, group_size=128, shard_groups=256, cached_epochs=1, topk=topk,
                                    workers=0, device="cpu"))
    m = open_logits(out).manifest
    payload = topk * (2 + 2) + 2
    metadata = sum(size for s in m.shards for rel, size in s["files"].items() if "/c/" not in rel)
    # ImageNet: 10,009 groups of 128 per epoch, shards of 256 groups; per shard file 4 B crc per group, a 16 B index
    # entry per group and a 4 B index crc; metadata (zarr.json, shard.json) as measured here, per shard.
    groups, per_shard = IMAGENET_IMAGES // 128, 256
    shards = -(-groups // per_shard)
    imagenet = groups * 128 * payload + 3 * (groups * 20 + shards * 4) + shards * metadata
    return {"topk": topk, "payload_bytes_per_sample": payload, "measured_bytes_per_sample": m.bytes_per_sample,
            "measured_samples": m.samples, "metadata_bytes_per_shard": metadata,
            "imagenet_bytes_per_sample": imagenet / (groups * 128), "imagenet_mb_per_epoch": imagenet / 1e6}


def extract_rate(tmp: Path, teacher_arch: str, img: int, batch: int, images: int, device: torch.device,
                 workers: int) -> dict:
    """extract-logits end to end against the bare teacher forward on the same mixed groups."""
    data = make_image_folder(tmp / "extract-images", images, seed=5, classes=10)
    cfg = LogitsConfig(data=str(data), out=str(tmp / "extract-logits"), teacher="random:0", teacher_arch=teacher_arch,
                       img_size=img, group_size=batch, cached_epochs=1, topk=5, workers=workers, device=str(device))
    plan = open_plan(cfg.data, cfg.recipe(), cfg.seed)
    t0 = time.perf_counter()
    groups = [plan.batch(0, g) for g in range(plan.num_groups)]
    data_s = (time.perf_counter() - t0) / (len(groups) * batch)
    teacher = build_teacher("random:0", teacher_arch, plan.data.num_classes, img)[0].to(device)
    teacher_predictions(teacher, groups[0].images.to(device), 5)    # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for g in groups:
        teacher_predictions(teacher, g.images.to(device), 5)
    _sync(device)
    bare = len(groups) * batch / (time.perf_counter() - t0)
    summary = run_extract_logits(cfg)
    return {"teacher": teacher_arch, "samples": summary["samples"], "extract_samples_per_s": summary["samples_per_s"],
            "teacher_only_samples_per_s": bare, "ratio": summary["samples_per_s"] / bare, "workers": workers,
            "teacher_inside_extract_samples_per_s": summary["teacher_samples_per_s"],
            "data_s_per_sample": data_s}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu_model": cpu, "usable_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "load_average_1min": os.getloadavg()[0], "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="micro models at 64 px: a smoke test in seconds")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default 16 on CPU, 128 on CUDA)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per mode, after one warm-up (default 3)")
    p.add_argument("--extract-images", type=int, default=None, help="images for the extract measurement "
                   "(default 64 on CPU, 4096 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's); 1 keeps a "
                   "shared CPU machine's timings steady")
    p.add_argument("--sections", default="step,storage,extract", help="comma-separated subset of step, storage, "
                   "extract (default all)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 16)
    if args.quick:
        pairs, img = [("test_vit_micro_patch16", "test_vit_micro_patch16")], 64
    else:
        pairs, img = [("vit_base_patch16", "vit_small_patch16"), ("vit_base_patch16", "vit_tiny_patch16")], 224
    n_extract = args.extract_images or (4 * batch if args.quick else (4096 if device.type == "cuda" else 128))
    report = {"machine": machine(), "device": str(device)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = make_image_folder(tmp / "step-images", batch * 2, seed=1, classes=10)
        if "step" in sections:
            report["step"] = [step_times(t, s, img, batch, args.reps, device, data) for t, s in pairs]
        if "storage" in sections:
            report["storage"] = storage(tmp)
        if "extract" in sections:
            report["extract"] = extract_rate(tmp, pairs[0][0], img, batch, n_extract, device,
                                             workers=min(8, max(1, len(os.sched_getaffinity(0)) - 1)))
    report["machine"]["load_average_1min_after"] = os.getloadavg()[0]
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def print_report(r: dict) -> None:
    m = r["machine"]
    print(f"# Stage 2: specific distillation, online vs cached logits ({r['device']}; {m['cpu_model']}, "
          f"{m['usable_cores']} cores, load {m['load_average_1min']:.1f} -> {m['load_average_1min_after']:.1f}, "
          f"torch {m['torch']})\n")
    if "step" in r:
        print_step(r)
    if "storage" in r:
        print_storage(r)
    if "extract" in r:
        print_extract(r)


def print_step(r: dict) -> None:
    print("## 1. Step (ms per sample; medians, the modes interleaved)\n")
    print("| teacher -> student | batch | teacher fwd | online step | cached step | speedup | ideal (t_t + t_s) / t_s | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    for s in r["step"]:
        print(f"| {s['teacher']} -> {s['student']} | {s['batch']} | {1e3 * s['teacher_s_per_sample']:.1f} | "
              f"{1e3 * s['online_s_per_sample']:.1f} | {1e3 * s['cached_s_per_sample']:.1f} | {s['speedup']:.2f}x | "
              f"{s['ideal_speedup']:.2f}x | {s['speedup'] / s['ideal_speedup']:.2f} |")


def print_storage(r: dict) -> None:
    st = r["storage"]
    print(f"\n## 2. Storage (top-{st['topk']} fp16 logits + uint16 classes + uint16 argmax)\n")
    print(f"- payload {st['payload_bytes_per_sample']} B per sample per cached epoch; measured on disk "
          f"{st['measured_bytes_per_sample']:.2f} B ({st['measured_samples']} samples in one shard, zarr metadata "
          f"{st['metadata_bytes_per_shard']} B per shard)")
    print(f"- ImageNet-1k: {st['imagenet_bytes_per_sample']:.2f} B per sample, {st['imagenet_mb_per_epoch']:.1f} MB "
          f"per cached epoch")


def print_extract(r: dict) -> None:
    e = r["extract"]
    print(f"\n## 3. Extract ({e['teacher']}, {e['samples']} samples, {e['workers']} worker(s))\n")
    print(f"- extract-logits {e['extract_samples_per_s']:.2f} samples/s end to end vs the bare teacher forward "
          f"{e['teacher_only_samples_per_s']:.2f} samples/s: {e['ratio']:.2f}x (worker start-up included)")
    print(f"- inside extract the teacher ran at {e['teacher_inside_extract_samples_per_s']:.2f} samples/s; decoding, "
          f"augmenting and mixing cost {1e3 * e['data_s_per_sample']:.1f} ms per sample on one core (in the workers)")


if __name__ == "__main__":
    sys.exit(main())
