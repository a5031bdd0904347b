"""Top-1 / top-5 accuracy of a classifier on labelled images, with G2SD's evaluation transform.

The transform is G2SD's `util/datasets.py` eval branch: resize the shorter side to S / (224 / 256) (S / 1.0
above 224 px), bicubic; centre crop S; to tensor; ImageNet mean/std. The distilled student evaluates the mean
of its two heads (its eval-mode forward). Accuracy is in percent, as G2SD and timm report it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from g2sd_cache.models.classifier import load_classifier
from g2sd_cache.common.errors import UserError
from g2sd_cache.data.labelled import LabelledFolder, LabelledTars, open_labelled
from g2sd_cache.data.views import IMAGENET_MEAN, IMAGENET_STD, decode_image
from g2sd_cache.common.workers import mp_context


def eval_transform(img_size: int) -> transforms.Compose:
    """PIL RGB image -> float32 [3, S, S]."""
    crop_pct = 224 / 256 if img_size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(img_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _decoded(transform, size: int, key: str, read) -> tuple[torch.Tensor, str]:
    """(transformed image, "") or, for an unreadable one, (zeros, "KEY: error"); the caller applies --on-error."""
    try:
        return transform(decode_image(read())), ""
    except Exception as e:   # truncated, not an image, a bomb
        return torch.zeros(3, size, size), f"{key}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class _FolderImages(Dataset):
    """Item i -> (image [3, S, S], label, error: "" or what made it unreadable)."""

    def __init__(self, data: LabelledFolder, transform, size: int):
        self.data, self.transform, self.size = data, transform, size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        source, key = self.data.source, self.data.source.keys[i]
        image, error = _decoded(self.transform, self.size, key, lambda: source.read(key))
        return image, self.data.labels[i], error


class _TarImages(IterableDataset):
    """Each DataLoader worker streams every W-th shard."""

    def __init__(self, data: LabelledTars, transform, size: int):
        self.data, self.transform, self.size = data, transform, size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = range(worker, len(self.data.source.urls), workers)
        for key, data, label in self.data.samples(shards):
            image, error = _decoded(self.transform, self.size, key, lambda: data)
            yield image, label, error


@torch.no_grad()
def evaluate(model_or_path: nn.Module | str | Path, val: str, *, classes: Sequence[str] | None = None,
             img_size: int | None = None, batch_size: int = 64, workers: int = 0, device: str = "cpu",
             amp: bool = False, on_error: str = "fail") -> dict:
    """Accuracy of a classifier on `val` (a class-folder tree or `.cls`-labelled tars).

    model_or_path: a classifier module (its eval-mode output: logits [N, C]) or anything `load_classifier`
    reads. classes: the class names the model was trained on, in index order (e.g. the training folder's
    sorted class folders); without it the validation folder's own sorted class folders are the indices, and
    their number must equal the model's. img_size: default the model's own input size.
    on_error: an unreadable image stops the evaluation naming it (fail) or is left out and listed (skip).
    returns {"top1": %, "top5": %, "loss": mean cross-entropy, "n": images evaluated, "unreadable": [keys left
    out]}; top5 is top-C when C < 5."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if workers < 0:
        raise UserError(f"--workers {workers}: must be 0 or more")
    if on_error not in ("skip", "fail"):
        raise UserError(f"--on-error {on_error}: choose skip or fail")
    if isinstance(model_or_path, (str, Path)):
        model, _ = load_classifier(model_or_path, "evaluate")
    else:
        model = model_or_path
    num_classes = model.num_classes
    size = img_size or model.patch_embed.img_size[0]
    data = open_labelled(val, classes, "--val")
    if isinstance(data, LabelledFolder):
        if classes is None and data.num_classes != num_classes:
            raise UserError(f"{val} has {data.num_classes} class folders but the model has {num_classes} classes; "
                            f"pass the training class names so each folder gets its training index")
        dataset = _FolderImages(data, eval_transform(size), size)
    else:
        dataset = _TarImages(data, eval_transform(size), size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        multiprocessing_context=mp_context(workers, __name__))

    was_training = model.training
    model.eval()
    dev = torch.device(device)
    k = min(5, num_classes)
    correct1 = correct5 = n = 0
    loss_sum = 0.0
    unreadable: list[str] = []
    try:
        for images, labels, errors in loader:
            bad = [e for e in errors if e]
            if bad and on_error == "fail":
                raise UserError(f"--val {val}: image {bad[0]}; replace or remove it, or pass --on-error skip to "
                                f"leave unreadable images out (and list them)")
            if bad:
                unreadable += [e.split(": ", 1)[0] for e in bad]
                keep = torch.tensor([not e for e in errors])
                images, labels = images[keep], labels[keep]
                if not labels.numel():
                    continue
            if int(labels.max()) >= num_classes:
                raise UserError(f"{val}: class index {int(labels.max())} is out of range for a model with "
                                f"{num_classes} classes")
            images, labels = images.to(dev), labels.to(dev)
            dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
            with torch.autocast(dev.type, dtype=dtype, enabled=amp):
                logits = model(images)
            logits = logits.float()
            top = logits.topk(k, dim=1).indices
            hits = top == labels[:, None]
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            n += labels.numel()
    except UserError as e:
        raise _own_line(e) from None
    finally:
        model.train(was_training)
    if n == 0:
        raise UserError(f"{val}: no labelled images to evaluate" +
                        (f" ({len(unreadable)} unreadable, e.g. {unreadable[0]})" if unreadable else ""))
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": n,
            "unreadable": unreadable}


def _own_line(error: UserError) -> UserError:
    """A UserError raised in a DataLoader worker reaches us wrapped with the worker's traceback; its own
    one-line message is the traceback's last line, after the exception's name."""
    lines = str(error).strip().splitlines()
    if len(lines) < 2 or "DataLoader worker" not in lines[0]:
        return error
    return UserError(lines[-1].split(": ", 1)[-1])
