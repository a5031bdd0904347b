"""`g2sd-cache train`: the command around the distillation step (generic/step.py) — run folder, resume,
config.yaml, signals, the epoch / step loop and the summary.

Modes: cached (--cache: no teacher), online (--teacher: the paper's G2SD, the baseline), replay (both: the
cached views through the live teacher, logging how far the stored targets are from live ones).

The data order is a pure function of (seed, epoch) (generic/plan.py), cut into global batches of
batch_size x accum_iter x world samples; a checkpoint records the epoch and the global sample position.
`--resume` continues at that sample on any number of ranks and workers (and any per-rank batch giving the
same global batch), with the same samples in the same order.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from g2sd_cache.common.checkpoint import RESUME_KEYS, load_checkpoint, rng_state, set_rng_state
from g2sd_cache.common.config import to_yaml
from g2sd_cache.common.dist import DistEnv, run_on_ranks
from g2sd_cache.generic.step import Distiller, Setup, TrainConfig, prepare
from g2sd_cache.common.errors import UserError
from g2sd_cache.common.fsutil import write_text_atomic
from g2sd_cache.generic.plan import epoch_order, rank_positions, steps_in_epoch
from g2sd_cache.generic.runlog import RunLog
from g2sd_cache.training.run_folder import StopRun, prepare_run_folder, release_run_folder, save_run_checkpoint
from g2sd_cache.training.schedule import get_lr, scaled_lr
from g2sd_cache.generic.stream import StepLoader, StreamSpec

__all__ = ["TrainConfig", "train"]

# Options whose change on --resume is accepted (printed and recorded in config.yaml): the schedule.
SCHEDULE = ("epochs", "steps", "blr", "min_lr", "warmup_epochs", "warmup_steps", "weight_decay", "clip_grad",
            "stop_after", "log_every", "save_every")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The run's length and learning-rate schedule in optimizer steps."""

    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    base_lr: float
    by_epochs: bool = False   # --epochs: the lr follows the fractional epoch, not the step counter
    epoch_size: int = 0

    def lr_step(self, step: int, epoch: int, position: int) -> float:
        """Where the lr schedule stands: the step counter under --steps; under --epochs the fractional epoch
        (epoch + position / epoch size) in steps of the current global batch, so a resume with another global
        batch keeps the warm-up and the cosine where they were (equal to the step counter otherwise)."""
        if not self.by_epochs:
            return step
        return epoch * self.steps_per_epoch + position / self.global_batch


def make_schedule(cfg: TrainConfig, epoch_size: int, world: int, at: tuple[int, int, int] = (0, 0, 0)) -> Schedule:
    """`at` = (step, epoch, sample position) the run starts from. Under --epochs the total is that step plus
    the steps left from (epoch, position) at this global batch: a checkpoint counts steps of the batch it
    was saved with, so epochs x the new steps per epoch would train a partial extra epoch (or too few)."""
    global_batch = cfg.batch_size * cfg.accum_iter * world
    steps_per_epoch = steps_in_epoch(epoch_size, global_batch)
    if steps_per_epoch == 0:
        raise UserError("the dataset has no samples to train on")
    step, epoch, position = at
    epochs = cfg.run_epochs
    if cfg.steps:
        total = cfg.steps
    elif epoch >= epochs:
        total = step
    else:
        total = step + steps_in_epoch(epoch_size, global_batch, position) + (epochs - epoch - 1) * steps_per_epoch
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    else:
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        # --steps and --warmup-epochs count in different units: a mismatch is the likely mistake there. (With
        # --epochs both are epochs; a warm-up past the end is printed with the other set-up lines.)
        if warmup > total and cfg.steps is not None:
            raise UserError(f"--warmup-epochs {cfg.warmup_epochs} is {warmup} steps ({steps_per_epoch} steps per epoch), "
                            f"longer than the run's {total} steps (--steps): the learning rate would never reach --blr. "
                            f"Lower --warmup-epochs, or give --warmup-steps N to mean it")
    return Schedule(global_batch, steps_per_epoch, total, warmup, scaled_lr(cfg.blr, global_batch),
                    by_epochs=not cfg.steps, epoch_size=epoch_size)


def epochs_total(cfg: TrainConfig, sched: Schedule) -> int:
    """The cosine's end under --epochs, in steps of the current global batch."""
    return cfg.run_epochs * sched.steps_per_epoch


def train(cfg: TrainConfig) -> dict:
    return run_on_ranks(cfg, _train, release=lambda: release_run_folder(cfg.out), command="train")


def cache_identity(cache) -> dict | None:
    """What a checkpoint records of its cache: the content fingerprint (reader.Cache.fingerprint) and, to name what
    changed, the settings most likely to: teacher weights, codec, views, seed."""
    if cache is None:
        return None
    m = cache.manifest
    return {"fingerprint": cache.fingerprint, "teacher_sha256": m.teacher.sha256, "codec": m.codec,
            "views_per_image": m.views_per_image, "seed": m.seed, "views": m.views}


def _same_cache(cfg: TrainConfig, saved: dict, recorded: dict | None, cache) -> tuple[bool, list[str]]:
    """Whether --cache is the cache the run was trained on: by content (the fingerprint), so the same cache named
    by another path (absolute, relative, moved) resumes and a re-extraction with another teacher or codec under
    the same path does not. Checkpoints without a fingerprint: by resolved path. Returns (same, notes)."""
    if cache is None or saved.get("cache") is None:   # a change of mode: _resume names it
        return True, []
    if recorded is None:
        return Path(saved["cache"]).resolve() == Path(cfg.cache).resolve(), []
    if recorded.get("fingerprint") != cache.fingerprint:
        return False, []
    return True, ([f"cache: {saved['cache']!r} -> {cfg.cache!r} (the same content)"] if saved["cache"] != cfg.cache
                  else [])


def _resume(cfg: TrainConfig, run: Path, distiller: Distiller, sched: Schedule, env: DistEnv,
            cache=None) -> tuple[int, int, int, list[str]]:
    """Load the checkpoint; returns (step, epoch, sample position in the epoch, notes on what changed)."""
    ckpt = load_checkpoint(run, "train without --resume to start a new run there", required=RESUME_KEYS)
    saved = ckpt["config"]
    fixed = [k for k in (*TrainConfig.ORDER, "student", "loss_tokens", "beta")
             if saved.get(k, TrainConfig.ORDER_BEFORE.get(k)) != getattr(cfg, k)]
    if cfg.mode == "online" and saved.get("data") != cfg.data:
        fixed.append("data")
    if (saved.get("cache") is None) != (cfg.cache is None):
        fixed.append("cache")
    same, cache_notes = _same_cache(cfg, saved, ckpt.get("cache_identity"), cache)
    if not same:
        was, now = ckpt.get("cache_identity") or {}, cache_identity(cache) or {}
        what = [f"{k} {str(was.get(k))[:12]} -> {str(now.get(k))[:12]}" for k in now if k != "fingerprint"
                and k in was and was[k] != now[k]]
        raise UserError(f"--resume: --cache {cfg.cache} is not the cache the run was trained on ({saved.get('cache')}"
                        + (f"; {', '.join(what)}" if what else ", another content") + "); pass that cache, or train "
                        "without --resume into a new --out")
    if fixed:
        raise UserError(f"--resume: {', '.join(fixed)} differ from the run being resumed; the model and the data "
                        f"order depend on them, so pass the same values (see {run}/config.yaml)")
    notes = [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in SCHEDULE if saved.get(k) != getattr(cfg, k)]
    notes += cache_notes
    if ckpt["global_batch"] != sched.global_batch:
        notes.append(f"global batch {ckpt['global_batch']} -> {sched.global_batch}: continuing at the same sample "
                     f"with the new batch (steps per epoch and the lr scale change)")
    if ckpt["world"] != env.world:
        notes.append(f"world size {ckpt['world']} -> {env.world} (the data order is unchanged)")
    distiller.load_state_dict(ckpt)
    set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt["epoch"], ckpt["position"], notes


def _train(cfg: TrainConfig, env: DistEnv) -> dict:
    run = prepare_run_folder(cfg.out, cfg.resume, env)
    setup = prepare(cfg, env)
    distiller = Distiller(cfg, setup, env)
    sched = make_schedule(cfg, setup.epoch_size, env.world)
    step, epoch, position, notes = _resume(cfg, run, distiller, sched, env, setup.cache) if cfg.resume else (0, 0, 0, [])
    if step:
        sched = make_schedule(cfg, setup.epoch_size, env.world, at=(step, epoch, position))
    if env.is_main:
        for line in setup.notes + [f"resume: {n}" for n in notes]:
            print(line)
        derived = {"mode": cfg.mode, "world_size": env.world, "global_batch": sched.global_batch,
                   "steps_per_epoch": sched.steps_per_epoch, "total_steps": sched.total_steps,
                   "warmup_steps": sched.warmup_steps, "lr": sched.base_lr, "precision": distiller.precision,
                   "teacher_precision": distiller.teacher_precision,
                   "target_layer": setup.target_layer, "target_dim": setup.target_dim,
                   "reads": "cached pixels" if setup.cache and setup.cache.has_pixels else "images",
                   "resumed_with_changes": notes}
        write_text_atomic(run / "config.yaml", to_yaml(cfg, {"derived": derived}))
        tqdm.write(f"{cfg.mode} G2SD: {cfg.student} <- {setup.target_dim}-wide targets, {env.world} rank(s), "
                   f"batch {cfg.batch_size}x{cfg.accum_iter}x{env.world}, lr {sched.base_lr:.3g}, "
                   f"{sched.steps_per_epoch} steps/epoch, {sched.total_steps} steps, warm-up {sched.warmup_steps} "
                   f"steps" + (f", resuming at step {step}" if step else ""))
        if sched.warmup_steps > sched.total_steps:
            tqdm.write(f"warning: the warm-up ({sched.warmup_steps} steps) is longer than the run ({sched.total_steps} "
                       f"steps): the learning rate never reaches {sched.base_lr:.3g}")

    log = RunLog(run, env, mode=cfg.mode, global_batch=sched.global_batch, start_step=step,
                 log_samples=cfg.log_samples)

    def checkpoint(at_step: int, at_epoch: int, at_position: int) -> None:
        log.raise_if_nonfinite()
        save_run_checkpoint(run, env, at_step, distiller.weights_finite(), lambda: distiller.state_dict() | {
            "step": at_step, "epoch": at_epoch, "position": at_position, "global_batch": sched.global_batch,
            "rng": rng_state(), "config": dataclasses.asdict(cfg), "world": env.world, "student": cfg.student,
            "target_dim": setup.target_dim, "img_size": setup.geometry.img_size,
            "cache_identity": cache_identity(setup.cache)})

    last_loss, start_step = float("nan"), step
    if setup.cache is not None and setup.cache.mirror is not None:
        setup.cache.fetched_mark = setup.cache.mirror.fetched_bytes
    t_start = time.perf_counter()
    steps = None
    try:
        with distiller.run_loop(sched.total_steps, step, f"train[{cfg.mode}]", log) as loop:
            while step < sched.total_steps:
                loader = epoch_loader(cfg, setup, env, sched, epoch, position)
                steps = iter(loader)
                while step < sched.total_steps:
                    t_wait = time.perf_counter()
                    batches = next(steps, None)
                    if batches is None:
                        break
                    wait = time.perf_counter() - t_wait
                    errors = [e for b in batches for e in b.errors]
                    if errors and cfg.on_error == "fail":
                        raise UserError(f"cannot read a training sample ({errors[0]}); fix the input, or pass "
                                        f"--on-error skip to leave such samples out (they are counted)")
                    log.log_batches(step, epoch, batches)
                    lr = get_lr(sched.lr_step(step, epoch, position), base_lr=sched.base_lr, min_lr=cfg.min_lr,
                                warmup_steps=sched.warmup_steps,
                                total_steps=sched.total_steps if not sched.by_epochs else epochs_total(cfg, sched))
                    log.add(step, distiller.step(batches, lr), wait)
                    step += 1
                    position = min(setup.epoch_size, position + sched.global_batch)
                    loop.bar.update(1)
                    at_epoch, at_position = (epoch, position) if position < setup.epoch_size else (epoch + 1, 0)
                    if step % cfg.log_every == 0 or step == sched.total_steps:
                        last_loss = log.write(step, epoch, lr)
                    if step % cfg.save_every == 0 or step == sched.total_steps:
                        checkpoint(step, at_epoch, at_position)
                    if distiller.stop_requested(step, cfg.stop_after, cfg.log_every, loop.signals):
                        if step % cfg.save_every != 0 and step != sched.total_steps:
                            checkpoint(step, at_epoch, at_position)
                        raise StopRun
                if step < sched.total_steps or position >= setup.epoch_size:
                    _report_fetched(setup, env, epoch)
                epoch, position = epoch + 1, 0
    finally:
        if steps is not None:     # its reader thread first (joined): else it could read on through a reopened copy
            steps.close()
        if setup.cache is not None:
            setup.cache.close()      # downloads of a remote cache's local copy end with the run
    summary = distiller.summary(cfg.mode, step, start_step, loop.stopped_early, time.perf_counter() - t_start, last_loss,
                                sched.global_batch, run)
    if env.is_main:
        tqdm.write(distiller.summary_line(summary, sched.total_steps))
    return summary


def _report_fetched(setup: Setup, env: DistEnv, epoch: int) -> None:
    """A remote cache: what this rank downloaded during the epoch, against the epoch's share of the cache (the
    files of its view: 1.0x is each byte once; less when files were already in the local copy)."""
    cache = setup.cache
    if cache is None or cache.mirror is None:
        return
    view = epoch % setup.views_per_image
    share = sum(f.size for s in range(len(cache.manifest.shards)) for f in cache.view_files(s, view))
    got = cache.mirror.fetched_bytes - cache.fetched_mark
    cache.fetched_mark = cache.mirror.fetched_bytes
    tqdm.write(f"rank {env.rank} epoch {epoch}: fetched {got / 2**20:.2f} MiB ({got} B) from {cache.root} = {got / max(1, share):.2f}x "
               f"the epoch's share of the cache ({share / 2**20:.2f} MiB)")


def node_shards(order, position: int, global_batch: int, env: DistEnv) -> list[list[int]]:
    """The cache shards this node's ranks read from `position` on, step by step (each step's shards once, in order
    of first use): the plan of the node-local copy. torchrun numbers a node's ranks contiguously
    (LOCAL_WORLD_SIZE of them)."""
    local = max(1, min(env.world, int(os.environ.get("LOCAL_WORLD_SIZE", env.world))))
    first = env.rank - env.rank % local
    pos = np.stack([rank_positions(len(order), start=position, global_batch=global_batch, rank=r, world=env.world)
                    for r in range(first, first + local)], axis=1)        # [steps, local ranks, per rank]
    return [list(dict.fromkeys(order.unit[p[p >= 0]].tolist())) for p in pos.reshape(len(pos), -1)] if len(pos) else []


def epoch_loader(cfg: TrainConfig, setup: Setup, env: DistEnv, sched: Schedule, epoch: int, position: int) -> StepLoader:
    """This rank's remaining steps of `epoch`, from global sample `position` on: train's input, and the
    benchmark's (benchmarks/sections/step.py), so both time the same loader."""
    order = epoch_order(setup.unit_sizes, seed=cfg.seed, epoch=epoch, block=setup.block, window=cfg.shuffle_window,
                        whole_units=setup.whole_units, span=cfg.shuffle_span)
    view = epoch % setup.views_per_image if setup.views_per_image else epoch
    spec = StreamSpec(setup.source, setup.cache, setup.geometry, cfg.seed, view, order, keys=cfg.log_samples)
    positions = rank_positions(len(order), start=position, global_batch=sched.global_batch, rank=env.rank,
                               world=env.world)
    if setup.cache is not None and setup.cache.mirror is not None:
        setup.cache.plan_reads(node_shards(order, position, sched.global_batch, env), view)
    return StepLoader(spec, positions, batch_size=cfg.batch_size, workers=cfg.workers, prefetch=cfg.prefetch,
                      pin_memory=env.device.type == "cuda")
