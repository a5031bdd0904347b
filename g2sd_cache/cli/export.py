"""`g2sd-cache export RUN --out FILE [--format timm|mae]`: a trained student for the next stage or for use.

Stage 1 (a `train` run): the student's encoder.

- `timm` (default): a bare state dict that loads with strict keys into
  `timm.create_model('vit_small_patch16_224', num_classes=0)` (or the tiny one, per the student preset).
- `mae`: `{"model": state_dict}`, the container that MAE's fine-tuning script (facebookresearch/mae
  main_finetune.py, `--finetune`) and G2SD's specific distillation (pengzhiliang/G2SD main_finetune_dis.py)
  read. The names are the same (MAE's models_vit is timm's VisionTransformer); those scripts load with
  `strict=False`, so the classifier head (and `fc_norm` under global pooling, where `norm` goes unused)
  is what they report missing, and MAE asserts exactly that.

Stage 2 (a `finetune` run, or its best.pt): the whole classifier (`export_classifier`).
- `timm`: the distilled student as timm's distilled ViT, `deit_{tiny,small,base}_distilled_patch16_224`
  (`num_classes=C`), strict keys and identical eval logits: timm's [cls, dist, patches] with the dist
  token's position row set to zero is our forward (classifier.to_timm_distilled). A plain fine-tuned
  student (no teacher) is timm's `vit_*_patch16_224` with `global_pool='avg'` as it is.
- `mae`: `{"model": state_dict}` in G2SD's / MAE's models_vit layout (G2SD's distilled ViT keeps no
  position row for its dist token, as ours), what their evaluation scripts (`--eval --resume`) read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from g2sd_cache.cli.command import Command
from g2sd_cache.common.checkpoint import CHECKPOINT, load_checkpoint
from g2sd_cache.models.classifier import CLASSIFIER_PRESETS, DistilledViT, to_timm_distilled
from g2sd_cache.common.errors import UserError
from g2sd_cache.specific.finetuned import BEST, read_finetuned
from g2sd_cache.common.fsutil import atomic_write, write_text_atomic
from g2sd_cache.cache.ownership import TOOL
from g2sd_cache.models.mae import STUDENT_PRESETS, build_student, load_student_state

FORMATS = ("timm", "mae")
EXPORT_RECORD = ".g2sd-export"   # `.NAME.g2sd-export` beside an export: what was written, to know it is ours


def _record_path(out_path: Path) -> Path:
    """Where export records what it wrote to `out_path` (beside it, hidden): the file's size and sha256."""
    return out_path.with_name(f".{out_path.name}{EXPORT_RECORD}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def is_our_export(out_path: Path) -> bool:
    """Whether `out_path` is, byte for byte, a file an earlier export wrote (its record beside it matches)."""
    try:
        record = json.loads(_record_path(out_path).read_text())
        return (isinstance(record, dict) and record.get("tool") == TOOL and record.get("what") == "export"
                and not out_path.is_symlink() and out_path.stat().st_size == record.get("size")
                and _sha256(out_path) == record.get("sha256"))
    except (OSError, ValueError):
        return False


def _check_out(out: str, fmt: str) -> Path:
    """`out` as a path export may write: a new file, or one an earlier export wrote and nobody changed since. Any
    other existing file (a run's checkpoint.pt, a cache's manifest.json, a teacher checkpoint, a file of the user's)
    is refused: export replaces only its own output, so a typo in --out can lose nothing."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out_path = Path(out)
    if out_path.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {out_path / 'model.pth'}")
    if (out_path.exists() or out_path.is_symlink()) and not is_our_export(out_path):
        raise UserError(f"--out {out} already exists and is not a file an earlier `g2sd-cache export` wrote (a "
                        f"checkpoint, a manifest or a file of yours); export never replaces it: choose a new file name, "
                        f"or move that file away first")
    return out_path


def _save(obj, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda f: torch.save(obj, f))
    record = {"what": "export", "tool": TOOL, "size": out_path.stat().st_size, "sha256": _sha256(out_path)}
    write_text_atomic(_record_path(out_path), json.dumps(record) + "\n")


def export_run(run: str, out: str, fmt: str = "timm") -> dict:
    """`g2sd-cache export`: a finetune run (or its best.pt) -> `export_classifier`, a train run -> `export_encoder`."""
    _check_out(out, fmt)
    p = Path(run)
    readable = p.is_file() or (p / CHECKPOINT).is_file() or (p / BEST).is_file()
    finetuned = read_finetuned(run, "export", prefer_best=True) if readable else None
    if finetuned is not None:
        return export_classifier(finetuned, out, fmt)
    return export_encoder(run, out, fmt)


def export_classifier(finetuned, out: str, fmt: str = "timm") -> dict:
    """Write a fine-tuned student (finetuned.Finetuned) as timm's model or in MAE's layout; see the docstring."""
    out_path = _check_out(out, fmt)
    model = finetuned.model
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    size = finetuned.img_size
    if isinstance(model, DistilledViT):
        name = CLASSIFIER_PRESETS[finetuned.arch].deit_name or None
        kwargs = f"num_classes={len(finetuned.classes)}" + (f", img_size={size}" if size != 224 else "")
        if fmt == "timm":
            state = to_timm_distilled(model)
    else:
        name = f"{finetuned.arch}_224" if finetuned.arch in ("vit_tiny_patch16", "vit_small_patch16",
                                                              "vit_base_patch16", "vit_large_patch16") else None
        kwargs = f"num_classes={len(finetuned.classes)}, global_pool='avg'" + (f", img_size={size}" if size != 224 else "")
    _save(state if fmt == "timm" else {"model": state}, out_path)
    return {"kind": "classifier", "format": fmt, "timm_model": name, "timm_kwargs": kwargs, "step": finetuned.step,
            "epoch": finetuned.epoch, "source": finetuned.describe(), "val": finetuned.val,
            "classes": list(finetuned.classes), "tensors": len(state),
            "params": sum(v.numel() for v in state.values()), "path": str(out_path), "notes": []}


def export_encoder(run: str, out: str, fmt: str = "timm") -> dict:
    """Write RUN's student encoder to `out` in format `fmt`; returns what the CLI prints (incl. `notes`)."""
    out_path = _check_out(out, fmt)
    ckpt = load_checkpoint(Path(run))
    student = build_student(ckpt["student"], ckpt["target_dim"], ckpt["img_size"])
    notes = load_student_state(student, ckpt["model"])
    state = student.encoder_state_dict()
    _save(state if fmt == "timm" else {"model": state}, out_path)
    name = STUDENT_PRESETS[ckpt["student"]].timm_name
    # A student trained at another crop size has another position table: timm needs the same img_size to load it.
    size = ckpt["img_size"]
    timm_call = (f"timm.create_model('{name}', num_classes=0" + (f", img_size={size}" if size != 224 else "") + ")"
                 if name else None)
    return {"kind": "encoder", "format": fmt, "timm_model": name, "timm_call": timm_call, "step": ckpt["step"],
            "tensors": len(state), "params": sum(v.numel() for v in state.values()), "path": str(out_path),
            "notes": notes}


def export_summary(r: dict) -> str:
    """The line `g2sd-cache export` prints: what was written and how to load it."""
    if r["kind"] == "classifier":
        if r["format"] == "timm":
            load = (f"timm.create_model('{r['timm_model']}', {r['timm_kwargs']})" if r["timm_model"]
                    else f"timm's VisionTransformerDistilled / VisionTransformer of its size ({r['timm_kwargs']})")
            how = f"load with {load}.load_state_dict(torch.load(path))"
        else:
            how = "G2SD's / MAE's models_vit layout under ['model']"
        return (f"wrote {r['path']}: the fine-tuned classifier from {r['source']}, "
                f"{len(r['classes'])} classes, {r['params'] / 1e6:.1f} M parameters; {how}")
    if r["format"] == "mae":
        how = "fine-tune with MAE's main_finetune.py --finetune path (reads ['model'])"
    elif r["timm_call"]:
        how = f"load with {r['timm_call']}.load_state_dict(torch.load(path))"
    else:
        how = f"student {r['timm_model'] or 'preset'} has no timm counterpart (a test preset)"
    return (f"wrote {r['path']}: {r['tensors']} tensors, {r['params'] / 1e6:.1f} M parameters from step {r['step']}; "
            f"{how}")


def add(sub):
    p = sub.add_parser("export", help="write a trained student: the stage-1 encoder or the stage-2 classifier (timm or "
                                      "MAE checkpoint layout)",
                       description="Stage 1 (a `train` run): the student's encoder. --format timm: a state dict that "
                                   "timm.create_model('vit_small_patch16_224', num_classes=0) (or vit_tiny_patch16_224) "
                                   "loads strictly. --format mae: {'model': state dict}, what MAE's main_finetune.py "
                                   "--finetune and G2SD's specific distillation (main_finetune_dis.py) read. "
                                   "Stage 2 (a `finetune` run: its best.pt, else its checkpoint.pt; or either file): "
                                   "the whole classifier. --format timm: the distilled student as timm's "
                                   "deit_small_distilled_patch16_224 (deit_tiny_/deit_base_ by size; "
                                   "timm.create_model(name, num_classes=C)), strict keys, identical logits: the dist "
                                   "token's position row is zero; a plain fine-tuned student (no teacher) as "
                                   "vit_small_patch16_224 with global_pool='avg'. --format mae: {'model': state dict} "
                                   "in G2SD's / MAE's models_vit layout.")
    p.add_argument("run", help="run directory of `g2sd-cache train` or `g2sd-cache finetune`, or a finetune "
                   "checkpoint file (RUN/best.pt)")
    p.add_argument("--out", required=True, help="file to write (.pth)")
    p.add_argument("--format", default="timm", choices=["timm", "mae"], help="timm: bare state dict, strict into "
                   "timm (default %(default)s); mae: the same tensors under 'model', as MAE/G2SD scripts expect")
    return p


def run(args) -> int:
    r = export_run(args.run, args.out, args.format)
    for note in r.get("notes", ()):
        print(f"note: {note}")
    print(export_summary(r))
    return 0


COMMAND = Command("export", add, run)
