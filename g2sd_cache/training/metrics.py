"""What every trainer writes about its run: metrics.jsonl and TensorBoard (rank 0, `MetricsWriter`) and
the first step whose loss was NaN/Inf, found without a device sync per step (`NonFiniteGuard`).

After a resume, records past the checkpoint's step are dropped from metrics.jsonl and TensorBoard (they
belong to the steps that are about to be redone), so no step appears twice. Stage 1's report on top of
these is generic/runlog.py, stage 2's specific/log.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from g2sd_cache.common.checkpoint import CHECKPOINT
from g2sd_cache.common.dist import DistEnv
from g2sd_cache.common.errors import UserError

METRICS = "metrics.jsonl"


class MetricsWriter:
    """RUN/metrics.jsonl and RUN/tb on rank 0 (other ranks write nothing). Opened at `start_step`, it first
    drops the records of steps after it (a resumed run redoes them), in the file and in TensorBoard."""

    def __init__(self, run: Path, env: DistEnv, start_step: int):
        self.metrics = self.tb = None
        if env.is_main:
            truncate_metrics(run / METRICS, start_step)
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


def truncate_metrics(path: Path, last_step: int) -> None:
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
