"""Training checkpoints: written atomically, read back with a clear error when absent or unreadable.

One file, RUN/checkpoint.pt, replaced in place (temporary file, then rename), so a crash during a save
leaves the previous checkpoint intact and a reader never sees half a file.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run: Path, state: dict) -> Path:
    path = run / CHECKPOINT
    tmp = path.with_name(f".{CHECKPOINT}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(run: Path, hint: str = "pass the --out folder of a `g2sd-cache train` run") -> dict:
    path = run / CHECKPOINT
    if not path.is_file():
        raise UserError(f"{run} has no {CHECKPOINT}; {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
