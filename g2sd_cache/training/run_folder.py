"""Run-folder conventions shared by `train` (stage 1) and `finetune` (stage 2).

A run folder holds `checkpoint.pt` (atomic), `config.yaml`, `metrics.jsonl` and `tb/`. What the two
trainers do the same way lives here, once:

- `prepare_run_folder(out, resume, env)`: the one place that decides whether `--out` may be used (the
  ownership checks plug in here);
- `StopSignals`: SIGTERM / Ctrl-C ask the loop to save a checkpoint and stop after the current step;
- `any_rank(flag, env)`: whether any rank has `flag` set (ranks must agree on when to stop);
- `save_run_checkpoint(...)`: a checkpoint is written only from finite weights, by rank 0, then all
  ranks wait for it;
- `StopRun`: raised inside a loop to end the run early after its checkpoint.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from g2sd_cache.common.checkpoint import CHECKPOINT, save_checkpoint
from g2sd_cache.common.dist import DistEnv
from g2sd_cache.common.errors import UserError
from g2sd_cache.cache.ownership import RUN_LOCK, FolderLock, claim_run_folder


class StopRun(Exception):
    """Raised inside a training loop to end the run early (signal / --stop-after) after a checkpoint."""


# Rank 0's lock on each run folder it trains into, from `prepare_run_folder` to `release_run_folder`.
_RUN_LOCKS: dict[str, FolderLock] = {}


def prepare_run_folder(out: str | Path, resume: bool, env: DistEnv, command: str = "train") -> Path:
    """Rank 0 claims the run folder `out` (ownership.claim_run_folder: a new or empty folder, or one of our
    runs; never a cache, a dataset or a folder of someone else's files) and takes its lock (RUN_LOCK, an
    exclusive flock held until `release_run_folder` or the process ends), then every rank waits. A second
    `command` into the same folder is refused in one line naming the holder (pid, host); a folder that
    already holds a run is refused unless `resume`."""
    run = Path(out)
    if env.is_main:
        claim_run_folder(run, resume)
        lock = FolderLock(run, RUN_LOCK, command)
        try:
            if (run / CHECKPOINT).exists() and not resume:
                raise UserError(f"{run} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose "
                                f"another --out")
        except BaseException:
            lock.release()
            raise
        _RUN_LOCKS[str(run)] = lock
    env.barrier()
    return run


def release_run_folder(out: str | Path) -> None:
    """Drop this process's lock on the run folder `out` (nothing if it holds none)."""
    lock = _RUN_LOCKS.pop(str(Path(out)), None)
    if lock is not None:
        lock.release()


class StopSignals:
    """`signals = StopSignals().install()` ... `signals.restore()`: SIGTERM and SIGINT (Ctrl-C) set
    `signals.requested`; a second Ctrl-C aborts at once (the last checkpoint is kept). Outside the main
    thread signals cannot be caught, and nothing is installed. `restore` puts the previous handlers back."""

    def __init__(self):
        self.requested = threading.Event()
        self._handlers: dict = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._handlers = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, sig, frame) -> None:
        if sig == signal.SIGINT and self.requested.is_set():
            raise KeyboardInterrupt
        if sig == signal.SIGINT:
            tqdm.write("interrupted: saving a checkpoint after this step (Ctrl-C again to abort without saving)")
        self.requested.set()

    def restore(self) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._handlers = {}


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is True on at least one (a collective: every rank must call it)."""
    if env.world == 1:
        return flag
    t = torch.tensor(float(flag), device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def save_run_checkpoint(run: Path, env: DistEnv, step: int, finite: bool, state: Callable[[], dict]) -> None:
    """Write `state()` to RUN/checkpoint.pt on rank 0 if the weights are `finite`, then wait for all ranks.
    Non-finite weights stop the run with the last good checkpoint left in place."""
    if not finite:
        raise UserError(f"the student's weights became NaN or Inf by step {step}; stopped without saving. The "
                        f"last good checkpoint {run / CHECKPOINT} is kept (if one was saved): lower --blr or set "
                        f"--clip-grad")
    if env.is_main:
        save_checkpoint(run, state())
    env.barrier()
