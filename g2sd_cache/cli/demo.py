"""`g2sd-cache demo`: both stages of G2SD on generated images, no downloads, a few minutes on a laptop CPU.

Stage 1 (generic distillation):
1. generate JPEG images of ImageNet-like size, in class folders;
2. build a seeded random MAE teacher and extract a cache with 2 views per image;
3. train the student from the cache (no teacher) for a few dozen steps;
4. run the same number of online G2SD steps (teacher in the loop) — the baseline.
Stage 2 (specific distillation), starting from the student of step 3:
5. extract-logits: a seeded random fine-tuned teacher over 2 epochs of G2SD's mixed batches;
6. finetune from the cached logits (no teacher forward), validating after every epoch;
7. its first epoch again online (teacher in the loop): the same losses, at the teacher's cost;
8. export the best weights to timm's distilled ViT and evaluate the export.
Then print what the caches cost and what they save.

Presets: `small` (default; ViT-B teachers, ViT-S students at 224 px, as the paper) and `micro` (tiny models at
64 px: the same steps in seconds, for a quick look and the tests). The generated classes carry no visual signal
and the teachers are random, so accuracy stays at chance: the demo shows the mechanics and the cost.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from g2sd_cache.cli.command import Command
from g2sd_cache.common.config import config_from_args, set_dataclass_defaults
from g2sd_cache.generic.extract import ExtractConfig, run_extract
from g2sd_cache.cache.inspect import inspect_report
from g2sd_cache.cache.ownership import claim_demo_folder
from g2sd_cache.data.synthetic import make_image_folder
from g2sd_cache.generic.train import TrainConfig, train


@dataclass(frozen=True)
class Preset:
    """The models and resolution of each stage."""

    mae_teacher: str
    student: str
    img_size: int
    classifier: str          # the stage-2 student (the stage-1 student's encoder as a classifier)
    classifier_teacher: str  # the stage-2 teacher
    group_size: int


PRESETS = {
    "small": Preset("mae_vit_base_patch16", "mae_vit_small_patch16_dec256d4b", 224, "vit_small_patch16",
                    "vit_base_patch16", 8),
    "micro": Preset("test_mae_micro_patch16", "test_vit_micro_patch16_dec32d1b", 64, "test_vit_micro_patch16",
                    "test_vit_micro_patch16", 8),
}


# What the demo writes into --out (top-level names): a rerun replaces these and nothing else.
DEMO_OUTPUTS = ("images", "cache", "run-cached", "run-online", "val", "logits", "sd-cached", "sd-online",
                "student-timm.pth", ".student-timm.pth.g2sd-export")


@dataclass(frozen=True)
class DemoConfig:
    out: str = "g2sd-demo"
    images: int = 48
    steps: int = 24
    batch_size: int = 16
    workers: int = 1
    device: str = "auto"
    preset: str = "small"
    stage2_epochs: int = 2
    classes: int = 4


def run_demo(cfg: DemoConfig) -> dict:
    if cfg.preset not in PRESETS:
        from g2sd_cache.common.errors import UserError
        raise UserError(f"--preset {cfg.preset}: choose one of {', '.join(PRESETS)}")
    preset = PRESETS[cfg.preset]
    out = Path(cfg.out)
    kept = claim_demo_folder(out, DEMO_OUTPUTS)   # an earlier demo's outputs are replaced; anything else is refused
    if kept:
        print(f"note: {out} also holds {', '.join(kept)}, which the demo did not write: left as they are")
    images = out / "images"
    print(f"[1/8] writing {cfg.images} synthetic JPEGs (320-640 px) in {cfg.classes} class folders to {images}")
    make_image_folder(images, cfg.images, seed=0, classes=cfg.classes)

    print(f"[2/8] extracting a cache: random {preset.mae_teacher} teacher, 2 views per image, fp16 targets")
    ex = run_extract(ExtractConfig(data=str(images), out=str(out / "cache"), teacher="random",
                                   arch=preset.mae_teacher, views=2, batch_size=cfg.batch_size, img_size=preset.img_size,
                                   workers=cfg.workers, device=cfg.device, shard_size=32, chunk_views=16))
    report = inspect_report(str(out / "cache"), sample_views=16)

    common = dict(data=str(images), student=preset.student, steps=cfg.steps,
                  batch_size=cfg.batch_size, blr=1.5e-3, warmup_epochs=1.0, workers=cfg.workers,
                  device=cfg.device, log_every=max(1, cfg.steps // 6), save_every=cfg.steps, seed=0)
    print(f"[3/8] training the student from the cache for {cfg.steps} steps (no teacher forward)")
    cached = train(TrainConfig(out=str(out / "run-cached"), cache=str(out / "cache"), **common))
    print(f"[4/8] the same {cfg.steps} steps online: the teacher runs every step (G2SD's original recipe)")
    online = train(TrainConfig(out=str(out / "run-online"), teacher="random", arch=preset.mae_teacher,
                               img_size=preset.img_size, **common))

    losses = [json.loads(line)["loss"] for line in (out / "run-cached" / "metrics.jsonl").read_text().splitlines()]
    ratio = cached["samples_per_s"] / online["samples_per_s"] if online["samples_per_s"] else float("nan")
    summary = {
        "views_cached": report["views"], "bytes_per_view": report["bytes_per_view"],
        "extract_views_per_s": ex["views_per_s"], "loss_first": losses[0], "loss_last": losses[-1],
        "cached_samples_per_s": cached["samples_per_s"], "online_samples_per_s": online["samples_per_s"],
        "speedup": ratio,
    }
    stage2 = _stage2(cfg, preset, out, images)
    summary["stage2"] = stage2

    print("\n=== g2sd-cache demo: stage 1, generic distillation ===")
    print(f"views cached       {summary['views_cached']} ({cfg.images} images x 2 views), "
          f"{summary['bytes_per_view'] / 1024:.0f} KiB per view on disk, extract {ex['views_per_s']:.1f} views/s")
    print(f"student loss       {' -> '.join(f'{x:.4f}' for x in losses)} (cached training, logged every "
          f"{common['log_every']} steps)")
    print(f"cached training    {cached['samples_per_s']:.1f} samples/s (student only)")
    print(f"online training    {online['samples_per_s']:.1f} samples/s (teacher forward every step)")
    print(f"speedup            {ratio:.2f}x from the cache on this machine")
    s2 = stage2
    print("=== stage 2, specific distillation ===")
    print(f"logits cached      {s2['samples_cached']} samples ({s2['cached_epochs']} epochs of mixed batches), "
          f"{s2['bytes_per_sample']:.0f} B per sample on disk ({4 * s2['topk'] + 2} B of predictions at top-{s2['topk']} "
          f"+ zarr metadata, which large caches amortise), extract {s2['extract_samples_per_s']:.1f} samples/s")
    print(f"validation top-1   {' -> '.join(f'{x:.1f}%' for x in s2['val_top1'])} by epoch ({cfg.classes} classes: "
          f"chance is {100 / cfg.classes:.0f}%; generated classes carry no signal); exported to timm: "
          f"{s2['export_top1']:.1f}%")
    print(f"cached fine-tuning {s2['cached_samples_per_s']:.1f} samples/s (no teacher forward)")
    print(f"online fine-tuning {s2['online_samples_per_s']:.1f} samples/s (teacher forward every step); its "
          f"{s2['online_steps']} losses {'equal' if s2['online_losses_equal'] else 'DIFFER from'} the cached run's")
    print(f"speedup            {s2['speedup']:.2f}x from the logits cache on this machine (runs one after the other: "
          f"a shared machine's load moves it; benchmarks/finetune.py interleaves them)" +
          ("; micro models: decoding and augmenting images dominates both" if cfg.preset == "micro" else ""))
    print(f"outputs            {out}/ (cache/, run-cached/, run-online/, logits/, sd-cached/, sd-online/, "
          f"student-timm.pth); `g2sd-cache inspect {out / 'cache'}` and `g2sd-cache verify {out / 'logits'}` check "
          f"the caches")
    return summary


def _stage2(cfg: DemoConfig, preset: Preset, out: Path, images: Path) -> dict:
    from g2sd_cache.specific.evaluate import evaluate
    from g2sd_cache.cli.export import export_run, export_summary
    from g2sd_cache.specific.extract_logits import run_extract_logits
    from g2sd_cache.specific.finetune import finetune
    from g2sd_cache.specific.finetuned import read_finetuned
    from g2sd_cache.specific.config import FinetuneConfig, LogitsConfig

    val = out / "val"
    make_image_folder(val, max(cfg.classes, cfg.images // 3), seed=1, classes=cfg.classes)
    plan = dict(data=str(images), img_size=preset.img_size, group_size=preset.group_size, seed=0)
    teacher = dict(teacher="random:0", teacher_arch=preset.classifier_teacher)
    k = cfg.stage2_epochs
    print(f"[5/8] extract-logits: random fine-tuned {preset.classifier_teacher} teacher over the mixed batches of "
          f"{k} epochs (RandAugment, random erasing, mixup/cutmix in groups of {preset.group_size})")
    ex = run_extract_logits(LogitsConfig(out=str(out / "logits"), cached_epochs=k, topk=min(5, cfg.classes),
                                         workers=cfg.workers, device=cfg.device, **plan, **teacher))
    common = dict(init=str(out / "run-cached"), arch=preset.classifier, epochs=k, val=str(val), workers=cfg.workers,
                  device=cfg.device, log_every=2, warmup_epochs=0.5, eval_batch_size=16, **plan)
    print(f"[6/8] fine-tuning the stage-1 student from the cached logits for {k} epochs (no teacher forward), "
          f"validating after each")
    cached = finetune(FinetuneConfig(out=str(out / "sd-cached"), logits=str(out / "logits"), **common))
    steps = cfg.images // preset.group_size     # one epoch: enough to compare speed and losses
    print("[7/8] the first epoch again, online: the teacher runs on every mixed batch (G2SD's recipe)")
    online = finetune(FinetuneConfig(out=str(out / "sd-online"), eval_every=0, stop_after=steps, **common, **teacher))
    print("[8/8] exporting the best weights to timm and evaluating the export")
    exported = export_run(str(out / "sd-cached"), str(out / "student-timm.pth"))
    print(export_summary(exported))
    import timm
    import torch

    from g2sd_cache.models.classifier import timm_distilled_model
    model = (timm.create_model(exported["timm_model"], pretrained=False, num_classes=cfg.classes)
             if exported["timm_model"] else timm_distilled_model(preset.classifier, cfg.classes, preset.img_size))
    model.load_state_dict(torch.load(out / "student-timm.pth", weights_only=True), strict=True)
    classes = read_finetuned(out / "sd-cached", "demo", prefer_best=True).classes
    export_top1 = evaluate(model, str(val), classes=classes, batch_size=16)["top1"]

    records = [json.loads(line) for line in (out / "sd-cached" / "metrics.jsonl").read_text().splitlines()]
    online_records = [json.loads(line) for line in (out / "sd-online" / "metrics.jsonl").read_text().splitlines()]
    same = [r["loss"] for r in online_records] == [r["loss"] for r in records if "loss" in r][:len(online_records)]
    speed = {}
    for name in ("sd-cached", "sd-online"):   # steady-state intervals: the first includes worker start-up
        rates = [json.loads(line)["samples_per_s"] for line in (out / name / "metrics.jsonl").read_text().splitlines()
                 if "samples_per_s" in line]
        speed[name] = sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[0]
    return {"samples_cached": ex.get("cache_samples", 0), "cached_epochs": k, "topk": min(5, cfg.classes),
            "bytes_per_sample": ex.get("bytes_per_sample", float("nan")),
            "extract_samples_per_s": ex["samples_per_s"],
            "val_top1": [r["val_top1"] for r in records if "val_top1" in r], "export_top1": export_top1,
            "cached_samples_per_s": speed["sd-cached"], "online_samples_per_s": speed["sd-online"],
            "speedup": speed["sd-cached"] / speed["sd-online"], "final_loss": cached["final_loss"],
            "online_steps": online["steps"], "online_losses_equal": same}


def add(sub):
    p = sub.add_parser("demo", help="run both stages on generated images (no downloads, a few minutes on CPU)",
                       description="Stage 1: generate JPEGs in class folders, extract a cache with a seeded random "
                                   "ViT-B teacher (2 views per image), train the small student from it, run the same "
                                   "steps online, and print views cached, bytes per view, the loss and cached vs "
                                   "online samples/s. Stage 2: extract a random fine-tuned teacher's predictions on 2 "
                                   "epochs of mixed batches, fine-tune the stage-1 student from them (validating each "
                                   "epoch) and online, export the result to timm and evaluate it.")
    p.add_argument("--out", help="folder for the demo's images, caches and runs (replaced; default %(default)s)")
    p.add_argument("--images", type=int, help="synthetic training images (default %(default)s)")
    p.add_argument("--steps", type=int, help="stage-1 training steps in each mode (default %(default)s)")
    p.add_argument("--batch-size", type=int, help="stage-1 views per step (default %(default)s)")
    p.add_argument("--stage2-epochs", type=int, help="stage-2 epochs in each mode, and epochs of teacher "
                   "predictions cached (default %(default)s)")
    p.add_argument("--preset", choices=list(PRESETS), help="small: ViT-B teachers, ViT-S "
                   "students at 224 px (default %(default)s); micro: tiny models at 64 px, the same steps in seconds")
    p.add_argument("--workers", type=int, help="DataLoader processes (default %(default)s)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--config", help="YAML file of these options (names with underscores); flags override it")
    set_dataclass_defaults(p, DemoConfig)
    return p


def run(args) -> int:
    run_demo(config_from_args(DemoConfig, args))
    return 0


COMMAND = Command("demo", add, run, config=DemoConfig)
