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

`RunLog` is stage 1's report, built on what every trainer shares (training/metrics.py: `MetricsWriter`,
`NonFiniteGuard`); stage 2's is specific/log.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from g2sd_cache.common.dist import DistEnv
from g2sd_cache.generic.step import StepResult
from g2sd_cache.generic.stream import Batch
from g2sd_cache.training.metrics import MetricsWriter, NonFiniteGuard, truncate_metrics


class RunLog:
    def __init__(self, run: Path, env: DistEnv, *, mode: str, global_batch: int, start_step: int,
                 log_samples: bool):
        self.run, self.env, self.mode, self.global_batch = run, env, mode, global_batch
        device = env.device
        self.writer = MetricsWriter(run, env, start_step)
        self.samples = open(run / f"samples-rank{env.rank}.jsonl", "a") if log_samples else None
        if self.samples and start_step:
            self.samples.close()
            truncate_metrics(run / f"samples-rank{env.rank}.jsonl", start_step - 1)
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
