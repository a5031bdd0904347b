"""Writing files so that neither a crash, a full disk nor a power cut leaves a half-written one under its
final name. The one helper every writer uses (manifests, configs, checkpoints, cache shards).

`atomic_write(path, write)`: `write(f)` fills a temporary file in the same folder; the file is flushed
and fsync-ed, renamed over `path`, and the folder is fsync-ed so the rename itself is durable. Without
the first fsync a power cut after the rename can leave a zero-length file under the final name (the
rename reached the disk, the data did not); without the second the rename can be lost. Any failure
removes the temporary and re-raises, so the previous file, if any, stays as it was.

`publish_dir(tmp, final)` is the same for a folder of files (a cache shard): every file and folder under
`tmp` is fsync-ed, then `tmp` is renamed to `final` and the parent fsync-ed.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

TMP_MARK = ".tmp-"   # in every temporary's name (schema.TMP_MARK re-exports it): verify reports leftovers

# Errors that mean "the device is full" (or the user's share of it): one line about space, not a traceback.
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_out_of_space(e: BaseException) -> bool:
    """Whether `e` (or an exception it wraps, as torch.save's RuntimeError does) is a full disk or quota."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Bytes free for this user on the filesystem holding `path` (None if unknown)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is complete: the same folder (so the rename is atomic), under a
    name that says which process writes it (host and pid: a later run removes it once that one is gone)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.uname().nodename}-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable. Filesystems that cannot fsync a folder
    (some network and FUSE mounts) are left to their own guarantees."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _open_temp(path: Path) -> BinaryIO:
    """The temporary file object (a seam for tests that simulate a full disk)."""
    return open(path, "wb")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write `path` atomically and durably: `write(f)` fills a binary file object. Returns `path`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with _open_temp(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:   # a failed write or flush names no file: say which one
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:  # a failed write (disk full) must not leave the temporary behind
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the folder `tmp` (fully written) to `final`, durably: its files first, then the rename."""
    for dirpath, dirnames, filenames in os.walk(tmp, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))
    os.replace(tmp, final)
    fsync_dir(final.parent)
