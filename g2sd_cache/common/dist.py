"""torch.distributed set-up shared by extract and train (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""
from __future__ import annotations

from typing import Any, Callable

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from g2sd_cache.common.errors import UserError


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


def init_distributed(device_name: str, timeout_hours: float = 72.0) -> DistEnv:
    """Join the torchrun process group if there is one (nccl on CUDA, gloo on CPU).
    The long timeout lets ranks with more shards finish before the final barrier."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(hours=timeout_hours))
    return DistEnv(rank, world, local_rank, device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def run_on_ranks(cfg, body: Callable[[Any, DistEnv], dict], release: Callable[[], None] | None = None) -> dict:
    """What every command of a torchrun job does around its work: `cfg.validate()`, join the process group,
    `body(cfg, env)`, and always leave the group again (after `release()`, e.g. an output folder's lock)."""
    cfg.validate()
    env = init_distributed(cfg.device)
    try:
        return body(cfg, env)
    finally:
        if release is not None:
            release()
        shutdown_distributed()
