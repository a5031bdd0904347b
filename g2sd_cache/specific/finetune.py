"""`g2sd-cache finetune`: G2SD's specific distillation (stage 2) around the step of specific/step.py — run
folder, resume, config.yaml, signals, the epoch / step loop, evaluation, the best checkpoint, the summary.

Modes (FinetuneConfig.mode, printed first): cached (--logits: the teacher's stored predictions, no teacher
forward, even when a config names a teacher), online (--teacher alone: G2SD's recipe, the teacher in the loop),
replay (--logits --teacher --replay: live labels train, and their agreement with the stored ones is logged),
plain (neither: MAE's fine-tuning, no dist token).

Data order (specific/plan.py): epoch e trains on the plan's epoch e (cached and replay: e mod K, the epoch whose
predictions are stored), cut into mixing groups of --group-size. A step takes accum_iter x world groups:
micro-step j of rank r at the step starting at group position p takes group p + j * world + r. A checkpoint
records the epoch and the group position, so `--resume` continues at the same group on any number of ranks
(and any --accum-iter: the global batch, hence the lr scale, may then change). The groups left over at an
epoch's end (fewer than a step) sit that epoch out, as G2SD's drop_last.

The learning rate follows G2SD's per-iteration schedule in fractional epochs (util/lr_sched.py), as a pure
function of (epoch, group position): linear warm-up, then half-cosine to --min-lr.

Outputs in --out: checkpoint.pt (atomic; every --save-every steps, at each epoch's end and on a stop),
best.pt (the weights with the best validation top-1, for `evaluate` and `export`), config.yaml,
metrics.jsonl, tb/.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from g2sd_cache.common.checkpoint import (CHECKPOINT, load_checkpoint, rng_state, save_checkpoint, save_torch_file,
                                         set_rng_state)
from g2sd_cache.models.classifier import build_teacher
from g2sd_cache.common.config import to_yaml
from g2sd_cache.common.dist import DistEnv, run_on_ranks
from g2sd_cache.common.errors import UserError
from g2sd_cache.common.fsutil import write_text_atomic
from g2sd_cache.specific.evaluate import evaluate
from g2sd_cache.specific.log import FinetuneLog
from g2sd_cache.specific.finetuned import BEST, STAGE
from g2sd_cache.data.labelled import open_labelled
from g2sd_cache.cache.logits import LogitsCache, open_logits
from g2sd_cache.cache.logits_checks import manifest_problems as logits_manifest_problems
from g2sd_cache.training.run_folder import StopRun, prepare_run_folder, release_run_folder, save_run_checkpoint
from g2sd_cache.training.schedule import get_lr, scaled_lr
from g2sd_cache.specific.config import FinetuneConfig
from g2sd_cache.specific.plan import SDPlan, UnreadableImages, check_same_plan, open_plan
from g2sd_cache.specific.step import FineTuner
from g2sd_cache.common.workers import keep_as_is, mp_context

# What a finetune checkpoint holds and a resume reads.
FINETUNE_KEYS = ("stage", "step", "epoch", "position", "global_batch", "rng", "config", "world", "arch", "num_classes",
                 "classes", "img_size", "distilled")

# Options whose change on --resume is accepted (printed and recorded in config.yaml).
SCHEDULE = ("epochs", "blr", "min_lr", "warmup_epochs", "weight_decay", "layer_decay", "clip_grad", "accum_iter",
            "eval_every", "stop_after", "log_every", "save_every")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the run walks the plan: groups per epoch and per optimizer step."""

    groups_per_epoch: int
    groups_per_step: int       # accum_iter x world
    global_batch: int          # group_size x groups_per_step
    base_lr: float

    def steps_left(self, position: int) -> int:
        return (self.groups_per_epoch - position) // self.groups_per_step


def lr_at(cfg: FinetuneConfig, layout: Layout, epoch: int, position: int) -> float:
    """G2SD's lr at fractional epoch epoch + position / groups_per_epoch (a pure function)."""
    n = layout.groups_per_epoch
    return get_lr(epoch * n + position, base_lr=layout.base_lr, min_lr=cfg.min_lr,
                  warmup_steps=cfg.warmup_epochs * n, total_steps=cfg.epochs * n)


class RankItems:
    """(training epoch, plan epoch, group) of every group this rank trains on, from (epoch, position) to the end
    of the run, in step order, computed on demand (an ImageNet run has millions: no list to pickle to workers).

    Item i is micro-step j = i mod accum_iter of the run's k-th step, k = i // accum_iter; that step starts at
    group position p of its epoch, and rank r's micro-step j takes group p + j x world + r."""

    def __init__(self, cfg: FinetuneConfig, layout: Layout, env: DistEnv, epoch: int, position: int,
                 cached_epochs: int | None):
        self.accum, self.world, self.rank = cfg.accum_iter, env.world, env.rank
        self.layout, self.epoch, self.position, self.cached = layout, epoch, position, cached_epochs
        self.first = layout.steps_left(position) if epoch < cfg.epochs else 0   # steps left in the first epoch
        self.per_epoch = layout.steps_left(0)
        self.steps = self.first + max(0, cfg.epochs - epoch - 1) * self.per_epoch

    def __len__(self) -> int:
        return self.steps * self.accum

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k, j = divmod(i, self.accum)
        if k < self.first:
            e, start = self.epoch, self.position + k * self.layout.groups_per_step
        else:
            later, step = divmod(k - self.first, self.per_epoch)
            e, start = self.epoch + 1 + later, step * self.layout.groups_per_step
        plan_epoch = e % self.cached if self.cached else e
        return e, plan_epoch, start + j * self.world + self.rank


class _RunGroups(Dataset):
    """RankItems -> (training epoch, MixedGroup), computed in DataLoader workers."""

    def __init__(self, plan: SDPlan, items: RankItems):
        self.plan, self.items = plan, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        epoch, plan_epoch, group = self.items[i]
        return epoch, self.plan.batch(plan_epoch, group)


def finetune(cfg: FinetuneConfig) -> dict:
    return run_on_ranks(cfg, _finetune, release=lambda: release_run_folder(cfg.out), command="finetune")


def _inputs(cfg: FinetuneConfig, env: DistEnv) -> tuple[SDPlan, LogitsCache | None, torch.nn.Module | None, str | None,
                                                       list[str]]:
    """The plan, the logits cache, the teacher and its sha256, each checked against the others (one-line errors)."""
    notes = []
    plan = open_plan(cfg.data, cfg.recipe(), cfg.seed)
    classes = plan.data.num_classes
    if classes < 2:
        raise UserError(f"--data {cfg.data} has {classes} class folder; classification needs at least 2")
    logits = None
    if cfg.logits:
        logits = open_logits(cfg.logits, cfg.local_cache)
        problems = logits_manifest_problems(logits)
        if problems:   # verify's checks of the manifest, as open_cache runs them for train: never an IndexError later
            raise UserError(f"logits cache {cfg.logits} does not agree with its manifest: {problems[0]}"
                            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; run `g2sd-cache verify "
                            f"{cfg.logits}` for the full report, then rerun extract-logits into a new --out")
        check_same_plan(logits.manifest.plan, plan.describe(), f"logits cache {cfg.logits}")
        # the listing ties images by name and size only: each image read must be the bytes the teacher saw
        plan.data = dataclasses.replace(plan.data, crc32c=logits.image_crc32c(len(plan.data)))
        notes.append(f"teacher predictions from {cfg.logits} ({logits.epochs} cached epoch(s): epoch e trains on the "
                     f"plan's epoch e mod {logits.epochs}); no teacher forward")
    teacher = sha = None
    if cfg.mode in ("online", "replay"):      # cached mode never loads the teacher a config may name
        teacher, info = build_teacher(cfg.teacher, cfg.teacher_arch, classes, cfg.img_size)
        if logits is not None and info.sha256 != logits.manifest.teacher["sha256"]:
            raise UserError(f"--teacher {cfg.teacher} is not the teacher that made {cfg.logits} "
                            f"({logits.manifest.teacher['source']}, sha256 {logits.manifest.teacher['sha256'][:12]}...); "
                            f"replay needs the same weights")
        teacher.to(env.device)
        sha = info.sha256
    if cfg.val:
        open_labelled(cfg.val, plan.data.classes, "--val")   # fail now, not after the first epoch
    return plan, logits, teacher, sha, notes


def _check_resume(cfg: FinetuneConfig, run: Path) -> tuple[dict, list[str]]:
    """The checkpoint to resume from, refused in one line when the model or the data order would change."""
    ckpt = load_checkpoint(run, "finetune without --resume to start a new run there", required=FINETUNE_KEYS)
    if ckpt.get("stage") != STAGE:
        raise UserError(f"{run}/{CHECKPOINT} was not written by `g2sd-cache finetune`; resume it with the command "
                        f"that made it, or choose another --out")
    saved = ckpt["config"]
    fixed = [k for k in FinetuneConfig.FIXED_ON_RESUME if saved.get(k) != getattr(cfg, k)]
    if saved.get("mode") != cfg.mode and {saved.get("mode"), cfg.mode} != {"cached", "replay"}:
        fixed.append("mode (--teacher / --logits)")
    if fixed:
        raise UserError(f"--resume: {', '.join(fixed)} differ from the run being resumed; the model and the data "
                        f"order depend on them, so pass the same values (see {run}/config.yaml)")
    return ckpt, [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in SCHEDULE if saved.get(k) != getattr(cfg, k)]


def _finetune(cfg: FinetuneConfig, env: DistEnv) -> dict:
    if env.is_main:
        print(cfg.mode_line(), flush=True)
    run = prepare_run_folder(cfg.out, cfg.resume, env, "finetune")
    ckpt, changes = _check_resume(cfg, run) if cfg.resume else (None, [])
    plan, logits, teacher, teacher_sha, notes = _inputs(cfg, env)
    teacher_sha = teacher_sha or (logits.manifest.teacher["sha256"] if logits else None)
    listing = plan.data.source.fingerprint
    if ckpt is not None and ckpt.get("listing") != listing:
        raise UserError(f"--resume: --data {cfg.data} is not the image folder the run was trained on (another "
                        f"listing); pass the same images")
    if ckpt is not None and ckpt.get("teacher_sha256") != teacher_sha:
        raise UserError(f"--resume: the teacher ({'--teacher' if cfg.teacher else '--logits'}) is not the one the run "
                        f"was trained with (its weights' sha256 differ); pass the same teacher or logits cache")
    classes = plan.data.classes
    tuner = FineTuner(cfg, len(classes), teacher, env, load_init=not cfg.resume)
    gps = cfg.accum_iter * env.world
    layout = Layout(plan.num_groups, gps, cfg.group_size * gps, scaled_lr(cfg.blr, cfg.group_size * gps))
    if layout.steps_left(0) == 0:
        raise UserError(f"an epoch has {plan.num_groups} mixing groups of {cfg.group_size}, fewer than one step "
                        f"takes ({cfg.accum_iter} x {env.world} rank(s)); lower --accum-iter, --group-size or the "
                        f"number of ranks")
    step, epoch, position, best, best_epoch = 0, 0, 0, -1.0, -1
    if ckpt is not None:
        if ckpt["world"] != env.world:
            changes.append(f"world size {ckpt['world']} -> {env.world} (the data order is unchanged)")
        if ckpt["global_batch"] != layout.global_batch:
            changes.append(f"global batch {ckpt['global_batch']} -> {layout.global_batch}: continuing at the same "
                           f"group (the lr scale changes)")
        tuner.load_state_dict(ckpt)
        set_rng_state(ckpt["rng"])
        step, epoch, position = ckpt["step"], ckpt["epoch"], ckpt["position"]
        best, best_epoch = ckpt["best_top1"], ckpt["best_epoch"]
        notes += [f"resume: {n}" for n in changes]
    total = step + sum(layout.steps_left(position if e == epoch else 0) for e in range(epoch, cfg.epochs))
    if env.is_main:
        for line in notes:
            print(line)
        derived = {"mode": cfg.mode, "world_size": env.world, "num_classes": len(classes),
                   "groups_per_epoch": plan.num_groups, "global_batch": layout.global_batch,
                   "steps_per_epoch": layout.steps_left(0), "total_steps": total, "lr": layout.base_lr,
                   "precision": tuner.precision, "cached_epochs": logits.epochs if logits else None}
        write_text_atomic(run / "config.yaml", to_yaml(cfg, {"derived": derived}))
        tqdm.write(f"{cfg.mode} fine-tuning: {cfg.arch} on {len(plan.data)} images of {len(classes)} classes, "
                   f"{env.world} rank(s), batch {cfg.group_size}x{cfg.accum_iter}x{env.world}, lr {layout.base_lr:.3g}, "
                   f"{layout.steps_left(0)} steps/epoch, {cfg.epochs} epochs" + (f", resuming at step {step}" if step else ""))

    log = FinetuneLog(run, env, mode=cfg.mode, global_batch=layout.global_batch, start_step=step)

    def state(at_epoch: int, at_position: int) -> dict:
        return tuner.state_dict() | {
            "stage": STAGE, "step": step, "epoch": at_epoch, "position": at_position, "global_batch": layout.global_batch,
            "rng": rng_state(), "config": dataclasses.asdict(cfg) | {"mode": cfg.mode}, "world": env.world,
            "arch": cfg.arch, "num_classes": len(classes), "classes": list(classes), "img_size": cfg.img_size,
            "distilled": cfg.distilled, "best_top1": best, "best_epoch": best_epoch, "teacher_sha256": teacher_sha,
            "listing": listing}

    def checkpoint(at_epoch: int, at_position: int) -> None:
        log.raise_if_nonfinite()
        save_run_checkpoint(run, env, step, tuner.weights_finite(), lambda: state(at_epoch, at_position))

    def end_of_epoch(done_epoch: int) -> None:
        """Checkpoint at the next epoch's start, then validate (when due) and keep the best weights: a validation
        that fails (an unreadable image, a full disk for best.pt) never costs the epoch's training."""
        nonlocal best, best_epoch
        checkpoint(done_epoch + 1, 0)
        due = cfg.val and cfg.eval_every and ((done_epoch + 1) % cfg.eval_every == 0 or done_epoch + 1 == cfg.epochs)
        if due:
            if env.is_main:
                rng = rng_state()   # the DataLoader draws a seed: keep training's RNG equal to the checkpoint's
                try:
                    result = evaluate(tuner.student, cfg.val, classes=classes, batch_size=cfg.eval_batch_size,
                                      workers=cfg.workers, device=str(env.device), amp=tuner.precision != "fp32",
                                      on_error=cfg.on_error)
                finally:
                    set_rng_state(rng)
                for key in result.get("unreadable", ()):
                    tqdm.write(f"note: validation image {key} cannot be read; left out (--on-error skip)")
                if result["top1"] > best:
                    best, best_epoch = result["top1"], done_epoch
                    _save_best(run, state(done_epoch + 1, 0) | {"epoch": done_epoch}, result)
                    save_checkpoint(run, state(done_epoch + 1, 0))   # the checkpoint records the new best
                log.write_eval(step, done_epoch, result, best)
            env.barrier()   # only rank 0 knows the best so far: it alone writes checkpoints

    last_loss, start_step = float("nan"), step
    t_start = time.perf_counter()
    cached_epochs = logits.epochs if logits else None
    unreadable = UnreadableImages(cfg.on_error, cfg.data)
    with tuner.run_loop(total, step, f"finetune[{cfg.mode}]", log) as loop:
        if position and layout.steps_left(position) == 0 and epoch < cfg.epochs:
            end_of_epoch(epoch)       # resumed with a larger step at an epoch's very end
            epoch, position = epoch + 1, 0
        items = RankItems(cfg, layout, env, epoch, position, cached_epochs)
        loader = DataLoader(_RunGroups(plan, items), batch_size=None, num_workers=cfg.workers, collate_fn=keep_as_is,
                            multiprocessing_context=mp_context(cfg.workers),
                            prefetch_factor=cfg.prefetch if cfg.workers else None)
        stream = iter(loader)
        while epoch < cfg.epochs:
            t_wait = time.perf_counter()
            got = [next(stream) for _ in range(cfg.accum_iter)]
            wait = time.perf_counter() - t_wait
            groups = [g for _, g in got]
            for note in (n for g in groups for n in unreadable.check(g)):
                tqdm.write(note)
            stored = [logits.read(g.epoch, g.group) if logits else None for g in groups]
            lr = lr_at(cfg, layout, epoch, position)
            log.add(step, tuner.step(groups, stored, lr), wait)
            step += 1
            position += layout.groups_per_step
            loop.bar.update(1)
            epoch_done = layout.steps_left(position) == 0
            if step % cfg.log_every == 0 or epoch_done:
                last_loss = log.write(step, epoch, lr)
            saved = False
            if epoch_done:
                end_of_epoch(epoch)
                log.restart_clock()
                epoch, position, saved = epoch + 1, 0, True
            elif step % cfg.save_every == 0:
                checkpoint(epoch, position)
                saved = True
            if tuner.stop_requested(step, cfg.stop_after, cfg.log_every, loop.signals, work_left=epoch < cfg.epochs):
                if not saved:
                    checkpoint(epoch, position)
                raise StopRun
    summary = tuner.summary(cfg.mode, step, start_step, loop.stopped_early, time.perf_counter() - t_start, last_loss,
                            layout.global_batch, run, best_top1=best if best >= 0 else None,
                            best_epoch=best_epoch if best_epoch >= 0 else None)
    summary["best"] = str(run / BEST) if (run / BEST).exists() else None
    summary["unreadable"] = sorted(unreadable.seen)
    if env.is_main:
        tqdm.write(tuner.summary_line(summary, total) +
                   (f"; best top-1 {best:.2f}% (epoch {best_epoch}) in {run / BEST}" if best >= 0 else ""))
    return summary


def _save_best(run: Path, state: dict, result: dict) -> None:
    """RUN/best.pt: the weights and what evaluate / export need (no optimizer), written atomically.
    Its `epoch` is the epoch just validated (a checkpoint's is the epoch it resumes at)."""
    keep = ("model", "stage", "step", "epoch", "arch", "num_classes", "classes", "img_size", "distilled")
    best = {k: state[k] for k in keep} | {"val": {k: float(v) for k, v in result.items() if k != "unreadable"}}
    save_torch_file(run / BEST, best, "free space, then continue with --resume (this epoch's checkpoint was saved before "
                                      "validation)")

