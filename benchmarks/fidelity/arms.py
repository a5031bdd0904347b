"""benchmarks/study.py's arms: which arms a study trains, one arm at one seed (extract its cache, train the
student with `g2sd-cache train`, evaluate it), the whole study, and the aggregation over seeds that makes the
--json's "arms"."""
from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from g2sd_cache.cache import codecs, lowrank
from g2sd_cache.common.dist import resolve_device
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import ExtractConfig, run_extract
from g2sd_cache.models.mae import TEACHER_PRESETS, MAETeacher, build_student, build_teacher
from g2sd_cache.training.metrics import METRICS
from g2sd_cache.generic.train import TrainConfig, train

from g2sd_cache.benchmarks.common import quiet, torch_threads
from g2sd_cache.benchmarks.fidelity.data import HeldOut, evaluate, prepare_data, render_heldout, trained_student
from g2sd_cache.benchmarks.fidelity.paired import paired_gap, reference_key
from g2sd_cache.benchmarks.fidelity.setup import BETA, DEFAULT_CODEC, Plan, StudyConfig, log, parse_arm


@dataclass(frozen=True)
class Arm:
    name: str           # "online", "cached-k4", "int8-k2"
    views: int | None   # K; None online
    codec: str | None   # None online
    pixels: str = "visible"   # how the cache stores the views' pixels (visible, jpeg)

    @property
    def online(self) -> bool:
        return self.views is None


def make_arms(ks: list[int], codec_k: int, codec_names: list[str], extra: tuple[str, ...] = (),
              width: int | None = None, say=log) -> list[Arm]:
    """online, cached-kK (default codec) for every K, then every codec at `codec_k`, then the `extra` arms
    (CODEC:PIXELS:K, named CODEC-PIXELS-kK), then the fp16 reference every cached arm is judged against
    (fidelity/paired.py) where the study does not train it already. An arm already in the list (the default
    codec at `codec_k` is cached-k{codec_k} itself when that K is in `ks`) is trained once; a pcaR arm with
    R >= `width` (the teacher's target width) is skipped: its codes are no smaller than the targets. Each skip
    and addition is said in one line."""
    arms = [Arm("online", None, None)] + [Arm(f"cached-k{k}", k, DEFAULT_CODEC) for k in ks]
    have = {(a.codec, a.pixels, a.views): a for a in arms if not a.online}
    wanted = [(f"{name}-k{codec_k}", name, "visible", codec_k, f"--codecs {name}") for name in codec_names]
    for spec in extra:
        codec, pixels, k = parse_arm(spec)
        wanted.append((f"{codec}-{pixels}-k{k}", codec, pixels, k, f"--arms {spec}"))
    for name, codec, pixels, k, flag in wanted:
        rank = lowrank.parse_rank(codec)
        if width is not None and rank is not None and rank >= width:
            say(f"skipping {flag}: rank {rank} is not below the teacher's target width {width}, so its codes "
                f"are no smaller than the targets")
            continue
        if width is not None and not codecs.get_codec(codec).fits(width):
            say(f"skipping {flag}: it keeps {codecs.get_codec(codec).rank} coefficients per token and the teacher's "
                f"targets are {width} wide")
            continue
        if (codec, pixels, k) in have:
            if flag.startswith("--arms"):
                say(f"{flag} is {have[codec, pixels, k].name}, already in the study: trained once")
            continue
        have[codec, pixels, k] = Arm(name, k, codec, pixels)
        arms.append(have[codec, pixels, k])
    for arm in arms:           # grows while it runs: a reference's own reference (fp16:jpeg -> fp16:visible) too
        key = reference_key(arm.codec, arm.pixels, arm.views)
        if key is not None and key not in have:
            codec, pixels, k = key
            have[key] = Arm(f"cached-k{k}" if pixels == "visible" else f"{codec}-{pixels}-k{k}", k, codec, pixels)
            arms.append(have[key])
            say(f"adding {have[key].name}: the reference {arm.name} is judged against (fp16, same K and pixels)")
    return arms


# The arrays that describe a view (the same bytes whatever the codec); every other array holds the codec's codes
# and scales, whatever a codec calls them.
VIEW_ARRAYS = ("pixels", "jpeg", "mask", "crop", "flip", "source_index", "key")
PIXEL_ARRAYS = ("pixels", "jpeg")


def target_bytes_per_view(cache: Path, pixels: bool = False) -> float:
    """Bytes per view of the stored targets (the codec's codes and scales, zarr metadata left out) on disk, or
    with `pixels` of the stored pixels (exact patches or JPEGs)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    total = sum(size for shard in manifest["shards"] for rel, size in shard["files"].items()
                if "/" in rel and not rel.endswith("zarr.json") and (
                    rel.split("/")[0] in PIXEL_ARRAYS if pixels else rel.split("/")[0] not in VIEW_ARRAYS))
    return total / manifest["views"]


def total_bytes_per_view(cache: Path) -> float:
    """Bytes per view of every file of the cache (targets, pixels, masks, crops, keys, metadata)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    return sum(sum(shard["files"].values()) for shard in manifest["shards"]) / manifest["views"]


def run_arm(arm: Arm, seed: int, cfg: StudyConfig, plan: Plan, teacher: MAETeacher, heldout: HeldOut,
            device: torch.device) -> dict:
    """Extract the arm's cache (cached arms), train the student with `train`, evaluate it on the held-out views.
    Returns {"train_loss", "heldout_loss", "heldout_cosine", "bytes_per_view" (None online), "train_s", "extract_s"}."""
    tag = f"{arm.name}-seed{seed}"
    log_file = plan.work / "logs" / f"{tag}.log"       # the product's console output, kept
    run, cache = plan.work / "runs" / tag, plan.work / "caches" / tag
    g = cfg.geometry
    common = dict(out=str(run), student=cfg.student, steps=plan.steps, warmup_steps=plan.warmup_steps,
                  batch_size=cfg.batch_size, blr=cfg.blr, seed=seed, workers=cfg.workers, device=cfg.device,
                  log_every=plan.steps_per_epoch, save_every=plan.steps, on_error="fail", beta=BETA)
    result: dict = {"bytes_per_view": None, "extract_s": 0.0}
    try:
        if arm.online:
            train_cfg = TrainConfig(data=str(plan.train_dir), teacher=cfg.teacher, arch=cfg.arch, img_size=g.img_size,
                                    mask_ratio=g.mask_ratio, target_layer=cfg.target_layer, **common)
        else:
            with quiet(log_file):
                ex = run_extract(ExtractConfig(
                    data=str(plan.train_dir), out=str(cache), teacher=cfg.teacher, arch=cfg.arch, views=arm.views,
                    seed=seed, target_layer=cfg.target_layer, mask_ratio=g.mask_ratio, img_size=g.img_size,
                    codec=arm.codec, pixels=arm.pixels, pixel_quality=cfg.pixel_quality,
                    chunk_views=cfg.profile.chunk_views, batch_size=cfg.batch_size,
                    workers=cfg.workers, device=cfg.device, on_error="fail"))
            if ex["cache_images"] != plan.train_images:
                raise UserError(f"the cache holds {ex['cache_images']} of {plan.train_images} training images")
            result.update(bytes_per_view=target_bytes_per_view(cache), extract_s=ex["seconds"],
                          pixel_bytes_per_view=target_bytes_per_view(cache, pixels=True),
                          total_bytes_per_view=total_bytes_per_view(cache))
            train_cfg = TrainConfig(cache=str(cache), **common)
        with quiet(log_file):
            summary = train(train_cfg)
    except UserError as e:
        raise UserError(f"{tag}: {e} (its output: {log_file})") from e
    if summary["stopped_early"] or summary["steps"] != plan.steps:
        raise UserError(f"{tag}: training stopped at step {summary['steps']} of {plan.steps} (interrupted?); "
                        f"nothing was measured for it")
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    result["train_loss"] = records[-1]["loss"]       # the mean over the last epoch (log_every = one epoch)
    result["train_s"] = summary["seconds"]
    result["heldout_loss"], result["heldout_cosine"] = evaluate(
        trained_student(run, device), teacher, heldout, cfg.target_layer, cfg.batch_size, device)
    if not cfg.keep:          # both were made by this study in its own work folder; the logs stay
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
    return result


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def summarise(arms: list[Arm], per_seed: dict[str, list[dict]], teacher: str = "") -> list[dict]:
    """The JSON's "arms": each arm's metrics over seeds, its gap to online and its gap to its fp16 reference
    (`reference`, `gap_to_reference`: fidelity/paired.py; None where an arm has none), paired seed by seed."""
    online = per_seed["online"]
    online_mean = statistics.fmean(o["heldout_loss"] for o in online)
    by_key = {(a.codec, a.pixels, a.views): a.name for a in arms if not a.online}
    rows = []
    for arm in arms:
        res = per_seed[arm.name]
        ref = by_key.get(reference_key(arm.codec, arm.pixels, arm.views))
        rows.append({
            "name": arm.name, "views": arm.views, "codec": arm.codec, "pixels": None if arm.online else arm.pixels,
            "teacher": teacher, "bytes_per_view": res[0]["bytes_per_view"],
            "pixel_bytes_per_view": res[0].get("pixel_bytes_per_view"),
            "total_bytes_per_view": res[0].get("total_bytes_per_view"),
            "heldout_loss": mean_std([r["heldout_loss"] for r in res]),
            "heldout_loss_per_seed": [r["heldout_loss"] for r in res],   # arms pair with each other seed by seed too
            "heldout_cosine": mean_std([r["heldout_cosine"] for r in res]),
            "train_loss": mean_std([r["train_loss"] for r in res]),
            "gap_to_online": mean_std([r["heldout_loss"] - o["heldout_loss"] for r, o in zip(res, online)]),
            # the standard error of the mean gap: how well the seeds pin it down (std / sqrt(seeds))
            "gap_sem": (statistics.stdev([r["heldout_loss"] - o["heldout_loss"] for r, o in zip(res, online)])
                        / len(res) ** 0.5) if len(res) > 1 else None,
            "reference": ref,
            "gap_to_reference": None if ref is None else paired_gap(
                [r["heldout_loss"] for r in res], [r["heldout_loss"] for r in per_seed[ref]], online_mean),
        })
    return rows


def run_study(cfg: StudyConfig) -> dict:
    """Every arm at every seed; returns the report ({"arms": [...], "config": {...}}, the --json schema)."""
    t_start = time.perf_counter()
    cfg.validate()
    device = resolve_device(cfg.device)
    with torch_threads(cfg.threads if device.type == "cpu" else None):
        return _run_study(cfg, device, t_start)


def _run_study(cfg: StudyConfig, device: torch.device, t_start: float) -> dict:
    arms = make_arms(list(cfg.views), cfg.codec_views, list(cfg.codecs), cfg.arms,
                     width=TEACHER_PRESETS[cfg.arch].decoder_embed_dim)
    seeds = list(range(cfg.seeds))
    if max(cfg.views + (cfg.codec_views,)) > cfg.epochs:
        log(f"note: K = {max(cfg.views + (cfg.codec_views,))} is more than the {cfg.epochs} epochs: some cached views "
            f"are never used, and that arm trains on the same views as online")

    teacher, info = build_teacher(cfg.teacher, cfg.arch, cfg.img_size)   # a wrong checkpoint fails before any work
    teacher.to(device)
    with _work_folder(cfg.workdir) as work:
        plan = prepare_data(cfg, work)
        heldout = render_heldout(plan.heldout_dir, cfg.geometry, cfg.eval_views)
        log(f"{cfg.profile.name} profile on {device}: {cfg.arch} ({info.source}) -> {cfg.student}, {plan.train_images} "
            f"training images, {len(heldout)} held-out views; {len(arms)} arms x {len(seeds)} seeds, {plan.steps} "
            f"steps of {cfg.batch_size} each")
        untrained = [evaluate(build_student(cfg.student, teacher.shape.decoder_embed_dim, cfg.img_size, seed=seed)
                              .to(device), teacher, heldout, cfg.target_layer, cfg.batch_size, device)
                     for seed in seeds]
        per_seed: dict[str, list[dict]] = {arm.name: [] for arm in arms}
        for seed in seeds:
            for arm in arms:
                t0 = time.perf_counter()
                r = run_arm(arm, seed, cfg, plan, teacher, heldout, device)
                per_seed[arm.name].append(r)
                log(f"seed {seed} {arm.name:>10}: held-out loss {r['heldout_loss']:.5f}, cosine "
                    f"{r['heldout_cosine']:.4f}, train loss {r['train_loss']:.5f} ({time.perf_counter() - t0:.0f} s)")

    return {"arms": summarise(arms, per_seed, cfg.teacher), "config": {
        "profile": cfg.profile.name, "teacher": info.source, "arch": cfg.arch, "student": cfg.student,
        "data": cfg.data or "synthetic", "train_images": plan.train_images, "heldout_images": len(heldout) // cfg.eval_views,
        "eval_views_per_image": cfg.eval_views, "img_size": cfg.img_size, "mask_ratio": cfg.geometry.mask_ratio,
        "target_layer": cfg.target_layer, "beta": BETA, "epochs": cfg.epochs, "steps": plan.steps,
        "batch_size": cfg.batch_size, "blr": cfg.blr, "warmup_steps": plan.warmup_steps, "seeds": seeds,
        "views": list(cfg.views), "codec_views": cfg.codec_views, "codecs": list(cfg.codecs),
        "extra_arms": list(cfg.arms), "pixel_quality": cfg.pixel_quality,
        "default_codec": DEFAULT_CODEC, "device": str(device), "threads": torch.get_num_threads(),
        "untrained_student": {"heldout_loss": mean_std([u[0] for u in untrained]),
                              "heldout_cosine": mean_std([u[1] for u in untrained])},
        "seconds_per_arm": {name: statistics.fmean(r["train_s"] + r["extract_s"] for r in res)
                            for name, res in per_seed.items()},
        "runtime_s": time.perf_counter() - t_start, "torch": torch.__version__,
    }}


@contextlib.contextmanager
def _work_folder(path: str | None):
    """--workdir (new or empty; kept), else a temporary folder removed at the end."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix="g2sd-study-") as tmp:
            yield Path(tmp)
        return
    work = Path(path)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise UserError(f"--workdir {path} exists and is not an empty folder; give a new or empty one")
    work.mkdir(parents=True, exist_ok=True)
    yield work
