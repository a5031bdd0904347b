"""torch.distributed set-up shared by extract and train (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from g2sd_cache.common.errors import UserError

DIST_TIMEOUT_MIN = 30.0      # minutes a collective may wait for the other ranks (--dist-timeout)
# Options a rank may set for itself: where it runs and how it loads data; nothing the run's result depends on.
RANK_LOCAL = ("device", "workers", "prefetch",
              # where a node keeps its copy of a cache on an object store, and how it downloads: per node
              "local_cache", "local_cache_limit", "prefetch_files", "download_threads", "staging")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU if there is one, else CPU; 'cuda' -> cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def init_distributed(device_name: str, timeout_min: float = DIST_TIMEOUT_MIN) -> DistEnv:
    """Join the torchrun process group if there is one (nccl on CUDA, gloo on CPU). A collective that waits longer
    than `timeout_min` minutes for another rank fails instead of hanging (the longest legitimate wait: one rank's
    extra shard, or rank 0's validation, while the others sit in a barrier)."""
    if not (math.isfinite(timeout_min) and timeout_min > 0):
        raise UserError(f"--dist-timeout {timeout_min}: must be a positive number of minutes")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_min))
    return DistEnv(rank, world, local_rank, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_ranks_agree(cfg, env: DistEnv, command: str) -> None:
    """Refuse, on every rank and in the same line, a run whose ranks were given different arguments (another --steps
    would hang in a collective, another --teacher mix two teachers in one cache): one all-gather of every rank's
    options (the frozen config `cfg` but RANK_LOCAL) at start, before anything is read or written."""
    if env.world == 1:
        return
    mine = {k: repr(v) for k, v in dataclasses.asdict(cfg).items() if k not in RANK_LOCAL}
    every: list[dict | None] = [None] * env.world
    dist.all_gather_object(every, mine)
    for rank, theirs in enumerate(every):
        differ = [k for k in every[0] if theirs.get(k) != every[0][k]]
        if differ:
            shown = ", ".join(f"{k} {theirs.get(k)} (rank 0: {every[0][k]})" for k in differ[:3])
            raise UserError(f"the ranks of this {command} were started with different arguments: rank {rank} has "
                            f"{shown}{' and more' if len(differ) > 3 else ''}; start every rank with the same "
                            f"options (torchrun passes one command line to all)")


def run_on_ranks(cfg, body: Callable[[Any, DistEnv], dict], release: Callable[[], None] | None = None,
                 command: str = "run") -> dict:
    """What every command of a torchrun job does around its work: `cfg.validate()`, join the process group (its
    collectives time out after `cfg.dist_timeout` minutes), check that every rank got the same options
    (`check_ranks_agree`), `body(cfg, env)`, and always leave the group again (after `release()`, e.g. an output
    folder's lock). `command` names the command in the ranks' refusal."""
    cfg.validate()
    env = init_distributed(cfg.device, cfg.dist_timeout)
    try:
        check_ranks_agree(cfg, env, command)
        return body(cfg, env)
    finally:
        if release is not None:
            release()
        shutdown_distributed()
