"""`g2sd-cache train`: G2SD generic distillation, from the cache or with the teacher in the loop.

Three modes, one code path; they differ only in where a micro-batch's target comes from:
- cached  (--cache):            the stored codes, straight into the loss kernel — no teacher at all;
- online  (--teacher):          a fresh view per image and epoch, the teacher runs every step (the paper);
- replay  (--cache --teacher):  the cached views through the live teacher, which trains the student,
                                while the trainer logs how far the cached targets are from the live ones.

Read top to bottom: set-up (`_setup`), then `train`, one optimizer step per `accum_iter` micro-batches.
The data position (epoch, micro-batch) is part of every checkpoint, and the data order is a pure
function of it (plan.py), so `--resume` continues with exactly the samples an uninterrupted run sees.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import codecs
from .cache import Cache, open_cache
from .checkpoint import CHECKPOINT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import to_yaml
from .dist import DistEnv, init_distributed, shutdown_distributed
from .errors import UserError
from .kernels import masked_smooth_l1
from .models import DEFAULT_STUDENT, STUDENT_PRESETS, TEACHER_PRESETS, MAETeacher, build_student, build_teacher
from .plan import EpochPlan, plan_epoch
from .schedule import get_lr, scaled_lr
from .sources import FolderSource, TarSource, open_source
from .stream import Batch, EpochLoader, StreamSpec
from .views import ViewGeometry, normalize, replay_versions

NO_WEIGHT_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    cache: str | None = None
    teacher: str | None = None
    arch: str = "mae_vit_base_patch16"
    student: str = DEFAULT_STUDENT
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 64
    accum_iter: int = 1
    blr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 10.0
    clip_grad: float | None = None
    loss_tokens: str = "all"
    beta: float = 2.0
    target_layer: int = 4
    mask_ratio: float = 0.75
    img_size: int = 224
    workers: int = 4
    prefetch: int = 2
    shuffle_window: int = 1024
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    log_every: int = 20
    save_every: int = 1000
    stop_after: int | None = None
    resume: bool = False
    on_error: str = "fail"
    log_samples: bool = False

    # What the data order depends on: a resume must keep these.
    ORDER = ("batch_size", "accum_iter", "workers", "shuffle_window", "seed", "cache", "data")

    @property
    def mode(self) -> str:
        return "replay" if self.cache and self.teacher else "cached" if self.cache else "online"

    def validate(self) -> None:
        if not self.cache and not self.teacher:
            raise UserError("give --cache CACHE (cached G2SD), --teacher CKPT (online G2SD) or both (replay check)")
        if self.student not in STUDENT_PRESETS:
            raise UserError(f"unknown --student {self.student}; choose one of: {', '.join(STUDENT_PRESETS)}")
        if self.arch not in TEACHER_PRESETS:
            raise UserError(f"unknown --arch {self.arch}; choose one of: {', '.join(TEACHER_PRESETS)}")
        if self.epochs is not None and self.steps is not None:
            raise UserError("give --epochs or --steps, not both")
        for name in ("batch_size", "accum_iter", "log_every", "save_every", "shuffle_window", "prefetch"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("epochs", "steps", "stop_after"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.workers < 0:
            raise UserError("--workers must be 0 or more")
        if self.loss_tokens not in ("all", "masked", "visible"):
            raise UserError(f"--loss-tokens {self.loss_tokens}: choose all, masked or visible")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise UserError(f"--precision {self.precision}: choose auto, bf16, fp16 or fp32")
        if self.on_error not in ("skip", "fail"):
            raise UserError(f"--on-error {self.on_error}: choose skip or fail")


@dataclass
class _Setup:
    """Everything `train` derives from the config before the first step."""

    source: FolderSource | TarSource
    cache: Cache | None
    teacher: MAETeacher | None
    geometry: ViewGeometry
    target_layer: int
    target_dim: int
    unit_sizes: list[int]
    block: int
    whole_units: bool
    views_per_image: int | None    # K of the cache; None online


def _setup(cfg: TrainConfig, env: DistEnv) -> _Setup:
    source = open_source(cfg.data)
    cache = teacher = None
    if cfg.cache:
        cache = open_cache(cfg.cache)
        m = cache.manifest
        if m.source["kind"] != source.kind or m.source["fingerprint"] != source.fingerprint:
            raise UserError(f"--data {cfg.data} is not the dataset the cache was extracted from "
                            f"({m.source['kind']} {m.source['root']}, listing fingerprint {m.source['fingerprint'][:12]}..., "
                            f"--data has {source.fingerprint[:12]}...); pass the same images")
        geometry = ViewGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.geometry.items()})
        target_layer, target_dim = m.target_layer, m.target_dim
        ignored = _flags_ignored_with_a_cache(cfg)
        if ignored and env.is_main:
            print(f"note: {', '.join(ignored)} come from the cache's manifest with --cache; the flags are ignored")
        if m.versions != replay_versions() and env.is_main:
            print(f"warning: the cache was made with {m.versions}; this machine has {replay_versions()}: replayed "
                  f"crops may differ slightly from what the teacher saw")
    else:
        if not isinstance(source, FolderSource):
            raise UserError("online G2SD needs an image folder as --data (tar shards carry no image count); "
                            "extract a cache from the tars and train with --cache")
        geometry = ViewGeometry(img_size=cfg.img_size, patch_size=TEACHER_PRESETS[cfg.arch].patch_size,
                                mask_ratio=cfg.mask_ratio)
        target_layer, target_dim = cfg.target_layer, TEACHER_PRESETS[cfg.arch].decoder_embed_dim
        depth = TEACHER_PRESETS[cfg.arch].decoder_depth
        if not 1 <= target_layer <= depth:
            raise UserError(f"--target-layer {target_layer}: must be between 1 and {depth}")
    if cfg.teacher:
        arch = cache.manifest.teacher["arch"] if cache else cfg.arch
        teacher, info = build_teacher(cfg.teacher, arch, geometry.img_size)
        if cache and info.sha256 != cache.manifest.teacher["sha256"]:
            raise UserError(f"--teacher {cfg.teacher} is not the teacher that made the cache "
                            f"({cache.manifest.teacher['source']}, sha256 {cache.manifest.teacher['sha256'][:12]}...); "
                            f"replay needs the same weights")
        teacher.to(env.device)
    student_patch = STUDENT_PRESETS[cfg.student].patch_size
    if student_patch != geometry.patch_size:
        raise UserError(f"student {cfg.student} has patch size {student_patch} but the views use "
                        f"{geometry.patch_size}; choose a student with the teacher's patch size")
    if cache:
        unit_sizes, block = list(cache.shard_images), cache.manifest.chunk_views
    else:
        unit_sizes, block = [len(source)], 64
    return _Setup(source, cache, teacher, geometry, target_layer, target_dim, unit_sizes, block,
                  whole_units=isinstance(source, TarSource),
                  views_per_image=cache.views_per_image if cache else None)


def _flags_ignored_with_a_cache(cfg: TrainConfig) -> list[str]:
    """View and target flags set away from their defaults, which a cache's manifest overrides."""
    defaults = TrainConfig(data="", out="")
    return [f"--{k.replace('_', '-')}" for k in ("target_layer", "mask_ratio", "img_size", "arch")
            if getattr(cfg, k) != getattr(defaults, k)]


def _token_mask(loss_tokens: str, mask: torch.Tensor, valid: torch.Tensor, all_valid: bool) -> torch.Tensor | None:
    """[B, 1 + L] bool of the tokens the loss averages over (cls counts as visible), or None for all.
    `all_valid` comes from the CPU copy of `valid`, so deciding costs no device sync."""
    if loss_tokens == "all" and all_valid:
        return None
    cls = torch.ones_like(mask[:, :1])
    tokens = {"all": torch.ones_like(mask), "masked": mask, "visible": ~mask}[loss_tokens]
    tokens = torch.cat([cls & (loss_tokens != "masked"), tokens], dim=1)
    return tokens & valid[:, None]


class _Stop(Exception):
    """Raised inside the loop to end the run early (SIGTERM / --stop-after) after a checkpoint."""


def train(cfg: TrainConfig) -> dict:
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        return _train(cfg, env)
    finally:
        shutdown_distributed()


def _train(cfg: TrainConfig, env: DistEnv) -> dict:
    run = Path(cfg.out)
    if env.is_main:
        if run.exists() and not run.is_dir():
            raise UserError(f"--out {run} is a file; pass a folder for the run")
        if (run / CHECKPOINT).exists() and not cfg.resume:
            raise UserError(f"{run} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose "
                            f"another --out")
        run.mkdir(parents=True, exist_ok=True)
    env.barrier()
    s = _setup(cfg, env)
    device = env.device
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu" and precision == "fp16":
        raise UserError("--precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    # --- model, optimiser, schedule -------------------------------------------------------------
    student = build_student(cfg.student, s.target_dim, s.geometry.img_size, seed=cfg.seed).to(device)
    groups = param_groups_weight_decay(student, cfg.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) \
        if env.world > 1 else student

    slots = max(1, cfg.workers)

    def plan_for(epoch: int) -> EpochPlan:
        return plan_epoch(s.unit_sizes, epoch=epoch, seed=cfg.seed, rank=env.rank, world=env.world, slots=slots,
                          block=s.block, window=cfg.shuffle_window, whole_units=s.whole_units)

    micro_per_epoch = plan_for(0).micro_batches(cfg.batch_size)
    if micro_per_epoch == 0:
        raise UserError(f"each of the {env.world} ranks gets no samples: the dataset has fewer views than ranks")
    steps_per_epoch = -(-micro_per_epoch // cfg.accum_iter)
    total_steps = cfg.steps or (cfg.epochs or 300) * steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    effective_batch = cfg.batch_size * cfg.accum_iter * env.world
    base_lr = scaled_lr(cfg.blr, effective_batch)

    step, epoch, micro_start = 0, 0, 0
    if cfg.resume:
        ckpt = load_checkpoint(run, "train without --resume to start a new run there")
        saved = ckpt["config"]
        diff = [k for k in (*TrainConfig.ORDER, "student") if saved.get(k) != getattr(cfg, k)] + \
               (["world size"] if ckpt["world"] != env.world else [])
        if diff:
            raise UserError(f"--resume: {', '.join(diff)} differ from the run being resumed; the model and the "
                            f"data order depend on them, so pass the same values (see {run}/config.yaml)")
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        step, epoch, micro_start = ckpt["step"], ckpt["epoch"], ckpt["micro"]
    if env.is_main:
        derived = {"mode": cfg.mode, "world_size": env.world, "steps_per_epoch": steps_per_epoch,
                   "total_steps": total_steps, "warmup_steps": warmup_steps, "effective_batch": effective_batch,
                   "lr": base_lr, "precision": precision, "target_layer": s.target_layer, "target_dim": s.target_dim}
        (run / "config.yaml").write_text(to_yaml(cfg, {"derived": derived}))

    # --- logging ----------------------------------------------------------------------------------
    metrics_file = open(run / "metrics.jsonl", "a") if env.is_main else None
    tb = None
    if env.is_main:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(run / "tb"))
    samples_file = open(run / f"samples-rank{env.rank}.jsonl", "a") if cfg.log_samples else None
    bar = tqdm(total=total_steps, initial=step, unit="step", desc=f"train[{cfg.mode}]", disable=not env.is_main,
               dynamic_ncols=True)
    if env.is_main:
        tqdm.write(f"{cfg.mode} G2SD: {cfg.student} <- {s.target_dim}-wide targets, {env.world} rank(s), "
                   f"batch {cfg.batch_size}x{cfg.accum_iter}x{env.world}, lr {base_lr:.3g}, "
                   f"{steps_per_epoch} steps/epoch, {total_steps} steps" + (f", resuming at step {step}" if step else ""))

    stop_requested = {"flag": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.update(flag=True)) \
        if _in_main_thread() else None

    def checkpoint(at_step: int, at_epoch: int, at_micro: int) -> None:
        _raise_if_nonfinite(first_bad, run)
        if env.is_main:
            save_checkpoint(run, {"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scaler": scaler.state_dict(), "step": at_step, "epoch": at_epoch,
                                  "micro": at_micro, "rng": rng_state(), "config": dataclasses.asdict(cfg),
                                  "world": env.world, "student": cfg.student, "target_dim": s.target_dim,
                                  "img_size": s.geometry.img_size})
        env.barrier()

    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), device=device)
    disc_sum = torch.zeros(2, device=device)   # replay: sum of relative RMS error, max abs error
    window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0, "skipped": 0}
    last_loss = float("nan")
    ended_early = False
    start_step = step
    t_start = time.perf_counter()
    try:
        while step < total_steps:
            plan = plan_for(epoch)
            view = epoch % s.views_per_image if s.views_per_image else epoch
            spec = StreamSpec(s.source, s.cache, s.geometry, cfg.seed, env.rank, epoch, view)
            loader = EpochLoader(spec, plan, batch_size=cfg.batch_size, workers=cfg.workers, start=micro_start,
                                 prefetch=cfg.prefetch, pin_memory=device.type == "cuda",
                                 codec_dtype=s.cache.codec.torch_dtype if s.cache else None)
            batches = iter(loader)
            micro = micro_start
            while micro < micro_per_epoch and step < total_steps:
                n_micro = min(cfg.accum_iter, micro_per_epoch - micro)
                lr = get_lr(step, base_lr=base_lr, min_lr=cfg.min_lr, warmup_steps=warmup_steps,
                            total_steps=total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for i in range(n_micro):
                    t_wait = time.perf_counter()
                    batch = next(batches)
                    window["wait"] += time.perf_counter() - t_wait
                    window["skipped"] += len(batch.errors)
                    if batch.errors and cfg.on_error == "fail":
                        raise UserError(f"cannot read a training sample ({batch.errors[0]}); fix the input, or "
                                        f"pass --on-error skip to leave such samples out (they are counted)")
                    if samples_file:
                        samples_file.write(json.dumps({"step": step, "epoch": epoch, "index": batch.index.tolist(),
                                                       "view": batch.view.tolist(),
                                                       "valid": batch.valid.tolist()}) + "\n")
                    sync = nullcontext() if (env.world == 1 or i == n_micro - 1) else model.no_sync()
                    with sync:
                        loss = _micro_step(model, s, cfg, batch, device, autocast, disc_sum)
                        scaler.scale(loss / n_micro).backward()
                    loss_sum += loss.detach() / n_micro
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_sum), step, first_bad)
                micro += n_micro
                step += 1
                window["steps"] += 1
                bar.update(1)
                at_epoch, at_micro = (epoch, micro) if micro < micro_per_epoch else (epoch + 1, 0)

                if step % cfg.log_every == 0 or step == total_steps:
                    last_loss = _log(step, epoch, lr, loss_sum, disc_sum, window, cfg, env, metrics_file, tb,
                                     first_bad, run)
                    loss_sum.zero_()
                    disc_sum.zero_()
                if step % cfg.save_every == 0 or step == total_steps:
                    checkpoint(step, at_epoch, at_micro)
                # --stop-after is the same step on every rank; a SIGTERM may reach ranks at different
                # steps, so ranks agree on it at log steps (every step when alone).
                stop_now = cfg.stop_after is not None and step >= cfg.stop_after
                if env.world == 1 or step % cfg.log_every == 0:
                    stop_now = stop_now or _any_rank(stop_requested["flag"], env, device)
                if stop_now:
                    if step % cfg.save_every != 0 and step != total_steps:
                        checkpoint(step, at_epoch, at_micro)
                    raise _Stop
            epoch, micro_start = epoch + 1, 0
    except _Stop:
        ended_early = True
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
        if tb:
            tb.close()
        if samples_file:
            samples_file.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    elapsed = time.perf_counter() - t_start
    done = step - start_step
    summary = {"mode": cfg.mode, "steps": step, "steps_this_run": done, "stopped_early": ended_early,
               "seconds": elapsed, "final_loss": last_loss,
               "samples_per_s": done * effective_batch / elapsed if elapsed > 0 else 0.0,
               "checkpoint": str(run / CHECKPOINT)}
    if env.is_main:
        tqdm.write(f"{'stopped' if ended_early else 'finished'} at step {step}/{total_steps}: loss {last_loss:.4f}, "
                   f"{summary['samples_per_s']:.1f} samples/s; checkpoint {run / CHECKPOINT}")
    return summary


def _micro_step(model, s: _Setup, cfg: TrainConfig, batch: Batch, device, autocast, disc_sum) -> torch.Tensor:
    """Forward one micro-batch and return its loss (the target comes from the cache or the teacher)."""
    pixels = batch.pixels.to(device, non_blocking=True)
    mask = batch.mask.to(device, non_blocking=True)
    valid = batch.valid.to(device, non_blocking=True)
    imgs = normalize(pixels)
    scale = None
    if s.teacher is not None:
        with autocast():
            target = s.teacher.targets(imgs, mask, s.target_layer)
        if batch.codes is not None:   # replay: how far are the cached targets from the live ones?
            cached = codecs.decode(s.cache.codec, batch.codes.to(device), None if batch.scale is None
                                   else batch.scale.to(device))
            ok = valid[:, None, None]
            err = (cached - target) * ok
            disc_sum[0] += err.pow(2).sum().sqrt() / (target * ok).pow(2).sum().sqrt().clamp_min(1e-12)
            disc_sum[1] = torch.maximum(disc_sum[1], err.abs().max())
    else:
        target = batch.codes.to(device, non_blocking=True)
        scale = batch.scale.to(device, non_blocking=True) if batch.scale is not None else None
    with autocast():
        pred = model(imgs, mask)
    return masked_smooth_l1(pred, target, scale=scale, token_mask=_token_mask(cfg.loss_tokens, mask, valid, not batch.errors),
                            beta=cfg.beta)


def _log(step, epoch, lr, loss_sum, disc_sum, window, cfg, env, metrics_file, tb, first_bad, run) -> float:
    """Average the interval's loss over ranks, write metrics.jsonl / TensorBoard / console (rank 0)."""
    steps = window["steps"]
    stats = torch.stack([loss_sum / steps, disc_sum[0] / steps, disc_sum[1],
                         torch.tensor(float(window["skipped"]), device=loss_sum.device)])
    if env.world > 1:
        dist.all_reduce(stats)
        stats[:2] /= env.world
    _raise_if_nonfinite(first_bad, run)
    loss, rel, max_abs, skipped = stats.tolist()
    now = time.perf_counter()
    elapsed = now - window["t0"]
    record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr,
              "samples_per_s": steps * cfg.batch_size * cfg.accum_iter * env.world / elapsed,
              "data_wait_frac": window["wait"] / elapsed, "skipped_views": int(skipped)}
    if cfg.mode == "replay":
        record.update(target_rel_rmse=rel, target_max_abs_err=max_abs)
    window.update(t0=now, wait=0.0, steps=0, skipped=0)
    if env.is_main:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        for k, v in record.items():
            if k not in ("step", "epoch"):
                tb.add_scalar(f"train/{k}", v, step)
        line = (f"step {step} epoch {epoch} loss {loss:.4f} lr {lr:.3g} {record['samples_per_s']:.1f} samples/s "
                f"data wait {100 * record['data_wait_frac']:.0f}%")
        if cfg.mode == "replay":
            line += f" target rel err {rel:.2e} max {max_abs:.2e}"
        if skipped:
            line += f" skipped {int(skipped)}"
        tqdm.write(line)
    return loss


def _raise_if_nonfinite(first_bad: torch.Tensor, run: Path) -> None:
    bad = int(first_bad)
    if bad >= 0:
        raise UserError(f"the loss became NaN or Inf at step {bad + 1}; stopped. The last good checkpoint "
                        f"{run / CHECKPOINT} is kept (if one was saved): lower --blr, set --clip-grad or check the data")


def _any_rank(flag: bool, env: DistEnv, device) -> bool:
    if env.world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
