"""Image sources: the user's dataset, as an image folder or webdataset tar shards.

- A *folder* (class sub-folders or flat; jpg, jpeg, png, webp) gives random access: a view's
  key is the image's path relative to the root, and image index i is the i-th key in sorted order.
- *Tar shards* (paths, brace patterns like `train-{000000..000099}.tar`, URLs) give no random
  access: they are streamed in order, a view's key is the sample's `__key__`, and extract writes
  one cache shard per tar, in the same order, so that train can stream both side by side.

The listing's fingerprint (sha256 of the sorted keys with file sizes, or of the tar URLs with
sizes) goes into the manifest; train re-lists `--data` and refuses a dataset that differs.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from webdataset import shardlists, tariterators

from .errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class FolderSource:
    """An image folder. keys: sorted relative paths (POSIX separators); sizes: bytes of each file."""

    root: str
    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    kind: str = field(default="folder", init=False)

    @classmethod
    def scan(cls, root: str) -> "FolderSource":
        found = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .ipynb_checkpoints and co.
            for name in filenames:
                if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                    path = os.path.join(dirpath, name)
                    found.append((Path(os.path.relpath(path, root)).as_posix(), os.path.getsize(path)))
        if not found:
            raise UserError(f"--data {root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files "
                            f"in the folder and its sub-folders)")
        found.sort()
        return cls(str(Path(root).resolve()), tuple(k for k, _ in found), tuple(s for _, s in found))

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for key, size in zip(self.keys, self.sizes):
            h.update(f"{key}\t{size}\n".encode())
        return h.hexdigest()

    def read(self, key: str) -> bytes:
        with open(os.path.join(self.root, key), "rb") as f:
            return f.read()


@dataclass(frozen=True)
class TarSource:
    """Webdataset tar shards, streamed in order. urls: the expanded shard list."""

    spec: str
    urls: tuple[str, ...]
    kind: str = field(default="tars", init=False)

    @classmethod
    def from_spec(cls, spec: str) -> "TarSource":
        urls = []
        for part in spec.split(","):
            urls.extend(shardlists.expand_urls(part.strip()))
        for url in urls:
            if _is_local(url) and not os.path.isfile(url):
                raise UserError(f"--data: tar shard {url} does not exist")
        return cls(spec, tuple(urls))

    def __len__(self) -> int:
        return len(self.urls)

    @property
    def root(self) -> str:
        return self.spec

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for url in self.urls:
            size = os.path.getsize(url) if _is_local(url) else -1
            h.update(f"{os.path.basename(url)}\t{size}\n".encode())
        return h.hexdigest()

    def samples(self, shard: int, on_error: Callable[[Exception], bool]) -> Iterator[tuple[str, bytes | None]]:
        """Stream tar `shard` as (key, image bytes) in tar order; bytes is None for a sample with no
        image member. `on_error(exc)` decides about unreadable tar members: True skips, False raises."""
        url = self.urls[shard]
        opened = []

        def keep_streams(sources):
            for source in sources:
                opened.append(source["stream"])
                yield source

        streams = keep_streams(tariterators.url_opener([{"url": url}], handler=on_error))
        files = tariterators.tar_file_expander(streams, handler=on_error)
        for sample in tariterators.group_by_keys(files, handler=on_error):
            image = next((sample[k] for k in sample if k.lower().lstrip(".") in ("jpg", "jpeg", "png", "webp")), None)
            yield sample["__key__"], image
        # Python's tarfile takes a corrupt header after the first member for the end of the archive, so
        # the members after it would vanish without a word: data after the stop is an error.
        if not url.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")) and any(_unread_data(s) for s in opened):
            exc = tarfile.ReadError(f"{url}: corrupt tar header; the members after it cannot be read")
            if not on_error(exc):
                raise exc


def _unread_data(stream, probe: int = 1 << 20) -> bool:
    """Whether non-zero bytes follow where tarfile stopped (a tar ends in zero blocks only)."""
    try:
        return bool(stream.read(probe).strip(b"\0"))
    except (OSError, ValueError):  # closed or unreadable: nothing more to learn
        return False


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


Source = FolderSource | TarSource


def open_source(spec: str) -> Source:
    """`--data` -> a source: an existing directory is an image folder, anything else tar shards."""
    if os.path.isdir(spec):
        return FolderSource.scan(spec)
    if spec.endswith(".tar") or "{" in spec or "," in spec or "://" in spec or spec.startswith("pipe:"):
        return TarSource.from_spec(spec)
    raise UserError(f"--data {spec}: not an image folder or a list of .tar shards; pass a directory of images "
                    f"or webdataset shards like 'train-{{000000..000099}}.tar'")
