"""What a training run reports: metrics.jsonl, TensorBoard, console lines, samples-rankN.jsonl, the
interval meter, the non-finite guard and the cross-rank reductions — one object instead of loose
accumulators in the training loop.

Every metric is global (all ranks) unless its name says otherwise:
- `loss`: the mean smooth-L1 per valid sample over the interval's steps (each step's loss is its global
  mean; ranks' shares are summed);
- `replay_rel_rmse`: relative RMS error of cached vs live targets, averaged over every micro-batch with valid
  samples on every rank; `replay_max_abs_err`: the largest absolute error on any rank (MAX, not SUM);
- `skipped_views`: unreadable samples left out (summed over ranks);
- `samples_per_s`: global samples (batch x accum x world) per second of this interval;
  `data_wait_frac_rank0`: the fraction of rank 0's interval spent waiting for data.

After a resume, records past the checkpoint's step are dropped from metrics.jsonl and TensorBoard (they
belong to the steps that are about to be redone), so no step appears twice.

`MetricsWriter` (metrics.jsonl + TensorBoard, rank 0) and `NonFiniteGuard` (the first step whose loss was
NaN/Inf, without a device sync per step) are what every trainer shares; `RunLog` is stage 1's report built
on them (stage 2's is in finetune_log.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import CHECKPOINT
from .dist import DistEnv
from .errors import UserError

if TYPE_CHECKING:  # stage 1's types; importing them at run time would pull distill and stream into stage 2
    from .distill import StepResult
    from .stream import Batch

METRICS = "metrics.jsonl"


class MetricsWriter:
    """RUN/metrics.jsonl and RUN/tb on rank 0 (other ranks write nothing). Opened at `start_step`, it first
    drops the records of steps after it (a resumed run redoes them), in the file and in TensorBoard."""

    def __init__(self, run: Path, env: DistEnv, start_step: int):
        self.metrics = self.tb = None
        if env.is_main:
            _truncate_metrics(run / METRICS, start_step)
            self.metrics = open(run / METRICS, "a")
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict, section: str = "train") -> None:
        """Append `record` (it has a "step") to metrics.jsonl and its numbers to TensorBoard as
        `section/name`; a no-op off rank 0."""
        if self.metrics is None:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for k, v in record.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(f"{section}/{k}", v, record["step"])

    def close(self) -> None:
        for f in (self.metrics, self.tb):
            if f is not None:
                f.close()


class NonFiniteGuard:
    """Remembers the first step whose loss was NaN or Inf, as a device tensor (no sync per step)."""

    def __init__(self, run: Path, device: torch.device):
        self.run = run
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), step, self.first_bad)

    def raise_if_nonfinite(self) -> None:
        bad = int(self.first_bad)
        if bad >= 0:
            raise UserError(f"the loss became NaN or Inf at step {bad + 1}; stopped. The last good checkpoint "
                            f"{self.run / CHECKPOINT} is kept (if one was saved): lower --blr, set --clip-grad "
                            f"or check the data")


class RunLog:
    def __init__(self, run: Path, env: DistEnv, *, mode: str, global_batch: int, start_step: int,
                 log_samples: bool):
        self.run, self.env, self.mode, self.global_batch = run, env, mode, global_batch
        device = env.device
        self.writer = MetricsWriter(run, env, start_step)
        self.samples = open(run / f"samples-rank{env.rank}.jsonl", "a") if log_samples else None
        if self.samples and start_step:
            self.samples.close()
            _truncate_metrics(run / f"samples-rank{env.rank}.jsonl", start_step - 1)
            self.samples = open(run / f"samples-rank{env.rank}.jsonl", "a")
        self.guard = NonFiniteGuard(run, device)
        self._zero(device)

    def _zero(self, device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.rel_sum = torch.zeros((), device=device)
        self.max_abs = torch.zeros((), device=device)
        self.rel_batches = self.skipped = self.steps = 0
        self.wait = 0.0
        self.t0 = time.perf_counter()

    # -- per step ---------------------------------------------------------------------------------
    def log_batches(self, step: int, epoch: int, batches: list[Batch]) -> None:
        """samples-rankN.jsonl: which views step `step` used (audits, tests)."""
        if self.samples:
            for b in batches:
                self.samples.write(json.dumps({"step": step, "epoch": epoch, "index": b.index.tolist(),
                                               "view": b.view.tolist(), "key": b.keys,
                                               "valid": b.valid.tolist()}) + "\n")

    def add(self, step: int, result: StepResult, wait_s: float) -> None:
        """Account optimizer step `step` (0-based) without waiting for the device."""
        self.loss_sum += result.loss
        self.rel_sum += result.replay_rel_sum
        self.max_abs = torch.maximum(self.max_abs, result.replay_max_abs)
        self.rel_batches += result.replay_batches
        self.skipped += result.skipped
        self.steps += 1
        self.wait += wait_s
        self.guard.add(step, result.loss)

    # -- per interval -----------------------------------------------------------------------------
    def write(self, step: int, epoch: int, lr: float) -> float:
        """Reduce the interval over ranks, write metrics.jsonl / TensorBoard / the console (rank 0).
        Returns the interval's loss."""
        device = self.loss_sum.device
        sums = torch.stack([self.loss_sum, self.rel_sum, torch.tensor(float(self.rel_batches), device=device),
                            torch.tensor(float(self.skipped), device=device)])
        maxes = self.max_abs.clone()
        if self.env.world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        self.raise_if_nonfinite()
        loss_sum, rel_sum, rel_batches, skipped = sums.tolist()
        now = time.perf_counter()
        elapsed = now - self.t0
        record = {"step": step, "epoch": epoch, "loss": loss_sum / max(1, self.steps), "lr": lr,
                  "samples_per_s": self.steps * self.global_batch / elapsed,
                  "data_wait_frac_rank0": self.wait / elapsed, "skipped_views": int(skipped)}
        if self.mode == "replay":
            record.update(replay_rel_rmse=rel_sum / max(1.0, rel_batches), replay_max_abs_err=float(maxes))
        self._zero(device)
        if self.env.is_main:
            self.writer.write(record)
            line = (f"step {step} epoch {epoch} loss {record['loss']:.4f} lr {lr:.3g} "
                    f"{record['samples_per_s']:.1f} samples/s data wait {100 * record['data_wait_frac_rank0']:.0f}%")
            if self.mode == "replay":
                line += f" target rel err {record['replay_rel_rmse']:.2e} max {record['replay_max_abs_err']:.2e}"
            if skipped:
                line += f" skipped {int(skipped)}"
            tqdm.write(line)
        return record["loss"]

    def raise_if_nonfinite(self) -> None:
        self.guard.raise_if_nonfinite()

    def close(self) -> None:
        self.writer.close()
        if self.samples is not None:
            self.samples.close()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records of steps <= last_step (the steps a resumed run will not redo)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:   # a line cut short by a kill
            continue
    path.write_text("".join(k + "\n" for k in kept))
