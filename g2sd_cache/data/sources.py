"""Image sources: the user's dataset, as an image folder or webdataset tar shards.

- A *folder* (class sub-folders or flat; jpg, jpeg, png, webp) gives random access: a view's
  key is the image's path relative to the root, and image index i is the i-th key in sorted order.
- *Tar shards* (paths, brace patterns like `train-{000000..000099}.tar`, URLs) give no random
  access: they are streamed in order, a view's key is the sample's `__key__`, and extract writes
  one cache shard per tar, in the same order, so that train can stream both side by side.

The listing's fingerprint (sha256 of the sorted keys with file sizes, or of the tar URLs with
sizes) goes into the manifest; train re-lists `--data` and refuses a dataset that differs. Content
is covered per image: extract stores the crc32c of every image's bytes (`digests.image_crc32c`).

Neither scan trusts the dataset. The folder scan follows symbolic links but visits each real folder
and file once (a link loop such as `class0/loop -> ..` adds nothing), never opens what it lists, and
leaves out, with the reason, dangling links, link loops, entries it cannot stat, names that are not
valid UTF-8, anything that is not a regular file (a FIFO named x.jpg would block a reader forever) and
folders it cannot read: `FolderSource.skipped`. The tar reader reports each unreadable stretch once
(a truncated tar is one error, not one per attempt to go on), names link members instead of dropping
them, and leaves out the second sample of a key already seen in the tar (a join by key would pair one
image with another's targets).
"""
from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from webdataset import shardlists, tariterators

from g2sd_cache.common.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TAR_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


def printable(name: str) -> str:
    """A file name as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogates) become \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class FolderSource:
    """An image folder. keys: sorted relative paths (POSIX separators); sizes: bytes of each file;
    skipped: [{"key", "error"}] entries the scan left out (never read), in scan order."""

    root: str
    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    skipped: tuple[dict, ...] = ()
    kind: str = field(default="folder", init=False)

    @classmethod
    def scan(cls, root: str, flag: str = "--data") -> "FolderSource":
        """`flag`: the option that named `root` (--data, --val), for the messages."""
        found, skipped = _scan_folder(root, flag)
        if not found:
            note = f" ({len(skipped)} entries left out, e.g. {skipped[0]['key']}: {skipped[0]['error']})" if skipped else ""
            raise UserError(f"{flag} {root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files "
                            f"in the folder and its sub-folders){note}")
        found.sort()
        return cls(str(Path(root).resolve()), tuple(k for k, _ in found), tuple(s for _, s in found), tuple(skipped))

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

    def scan_note(self) -> str | None:
        """One line about what the scan left out (None if nothing)."""
        if not self.skipped:
            return None
        first = self.skipped[0]
        return (f"note: {len(self.skipped)} entries of --data {self.root} were left out (e.g. {first['key']}: "
                f"{first['error']}); they are listed in the cache manifest's skipped inputs")


def _scan_folder(root: str, flag: str = "--data") -> tuple[list[tuple[str, int]], list[dict]]:
    """(relative key, size) of every image file under `root`, and what was left out. Folders are walked
    in sorted order, the real tree first and folders reached through links after it, so a real folder
    or file reached twice is taken at its real path (else at its first path) and only once."""
    skipped: list[dict] = []
    seen_dirs: set[tuple[int, int]] = set()
    files: dict[tuple[int, int], list[tuple[bool, str, int]]] = {}   # real file -> [(via a link?, key, size)]
    try:
        st = os.stat(root)
    except OSError as e:
        raise UserError(f"{flag} {root}: cannot read it ({e.strerror})") from e
    seen_dirs.add((st.st_dev, st.st_ino))
    stack: list[str] = [""]                          # real folders still to list (relative), sorted order
    linked: list[tuple[str, tuple[int, int]]] = []   # folders reached through a link, listed after the real tree
    while stack or linked:
        if stack:
            rel_dir = stack.pop()
        else:
            rel_dir, ident = linked.pop(0)
            if ident in seen_dirs:
                skipped.append({"key": rel_dir, "error": "a link to a folder already scanned (a loop or a second "
                                                         "path to it): not scanned again"})
                continue
            seen_dirs.add(ident)
        try:
            with os.scandir(os.path.join(root, rel_dir)) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append({"key": printable(rel_dir or "."), "error": f"folder cannot be read ({e.strerror})"})
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):          # .ipynb_checkpoints, .DS_Store and co.
                continue
            key = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            looks_like_image = entry.name.lower().endswith(IMAGE_SUFFIXES)
            try:
                entry.name.encode("utf-8")
            except UnicodeEncodeError:
                if looks_like_image or entry.is_dir():
                    skipped.append({"key": printable(key), "error": "name is not valid UTF-8: rename it"})
                continue
            try:
                st = entry.stat()                    # follows links
            except OSError as e:
                if entry.is_symlink() or looks_like_image:
                    what = "dangling or looping symbolic link" if entry.is_symlink() else "cannot be read"
                    skipped.append({"key": key, "error": f"{what} ({e.strerror})"})
                continue
            ident = (st.st_dev, st.st_ino)
            if stat.S_ISDIR(st.st_mode):
                if entry.is_symlink():
                    linked.append((key, ident))
                elif ident not in seen_dirs:
                    seen_dirs.add(ident)
                    subdirs.append(key)
            elif not looks_like_image:
                continue
            elif not stat.S_ISREG(st.st_mode):
                skipped.append({"key": key, "error": "not a regular file (a FIFO, socket or device): not read"})
            else:
                files.setdefault(ident, []).append((entry.is_symlink(), key, st.st_size))
        stack.extend(reversed(subdirs))
    found = []
    for paths in files.values():
        (_, key, size), *others = sorted(paths)
        found.append((key, size))
        skipped += [{"key": other, "error": f"the same file as {key} (a link): taken once"} for _, other, _ in others]
    return found, skipped


@dataclass(frozen=True)
class TarSource:
    """Webdataset tar shards, streamed in order. urls: the expanded shard list."""

    spec: str
    urls: tuple[str, ...]
    kind: str = field(default="tars", init=False)

    @classmethod
    def from_spec(cls, spec: str, flag: str = "--data") -> "TarSource":
        urls = []
        for part in spec.split(","):
            urls.extend(shardlists.expand_urls(part.strip()))
        for url in urls:
            if _is_local(url) and not os.path.isfile(url):
                raise UserError(f"{flag}: tar shard {url} does not exist")
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

    def scan_note(self) -> str | None:
        return None

    def samples(self, shard: int, on_error: Callable[[Exception], bool]) -> Iterator[tuple[str, bytes | None]]:
        """Stream tar `shard` as (key, image bytes) in tar order; bytes is None for a sample with no
        image member. Problems go to `on_error(exc)` as `TarMemberError`s (True: go on, False: stop here):
        a member that is a link, a key seen before in this tar (that sample is left out), and an
        unreadable stretch (truncated data, a corrupt header), which ends the tar with one error."""
        url = self.urls[shard]
        for opened in tariterators.url_opener([{"url": url}], handler=on_error):
            yield from _tar_samples(opened["stream"], url, on_error)


class TarMemberError(ValueError):
    """A problem with one member (or the rest) of a tar; `key` names it for the skipped list."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class _Stop(Exception):
    """`on_error` said not to go on with this tar."""


def _tar_samples(stream, url: str, on_error: Callable[[Exception], bool]) -> Iterator[tuple[str, bytes | None]]:
    """(key, image bytes or None) per sample of one opened tar, members grouped by webdataset's rule: the
    key is the member path up to the first dot of its base name, consecutive members with one key form
    a sample."""
    def report(key: str, message: str) -> None:
        if not on_error(TarMemberError(key, message)):
            raise _Stop

    try:
        yield from _tar_sample_stream(stream, url, report)
    except _Stop:
        return


def _tar_sample_stream(stream, url: str, report: Callable[[str, str], None]) -> Iterator[tuple[str, bytes | None]]:
    seen: dict[str, str] = {}           # key -> its first member: a key twice is an error
    current, members, dropped = None, {}, False   # the sample being read: key, {suffix: bytes}, left out?
    where, last = "at its start", "the start"     # for errors: where reading stopped, the last member read

    def finish():
        if current is not None and not dropped:
            yield current, next((members[s] for s in TAR_IMAGE_SUFFIXES if s in members), None)

    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            name = info.name
            key, suffix = tariterators.base_plus_ext(name)
            base = os.path.basename(name)
            if info.isdir() or key is None or (base.startswith("__") and base.split(".")[0].endswith("__")):
                continue                                 # folders, names without extension, webdataset metadata
            if key != current:
                yield from finish()
                current, members, dropped = key, {}, key in seen
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:    # keys are stored as UTF-8
                    report(printable(key), f"{url}: member {printable(name)} has a name that is not valid UTF-8: "
                                           f"sample left out (rename it)")
                    dropped = True
                    continue
                if dropped:   # listed under its own name: key itself stays the first copy's, which is cached
                    report(f"{key} (second copy)", f"{url}: sample key {key} appears twice (members {seen[key]} "
                                                   f"and {name}); the second is left out: give every sample its own key")
                seen.setdefault(key, name)
            if dropped:
                continue
            if not info.isreg():
                kind = "symbolic link" if info.issym() else "hard link" if info.islnk() else "special file"
                report(key, f"{url}: member {name} is a {kind}{f' to {info.linkname}' if info.linkname else ''}, "
                            f"not a regular file: sample {key} is left out (store the image itself in the tar)")
                dropped = True
                continue
            where = f"in member {name}"
            data = tar.extractfile(info).read()
            tar.members = []                             # streaming: keep no member list
            where, last = f"after member {name}", name
            if suffix.lower() in members:
                report(key, f"{url}: sample {key} has member {name} twice; the second is left out")
            else:
                members[suffix.lower()] = data
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        # One error for the rest of the tar: going on would fail again at the same place. A sample whose
        # member was being read is incomplete and left out; one that stopped between members is kept.
        if where.startswith("after"):
            yield from finish()
        report(f"{url} ({where})", f"{url}: {type(e).__name__}: {e} ({where}); the rest of the tar cannot be read")
        return
    yield from finish()
    # Python's tarfile takes a corrupt header after the first member for the end of the archive, so
    # the members after it would vanish without a word: data after the stop is an error.
    if not url.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")) and _unread_data(stream):
        report(f"{url} (after {last})", f"{url}: corrupt tar header after member {last}; the members after it "
                                        f"cannot be read")


def _unread_data(stream, probe: int = 1 << 20) -> bool:
    """Whether non-zero bytes follow where tarfile stopped (a tar ends in zero blocks only)."""
    try:
        return bool(stream.read(probe).strip(b"\0"))
    except (OSError, ValueError):  # closed or unreadable: nothing more to learn
        return False


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


Source = FolderSource | TarSource


def open_source(spec: str, flag: str = "--data") -> Source:
    """`--data` (or `flag`) -> a source: an existing directory is an image folder, anything else tar shards."""
    if os.path.isdir(spec):
        return FolderSource.scan(spec, flag)
    if spec.endswith(".tar") or "{" in spec or "," in spec or "://" in spec or spec.startswith("pipe:"):
        return TarSource.from_spec(spec, flag)
    raise UserError(f"{flag} {spec}: not an image folder or a list of .tar shards; pass a directory of images "
                    f"or webdataset shards like 'train-{{000000..000099}}.tar'")
