"""Labelled images for stage 2: which class each image belongs to.

- An image *folder* labels by class sub-folder, torchvision `ImageFolder`'s rule: the class of
  `ROOT/<class>/.../x.jpg` is `<class>`, and class index = position in the sorted class names (or in the
  `classes` list given, e.g. the training classes when labelling a validation folder).
- Webdataset *tars* carry the index itself in each sample's `.cls` member (ASCII integer).

Listing goes through `sources` (the same folder scan and shard expansion as stage 1).
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from webdataset import tariterators

from g2sd_cache.cache.digests import check_image, image_crc32c
from g2sd_cache.common.errors import UserError
from g2sd_cache.data.sources import FolderSource, TarSource, open_source
from g2sd_cache.data.views import decode_image

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class LabelledFolder:
    """An image folder with one sub-folder per class. labels[i] is the class index of source.keys[i]."""

    source: FolderSource
    classes: tuple[str, ...]
    labels: tuple[int, ...]
    # [N] int64 crc32c of each image's bytes as a logits cache recorded them (-1: not recorded); None: no check
    crc32c: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def scan(cls, root: str, classes: Sequence[str] | None = None) -> "LabelledFolder":
        return cls.of(FolderSource.scan(root), classes)

    @classmethod
    def of(cls, source: FolderSource, classes: Sequence[str] | None = None) -> "LabelledFolder":
        root = source.root
        names = []
        for key in source.keys:
            name, sep, _ = key.partition("/")
            if not sep:
                raise UserError(f"{root}: image {key} is not in a class sub-folder; labels come from one "
                                f"sub-folder per class (ROOT/<class>/<image>)")
            names.append(name)
        classes = tuple(classes) if classes is not None else tuple(sorted(set(names)))
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise UserError(f"{root}: class folder(s) {', '.join(unknown[:3])} are not among the {len(classes)} "
                            f"classes the model was trained on")
        return cls(source, classes, tuple(index[n] for n in names))

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image(self, i: int) -> Image.Image:
        """Image i, decoded to RGB."""
        return self.image_and_crc(i)[0]

    def image_and_crc(self, i: int) -> tuple[Image.Image, int]:
        """Image i decoded to RGB, and the crc32c of its bytes; SourceChangedError if `crc32c` records other
        bytes for it (a same-size replacement keeps the listing's fingerprint, not its content)."""
        key = self.source.keys[i]
        raw = self.source.read(key)
        crc = image_crc32c(raw)
        if self.crc32c is not None and self.crc32c[i] >= 0:
            check_image(raw, int(self.crc32c[i]), key, crc)
        return decode_image(raw), crc


@dataclass(frozen=True)
class LabelledTars:
    """Webdataset tar shards whose samples carry a `.cls` member; streamed in order."""

    source: TarSource

    def samples(self, shards: Sequence[int] | None = None) -> Iterator[tuple[str, bytes, int]]:
        """(key, image bytes, class index) of every sample of `shards` (all by default), in tar order."""
        for shard in range(len(self.source.urls)) if shards is None else shards:
            url = self.source.urls[shard]
            for sample in _tar_samples(url):
                key = sample["__key__"]
                image = next((sample[k] for k in IMAGE_MEMBERS if k in sample), None)
                if image is None or "cls" not in sample:
                    what = "image" if image is None else ".cls label"
                    raise UserError(f"{url}: sample {key} has no {what}; every sample needs an image and a .cls "
                                    f"member holding its class index")
                yield key, image, _class_index(sample["cls"], url, key)


def _tar_samples(url: str) -> Iterator[dict]:
    """webdataset's samples of one tar; an unreadable tar is a one-line UserError."""
    try:
        yield from tariterators.tarfile_samples([{"url": url}])
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        raise UserError(f"{url}: cannot read the tar: {type(e).__name__}: {str(e).strip().splitlines()[0]}") from e


def _class_index(raw: bytes, url: str, key: str) -> int:
    text = raw.decode("ascii", errors="replace").strip()
    if not text.isdigit() or len(text) > 9:   # a tensor of labels holds int64; no model has 10^9 classes
        raise UserError(f"{url}: sample {key} has .cls '{text[:20]}', expected a non-negative integer class index"
                        + (" (below 10^9)" if text.isdigit() else ""))
    return int(text)


def open_labelled(spec: str, classes: Sequence[str] | None = None, flag: str = "--data") -> LabelledFolder | LabelledTars:
    """A class-folder tree or `.cls`-labelled tar shards (same `spec` rules as `--data`; `flag` names the option
    in messages)."""
    source = open_source(spec, flag)
    if isinstance(source, FolderSource):
        return LabelledFolder.of(source, classes)
    return LabelledTars(source)
