"""Reading what `g2sd-cache finetune` wrote: a run folder (RUN/checkpoint.pt, the last weights), RUN/best.pt
(the best validated weights) or either file, for `evaluate` and `export`.

Files are untrusted (weights.read_weights_file: weights_only loads). A finetune checkpoint carries, next to
`model`, what rebuilds the student: `stage` = "finetune", `arch`, `num_classes`, `classes` (training class
names in index order), `img_size`, `distilled`, and the `epoch` / `step` it was saved at.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from g2sd_cache.models.classifier import build_student
from g2sd_cache.common.errors import UserError
from g2sd_cache.models.weights import read_weights_file

STAGE = "finetune"
BEST = "best.pt"


@dataclass(frozen=True)
class Finetuned:
    """A fine-tuned student in eval mode, and where it came from."""

    model: nn.Module
    path: Path
    arch: str
    classes: tuple[str, ...]
    img_size: int
    distilled: bool
    epoch: int            # best.pt: the epoch validated; checkpoint.pt: the epoch a resume starts in
    step: int
    val: dict | None      # best.pt: the validation result that made it the best

    def describe(self) -> str:
        if self.val:
            return f"{self.path} (epoch {self.epoch}, validation top-1 {self.val['top1']:.2f}%)"
        return f"{self.path} (step {self.step})"


def is_finetuned(content: object) -> bool:
    return isinstance(content, dict) and content.get("stage") == STAGE


def resolve(path: str | Path, prefer_best: bool) -> Path:
    """A run folder -> its best.pt (when `prefer_best` and it exists) or checkpoint.pt; a file -> itself."""
    p = Path(path)
    if p.is_dir() and prefer_best and (p / BEST).is_file():
        return p / BEST
    return p


def read_finetuned(path: str | Path, flag: str, prefer_best: bool = False) -> Finetuned | None:
    """The student saved at `path`, or None when `path` is a weight file of another kind (the caller then
    tries the other readers)."""
    p, content = read_weights_file(resolve(path, prefer_best), flag)
    if not is_finetuned(content):
        return None
    try:
        model = build_student(content["arch"], content["num_classes"], content["img_size"],
                              distilled=content["distilled"])
        model.load_state_dict(content["model"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise UserError(f"{flag} {p}: a finetune checkpoint that does not load ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0]})") from e
    model.eval().requires_grad_(False)
    return Finetuned(model, p, content["arch"], tuple(content["classes"]), content["img_size"], content["distilled"],
                     content["epoch"], content["step"], content.get("val"))
