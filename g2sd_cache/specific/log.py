"""What a `finetune` run reports, on the shared machinery of training/runlog.py (metrics.jsonl, TensorBoard, the
non-finite guard, no duplicate steps after a resume).

Training records (every --log-every steps and at each epoch's end), global over ranks:
- `loss`, `loss_gt`, `loss_dist`: the mean per step of the step's loss (ranks averaged); `loss_gt` is the
  soft-target cross-entropy of the cls head, `loss_dist` the cross-entropy of the dist head against the
  teacher's argmax (0 without a teacher); loss = (loss_gt + loss_dist) / 2 when distilling;
- `lr` (the top layer's; layer l gets lr x layer_decay^(depth + 1 - l)), `samples_per_s` (global),
  `data_wait_frac_rank0`;
- replay only: `replay_argmax_agreement` (fraction of samples whose live teacher argmax equals the stored
  one; 1.0 is the target in fp32) and `replay_max_abs_logit_err` (stored fp16 top-k vs live logits).
Validation records (section `val` in TensorBoard): `val_top1`, `val_top5`, `val_loss`, `val_n`, `best_top1`.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from g2sd_cache.common.dist import DistEnv
from g2sd_cache.training.metrics import MetricsWriter, NonFiniteGuard
from g2sd_cache.specific.step import SDStepResult


class FinetuneLog:
    def __init__(self, run: Path, env: DistEnv, *, mode: str, global_batch: int, start_step: int):
        self.env, self.mode, self.global_batch = env, mode, global_batch
        self.writer = MetricsWriter(run, env, start_step)
        self.guard = NonFiniteGuard(run, env.device)
        self._zero()

    def _zero(self) -> None:
        device = self.env.device
        self.sums = torch.zeros(5, device=device)        # loss, loss_gt, loss_dist, agree, compared
        self.max_err = torch.zeros((), device=device)
        self.steps = 0
        self.wait = 0.0
        self.t0 = time.perf_counter()

    def add(self, step: int, result: SDStepResult, wait_s: float) -> None:
        """Account optimizer step `step` (0-based) without waiting for the device."""
        self.sums += torch.stack([result.loss, result.loss_gt, result.loss_dist, result.agree.float(),
                                  torch.tensor(float(result.compared), device=self.sums.device)])
        self.max_err = torch.maximum(self.max_err, result.max_logit_err)
        self.steps += 1
        self.wait += wait_s
        self.guard.add(step, result.loss)

    def write(self, step: int, epoch: int, lr: float) -> float:
        """Reduce the interval over ranks; rank 0 writes metrics.jsonl, TensorBoard and a console line.
        Returns the interval's mean loss."""
        sums, max_err = self.sums.clone(), self.max_err.clone()
        if self.env.world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(max_err, op=dist.ReduceOp.MAX)
        self.guard.raise_if_nonfinite()
        loss, gt, dis, agree, compared = sums.tolist()
        per_step = max(1, self.steps) * self.env.world
        elapsed = time.perf_counter() - self.t0
        record = {"step": step, "epoch": epoch, "loss": loss / per_step, "loss_gt": gt / per_step,
                  "loss_dist": dis / per_step, "lr": lr, "samples_per_s": self.steps * self.global_batch / elapsed,
                  "data_wait_frac_rank0": self.wait / elapsed}
        if self.mode == "replay":
            record.update(replay_argmax_agreement=agree / max(1.0, compared), replay_max_abs_logit_err=float(max_err))
        self._zero()
        if self.env.is_main:
            self.writer.write(record)
            line = (f"step {step} epoch {epoch} loss {record['loss']:.4f} (gt {record['loss_gt']:.4f}, dist "
                    f"{record['loss_dist']:.4f}) lr {lr:.3g} {record['samples_per_s']:.1f} samples/s data wait "
                    f"{100 * record['data_wait_frac_rank0']:.0f}%")
            if self.mode == "replay":
                line += (f" teacher argmax agreement {100 * record['replay_argmax_agreement']:.2f}% max logit err "
                         f"{record['replay_max_abs_logit_err']:.2e}")
            tqdm.write(line)
        return record["loss"]

    def write_eval(self, step: int, epoch: int, result: dict, best_top1: float) -> None:
        """Rank 0: one validation record (accuracy in percent)."""
        record = {"step": step, "epoch": epoch, "val_top1": result["top1"], "val_top5": result["top5"],
                  "val_loss": result["loss"], "val_n": result["n"], "best_top1": best_top1}
        self.writer.write(record, section="val")
        tqdm.write(f"epoch {epoch} validation: top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% loss "
                   f"{result['loss']:.4f} on {result['n']} images (best top-1 {best_top1:.2f}%)")

    def restart_clock(self) -> None:
        """Leave validation and checkpointing out of the next interval's samples/s."""
        self.t0 = time.perf_counter()
        self.wait = 0.0

    def raise_if_nonfinite(self) -> None:
        self.guard.raise_if_nonfinite()

    def close(self) -> None:
        self.writer.close()
