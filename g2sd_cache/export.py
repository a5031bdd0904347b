"""`g2sd-cache export RUN --out FILE [--format timm|mae]`: the trained student's encoder for the next stage.

- `timm` (default): a bare state dict that loads with strict keys into
  `timm.create_model('vit_small_patch16_224', num_classes=0)` (or the tiny one, per the student preset).
- `mae`: `{"model": state_dict}`, the container that MAE's fine-tuning script (facebookresearch/mae
  main_finetune.py, `--finetune`) and G2SD's specific distillation (pengzhiliang/G2SD main_finetune_dis.py)
  read. The names are the same (MAE's models_vit is timm's VisionTransformer); those scripts load with
  `strict=False`, so the classifier head (and `fc_norm` under global pooling, where `norm` goes unused)
  is what they report missing, and MAE asserts exactly that.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .errors import UserError
from .fsutil import atomic_write
from .models import STUDENT_PRESETS, build_student, load_student_state

FORMATS = ("timm", "mae")


def export_encoder(run: str, out: str, fmt: str = "timm") -> dict:
    """Write RUN's student encoder to `out` in format `fmt`; returns what the CLI prints (incl. `notes`)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out_path = Path(out)
    if out_path.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {out_path / 'encoder.pth'}")
    ckpt = load_checkpoint(Path(run))
    student = build_student(ckpt["student"], ckpt["target_dim"], ckpt["img_size"])
    notes = load_student_state(student, ckpt["model"])
    state = student.encoder_state_dict()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda f: torch.save(state if fmt == "timm" else {"model": state}, f))
    name = STUDENT_PRESETS[ckpt["student"]].timm_name
    # A student trained at another crop size has another position table: timm needs the same img_size to load it.
    size = ckpt["img_size"]
    timm_call = (f"timm.create_model('{name}', num_classes=0" + (f", img_size={size}" if size != 224 else "") + ")"
                 if name else None)
    return {"format": fmt, "timm_model": name, "timm_call": timm_call, "step": ckpt["step"],
            "tensors": len(state), "params": sum(v.numel() for v in state.values()), "path": str(out_path),
            "notes": notes}
