"""Reading weight files that users hand us, for the specific (second) stage.

Every file is untrusted: `torch.load(weights_only=True)`, with exactly two extra types allowed —
`argparse.Namespace` (the official MAE / G2SD training scripts pickle their arguments next to the weights)
and the numpy array pieces of numpy's RNG state (our own run checkpoints keep it). Anything else is refused
with a one-line error.

Accepted containers: a bare state dict (`g2sd-cache export --format timm`, timm files) or one under
`'model'` (official MAE / G2SD checkpoints, `--format mae`), and a stage-1 run folder (`RUN/checkpoint.pt`,
whose `'model'` is the whole G2SD student: its encoder is the keys under `models.ENCODER_PREFIXES`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CHECKPOINT
from .errors import UserError
from .models import ENCODER_PREFIXES

# numpy 2 moved `_reconstruct` to numpy._core; numpy 1 has it in numpy.core.
_np_core = getattr(np, "_core", None) or np.core
_SAFE_TYPES = [argparse.Namespace, np.ndarray, np.dtype, _np_core.multiarray._reconstruct,
               type(np.dtype(np.uint32))]


def read_weights_file(path: str | Path, flag: str) -> tuple[Path, object]:
    """(the file read, its unpickled content) for weight file `path` (a file, or a run folder holding
    checkpoint.pt), loaded with `weights_only=True` and the few extra types above."""
    p = Path(path)
    if p.is_dir():
        if not (p / CHECKPOINT).is_file():
            raise UserError(f"{flag} {path} is a folder without {CHECKPOINT}; pass a run folder or a weight file")
        p = p / CHECKPOINT
    elif not p.is_file():
        raise UserError(f"{flag} {path} does not exist; pass a weight file (.pth) or a run folder")
    try:
        with torch.serialization.safe_globals(_SAFE_TYPES):
            return p, torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, not a torch file, or pickles types we refuse to run
        raise UserError(f"{flag}: cannot read {p}: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e


def read_state_dict(path: str | Path, flag: str) -> dict[str, torch.Tensor]:
    """The tensors of weight file `path` (a file, or a run folder holding checkpoint.pt).
    `flag` names the option the path came from, for error messages (e.g. '--teacher')."""
    p, ckpt = read_weights_file(path, flag)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{flag}: {p} holds no state dict (expected tensors by name, bare or under 'model')")
    return state


def encoder_of(state: dict[str, torch.Tensor], flag: str, path: str | Path) -> dict[str, torch.Tensor]:
    """The ViT encoder's tensors (timm names) from a stage-1 export, a stage-1 run's whole student, an MAE
    pre-training checkpoint or a timm classifier; decoder and head keys are left out."""
    encoder = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
    missing = [k for k in needed if k not in encoder]
    if missing:
        raise UserError(f"{flag} {path} holds no ViT encoder (missing {', '.join(missing)}); pass the output of "
                        f"`g2sd-cache export`, a stage-1 run folder, or an MAE checkpoint")
    return encoder
