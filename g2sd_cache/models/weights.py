"""Reading weight files that users hand us, for the specific (second) stage.

Every file is untrusted: `checkpoint.load_untrusted` (weights-only; `argparse.Namespace` is the one extra
type, which the official MAE / G2SD training scripts pickle next to the weights). Anything else is refused
with a one-line error, never unpickled.

Accepted containers: a bare state dict (`g2sd-cache export --format timm`, timm files) or one under
`'model'` (official MAE / G2SD checkpoints, `--format mae`), and a stage-1 run folder (`RUN/checkpoint.pt`,
whose `'model'` is the whole G2SD student: its encoder is the keys under `models.ENCODER_PREFIXES`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from g2sd_cache.common.checkpoint import CHECKPOINT, load_untrusted
from g2sd_cache.common.errors import UserError
from g2sd_cache.models.mae import ENCODER_PREFIXES

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
    return p, load_untrusted(p, f"{flag}:")


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
