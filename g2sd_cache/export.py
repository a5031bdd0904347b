"""`g2sd-cache export RUN --out FILE`: the trained student's encoder as a timm ViT state dict.

The file loads with strict keys into `timm.create_model('vit_small_patch16_224', num_classes=0)`
(or the tiny one, per the student preset), ready for G2SD's specific distillation / fine-tuning.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .errors import UserError
from .models import STUDENT_PRESETS, build_student


def export_encoder(run: str, out: str) -> dict:
    ckpt = load_checkpoint(Path(run))
    student = build_student(ckpt["student"], ckpt["target_dim"], ckpt["img_size"])
    student.load_state_dict(ckpt["model"])
    state = student.encoder_state_dict()
    out_path = Path(out)
    if out_path.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {out_path / 'encoder.pth'}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, out_path)
    return {"timm_model": STUDENT_PRESETS[ckpt["student"]].timm_name, "step": ckpt["step"],
            "tensors": len(state), "params": sum(v.numel() for v in state.values()), "path": str(out_path)}
