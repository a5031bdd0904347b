"""What both stages' trainers share, defined once: `Trainer`, the base of stage 1's `Distiller`
(generic/step.py) and stage 2's `FineTuner` (specific/step.py).

A trainer owns the student, its DDP wrapper (`model`), AdamW, the loss scaler and the student's autocast; it
gives the optimizer step after a step's backward passes, the finite-weights check, its state for a
checkpoint, and the two pieces of the run loop's end that both commands share: when to stop early
(`stop_requested`) and the run's summary (`summary`, `summary_line`). What a step computes (its forward
passes and loss) is the subclass's.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from tqdm import tqdm

import torch
from torch.nn.parallel import DistributedDataParallel

from g2sd_cache.common.checkpoint import CHECKPOINT
from g2sd_cache.common.dist import DistEnv
from g2sd_cache.training.precision import resolve_precision
from g2sd_cache.training.run_folder import StopRun, StopSignals, any_rank


class Trainer:
    """`student` (already on `env.device`), AdamW over `param_groups` (a group's `lr_scale`, stage 2's layer-wise
    decay, multiplies the lr), a GradScaler enabled under fp16, and autocast in `precision` (auto, bf16, fp16,
    fp32; see training/precision.py). `clip_grad`: the gradient norm bound (None: no clipping)."""

    def __init__(self, student: torch.nn.Module, param_groups: list[dict], env: DistEnv, precision: str,
                 clip_grad: float | None, betas: tuple[float, float] = (0.9, 0.999)):
        device = env.device
        self.env, self.clip_grad = env, clip_grad
        self.precision = resolve_precision(precision, device)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
        self.student = student
        self.optimizer = torch.optim.AdamW(param_groups, lr=0.0, betas=betas)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None) \
            if env.world > 1 else student

    def optimizer_step(self, lr: float) -> None:
        """After the step's backward passes: the lr of every parameter group (times its `lr_scale`; 1 when
        absent), optional clipping of the unscaled gradients, the (possibly scaled) step, gradients cleared."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def weights_finite(self) -> bool:
        """Whether every parameter is finite (waits for the device: call it at log and save time)."""
        return bool(torch.stack([p.detach().isfinite().all() for p in self.student.parameters()]).all())

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.load_student(state["model"])
        self.load_optimizer(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def load_student(self, weights: dict) -> None:
        self.student.load_state_dict(weights)

    def load_optimizer(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    # -- the run loop's frame and end --------------------------------------------------------------
    def run_loop(self, total_steps: int, start_step: int, desc: str, log) -> "RunLoop":
        return RunLoop(total_steps, start_step, desc, log, self.env.is_main)

    def stop_requested(self, step: int, stop_after: int | None, log_every: int, signals: StopSignals,
                       work_left: bool = True) -> bool:
        """Whether to end the run after `step` as if preempted: --stop-after reached, or a signal on any rank.
        --stop-after is the same step on every rank; a signal may reach ranks at different steps, so ranks agree
        on it at log steps (every step when alone). Never when no `work_left`. Every rank must call it."""
        stop = work_left and stop_after is not None and step >= stop_after
        if self.env.world == 1 or step % log_every == 0:
            stop = stop or (work_left and any_rank(signals.requested.is_set(), self.env))
        return stop

    @staticmethod
    def summary(mode: str, step: int, start_step: int, stopped_early: bool, seconds: float, final_loss: float,
                global_batch: int, run: Path, **extra) -> dict:
        """What `train` / `finetune` return: the run's end, its speed this run, where its checkpoint is."""
        done = step - start_step
        return {"mode": mode, "steps": step, "steps_this_run": done, "stopped_early": stopped_early,
                "seconds": seconds, "final_loss": final_loss, **extra,
                "samples_per_s": done * global_batch / seconds if seconds > 0 else 0.0,
                "checkpoint": str(run / CHECKPOINT)}

    @staticmethod
    def summary_line(summary: dict, total_steps: int) -> str:
        return (f"{'stopped' if summary['stopped_early'] else 'finished'} at step {summary['steps']}/{total_steps}: "
                f"loss {summary['final_loss']:.4f}, {summary['samples_per_s']:.1f} samples/s; checkpoint "
                f"{summary['checkpoint']}")


class RunLoop:
    """`with trainer.run_loop(total, start, desc, log) as loop:` frames the step loop of `train` / `finetune`: a
    progress bar on rank 0 (`loop.bar`), SIGTERM / Ctrl-C caught (`loop.signals`, see `Trainer.stop_requested`);
    however the loop ends, the bar and `log` are closed and the signal handlers restored. `raise StopRun` inside
    ends the run early after its checkpoint: `loop.stopped_early`."""

    def __init__(self, total_steps: int, start_step: int, desc: str, log, show: bool):
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", desc=desc, disable=not show,
                        dynamic_ncols=True)
        self.log, self.stopped_early = log, False
        self.signals = StopSignals()

    def __enter__(self) -> "RunLoop":
        self.signals.install()
        return self

    def __exit__(self, kind, error, trace) -> bool:
        self.bar.close()
        self.log.close()
        self.signals.restore()
        self.stopped_early = kind is StopRun
        return self.stopped_early
