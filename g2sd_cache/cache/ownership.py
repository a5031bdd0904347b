"""Which folders are ours: markers written at creation, an advisory lock for the one writer, and the rules
for deleting or writing into a folder.

- A cache carries `.g2sd-cache` and a training run `.g2sd-run` (JSON: what, tool, version, format, created),
  written when the folder is claimed, before anything else. Only a folder with the cache marker is ever
  resumed or deleted by `extract --overwrite`, and then only if it holds nothing a cache does not write;
  `claim_run_folder` refuses a cache, a dataset and any non-empty folder that is not one of our runs.
- `FolderLock`: an exclusive `flock` on a lock file in the folder. The kernel drops it when the process
  ends, however it ends, so a crashed writer never blocks the next one; a second writer is told in one
  line who holds it (pid, host, since when).
- Temporaries (`*.tmp-*`) in a locked cache belong to a writer that is gone (the lock holder is us):
  `remove_stale_temporaries` deletes them, except those of a process still alive on this host.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from g2sd_cache.common.errors import UserError
from g2sd_cache.common.fsutil import TMP_MARK, write_text_atomic
from g2sd_cache.cache.schema import BASIS_FILE, CACHE_MARKER, CALIBRATION_FILE, CONFIG, FORMAT_VERSION, LOCK_FILE, MANIFEST, SHARD_PREFIX, SHARD_RECORD
from g2sd_cache.data.sources import IMAGE_SUFFIXES

RUN_MARKER = ".g2sd-run"
RUN_LOCK = ".g2sd-run.lock"
TOOL = "g2sd-cache"


def _version() -> str:
    try:
        from importlib.metadata import version
        return version(TOOL)
    except Exception:   # running from a source tree that is not installed
        return "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _host() -> str:
    return os.uname().nodename   # as in the temporaries' names (schema.tmp_shard_name, fsutil.temp_path)


# ----------------------------------------------------------------------------------------------
# markers

def read_marker(folder: Path, name: str, what: str) -> dict | None:
    """The marker `name` in `folder` if it is one of ours saying `what` ("cache" or "run"), else None."""
    try:
        data = json.loads((Path(folder) / name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL and data.get("what") == what else None


def is_cache(folder: Path) -> bool:
    return read_marker(folder, CACHE_MARKER, "cache") is not None


def is_run(folder: Path) -> bool:
    return read_marker(folder, RUN_MARKER, "run") is not None


def _write_marker(folder: Path, name: str, what: str, extra: dict) -> None:
    marker = {"what": what, "tool": TOOL, "version": _version(), **extra, "created": _now()}
    write_text_atomic(Path(folder) / name, json.dumps(marker, indent=1) + "\n")


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserError(f"{folder}: cannot list it ({e.strerror})") from e


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _images_in(folder: Path, limit: int = 64) -> list[str]:
    """Image files directly in `folder` or one level down (a bounded look: it only chooses a message)."""
    found = []
    for name in _entries(folder)[:limit]:
        path = folder / name
        if name.lower().endswith(IMAGE_SUFFIXES):
            found.append(name)
        elif path.is_dir() and not path.is_symlink():
            try:
                found += [f"{name}/{n}" for n in sorted(os.listdir(path))[:limit] if n.lower().endswith(IMAGE_SUFFIXES)]
            except OSError:
                pass
        if found:
            break
    return found


def _what_it_is(folder: Path, entries: list[str]) -> str:
    """A few words about a folder that is not ours, for refusals."""
    if is_run(folder):
        return "a g2sd-cache training run"
    if is_cache(folder) or MANIFEST in entries or any(e.startswith(SHARD_PREFIX) for e in entries):
        return "a g2sd-cache cache"
    images = _images_in(folder)
    if images:
        return f"a folder of images (e.g. {images[0]}), a dataset"
    return f"a folder that is not ours (it holds {_few(entries)})"


# ----------------------------------------------------------------------------------------------
# the lock

class FolderLock:
    """An exclusive advisory lock on `folder/name`, held until `release()` or the end of the process."""

    def __init__(self, folder: Path, name: str, command: str):
        self.path = Path(folder) / name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
                   if holder else "pid and host unknown")
            raise UserError(f"another {holder.get('command') or command} is writing into {folder} ({who}); wait for it to finish or stop "
                            f"it, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": _host(), "command": command, "since": _now()}).encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------
# caches

# A temporary this tool writes: `NAME.tmp-HOST-PID` (or `NAME.tmp-PID`) where NAME is a file or shard folder a cache
# holds. A user's `results.tmp-final.csv` does not match and is never taken for one.
_TEMP_NAME = re.compile(r"^(?P<base>\.shard-\d{5,}|" + "|".join(re.escape(n) for n in (CACHE_MARKER, CONFIG, MANIFEST, BASIS_FILE, CALIBRATION_FILE)) +
                        r")" + re.escape(TMP_MARK) + r"(?:(?P<host>.+)-)?(?P<pid>\d+)$")
_CHUNK_PATH = re.compile(r"^c(/\d+)+$")   # a zarr v3 chunk (or shard) file inside an array folder: c/0/0/...


def is_our_temporary(name: str) -> bool:
    """Whether a top-level name in a cache is the temporary of one of its own files or shards."""
    return _TEMP_NAME.match(name) is not None


def _shard_files_are_ours(path: Path) -> bool:
    """Whether everything under a shard folder is what the writer made: the files its shard.json records (else, for
    a shard whose record is unreadable, zarr's own layout: ARRAY/zarr.json and ARRAY/c/0/0...). A user's folder
    inside a shard, even one holding a zarr.json, is not."""
    try:
        recorded = set(json.loads((path / SHARD_RECORD).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.relpath(os.path.join(dirpath, name), path).replace(os.sep, "/")
            if rel in (SHARD_RECORD, "zarr.json"):
                continue
            if recorded is not None:
                if rel not in recorded:
                    return False
            else:
                array, _, rest = rel.partition("/")
                if not (rest == "zarr.json" or _CHUNK_PATH.match(rest)):
                    return False
    return True


def _cache_entry_is_ours(folder: Path, name: str) -> bool:
    """Whether a top-level entry of a cache is something extract writes."""
    path = folder / name
    if name in (CACHE_MARKER, LOCK_FILE, CONFIG, MANIFEST, BASIS_FILE, CALIBRATION_FILE) or is_our_temporary(name):
        return True
    if not (name.startswith(SHARD_PREFIX) and path.is_dir() and not path.is_symlink()):
        return False
    return _shard_files_are_ours(path)


def foreign_entries(folder: Path) -> list[str]:
    """Top-level entries of a cache folder that extract does not write (shard folders are looked into)."""
    return [name for name in _entries(folder) if not _cache_entry_is_ours(folder, name)]


# The two kinds of cache, by the command that writes them; a cache folder is resumed or replaced only by its own.
CACHE_KINDS = {"targets": "extract", "logits": "extract-logits"}


def cache_kind(folder: Path) -> str | None:
    """Which kind of cache a marked folder holds: its marker says (caches marked before kinds were recorded: their
    config or manifest); None for a folder with nothing written yet."""
    from g2sd_cache.cache.logits import is_logits_cache
    marker = read_marker(folder, CACHE_MARKER, "cache") or {}
    if marker.get("kind") in CACHE_KINDS:
        return marker["kind"]
    if is_logits_cache(folder):
        return "logits"
    return "targets" if (folder / CONFIG).is_file() or (folder / MANIFEST).is_file() else None


def claim_cache_folder(out: Path, overwrite: bool, kind: str = "targets") -> FolderLock:
    """Make `out` this extract's cache folder and lock it (rank 0, before anything is written).

    A new or empty folder gets the cache marker; an existing one must carry it (anything else, a cache of
    format 1 included, is refused naming what it is). `overwrite` empties a marked cache that holds only
    what a cache writes (else refuses, naming the rest). A cache of the other `kind` (targets for `extract`, logits
    for `extract-logits`) is refused with or without `overwrite`: each command replaces only its own kind. Stale
    temporaries are removed. Returns the held lock; a second extract into the same folder gets a one-line UserError
    naming the holder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file, not a cache directory; choose another path")
    entries = [e for e in _entries(out) if e != LOCK_FILE]   # a lock alone: an extract that is claiming it
    if entries and not is_cache(out):
        if (out / MANIFEST).is_file() and not (out / RUN_MARKER).exists():
            raise UserError(f"--out {out} holds a cache of an older g2sd-cache (format 1, no {CACHE_MARKER} marker); "
                            f"this one writes format {FORMAT_VERSION} only: extract into a new --out, or delete the "
                            f"old cache yourself first")
        raise UserError(f"--out {out} is not a g2sd-cache cache (no {CACHE_MARKER} marker): it is "
                        f"{_what_it_is(out, entries)}; nothing was changed. Choose a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror})") from e
    command = CACHE_KINDS[kind]
    lock = FolderLock(out, LOCK_FILE, command)
    try:
        found = cache_kind(out) if entries else None
        if found is not None and found != kind:
            raise UserError(f"--out {out} is a {found} cache (written by `g2sd-cache {CACHE_KINDS[found]}`); {command} "
                            f"writes a {kind} cache and replaces only its own kind{' (even with --overwrite)' if overwrite else ''}: "
                            f"nothing was changed. Choose another --out")
        if entries and overwrite:
            foreign = foreign_entries(out)
            if foreign:
                raise UserError(f"--out {out} is a cache but also holds {_few(foreign)}, which a cache does not "
                                f"write; --overwrite deletes nothing it did not write: move those away first")
            for name in _entries(out):
                if name != LOCK_FILE:
                    path = out / name
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if not is_cache(out):
            _write_marker(out, CACHE_MARKER, "cache", {"format_version": FORMAT_VERSION, "kind": kind})
        remove_stale_temporaries(out)
    except BaseException:
        lock.release()
        raise
    return lock


def _temp_writer(name: str) -> tuple[str | None, int | None]:
    """(host, pid) written into a temporary's name: NAME.tmp-PID or NAME.tmp-HOST-PID."""
    tail = name.split(TMP_MARK, 1)[1]
    host, _, pid = tail.rpartition("-")
    return (host or None), (int(pid) if pid.isdigit() else None)


def _alive_elsewhere(host: str | None, pid: int | None) -> bool:
    """Whether a temporary's writer is another process still alive on this host (a name without a host is
    from no writer of this version: stale)."""
    if pid is None or host is None or pid == os.getpid() or host != _host():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Delete the temporaries (top-level `*.tmp-*` files and folders) of writers that are gone; call it
    holding the folder's lock. Returns the names deleted."""
    removed = []
    for name in _entries(folder):
        if not is_our_temporary(name):
            continue
        host, pid = _temp_writer(name)
        if _alive_elsewhere(host, pid):
            print(f"note: {folder / name} belongs to process {pid}, still running on this host: left alone")
            continue
        path = folder / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        removed.append(name)
    return removed


# ----------------------------------------------------------------------------------------------
# runs

def claim_run_folder(path: Path, resume: bool) -> None:
    """Make `path` a training run folder (rank 0, before anything is written there): refuses a file, a
    cache, a dataset and any non-empty folder without the run marker; `resume` needs the marker. Writes
    the marker into a new or empty folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is an existing file; pass a folder for the run")
    entries = _entries(path)
    if is_run(path):
        return
    if resume:
        raise UserError(f"--out {path} is not a g2sd-cache training run (no {RUN_MARKER} marker); pass the --out "
                        f"of the run to continue, or train without --resume to start a new one")
    if entries:
        raise UserError(f"--out {path} is {_what_it_is(path, entries)}; train writes only into a new or empty folder "
                        f"or one of its own runs: choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot create it ({e.strerror})") from e
    _write_marker(path, RUN_MARKER, "run", {})


# ----------------------------------------------------------------------------------------------
# the demo

DEMO_MARKER = ".g2sd-demo"


def claim_demo_folder(path: Path, outputs: tuple[str, ...]) -> list[str]:
    """Make `path` a demo folder: a new or empty folder, or an earlier demo's (marked). Of an earlier demo's folder
    only the entries the demo writes (`outputs`, top-level names) are deleted; whatever else is there (a user's
    notes, a `train --out DEMO/my-run`) is kept, and its names returned. Anything else is refused naming what it
    is: the demo deletes only what it wrote."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is an existing file; pass a folder for the demo")
    entries = _entries(path)
    kept = []
    if entries:
        if read_marker(path, DEMO_MARKER, "demo") is None:
            raise UserError(f"--out {path} is {_what_it_is(path, entries)}; the demo replaces only a folder it made "
                            f"itself: choose a new or empty --out")
        for name in entries:
            entry = path / name
            if name in outputs:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            elif name != DEMO_MARKER:
                kept.append(name)
    path.mkdir(parents=True, exist_ok=True)
    _write_marker(path, DEMO_MARKER, "demo", {})
    return kept
