"""A node-local copy of the shard files a training run reads from a cache on an object store.

    the plan (the shards this node reads, step by step)  ->  downloader: the next `prefetch_files` files not
    yet here, `threads` at a time, each GET into a temporary, its size and digest checked (shard.json's,
    cache/digests.py), then renamed into place        ->  the reader memory-maps the local copy as on a
    local disk (cache/reader.py), so the pixel path is unchanged.

- Never a partial file under a final name: a download lands in `.NAME.SIZE.tmp-HOST-PID-N` and is renamed
  only after its size and digest match; a killed trainer leaves temporaries that the next run deletes
  (those of processes gone from this host).
- Never over `limit` bytes (final files + downloads in flight at their full size): before a download,
  files the rest of the plan does not need are evicted, least recently used first; a file the reader
  is waiting for may also evict the file whose next use is furthest away (an epoch that does not fit);
  a prefetch never evicts a file that is needed.
- The ranks of a node share the folder: every rank's plan is the node's (all its ranks' samples), each
  file is downloaded by whoever takes its lock file first and the others wait for the rename.
- `fetched_bytes` counts what this process downloaded (the benchmark's bytes per epoch).
"""
from __future__ import annotations

import bisect
import fcntl
import os
import threading
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from g2sd_cache.cache.remote import RetryPolicy, TruncatedBody, with_retries
from g2sd_cache.common.errors import CacheCorruptError, UserError
from g2sd_cache.common.fsutil import TMP_MARK


@dataclass(frozen=True)
class LocalCacheConfig:
    """Where and how much of a remote cache is kept on this node. `limit` in bytes (None: no limit)."""

    folder: str
    limit: int | None = None
    prefetch_files: int = 16
    threads: int = 8


def parse_size(text: str | int | None) -> int | None:
    """'20GB', '512M', '1.5T', '1000000' -> bytes (powers of 1024 for K/M/G/T); None -> None."""
    if text is None or isinstance(text, int):
        return text
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise UserError(f"--local-cache-limit {text}: give a size such as 50GB, 800M or 1T") from None
    if value <= 0:
        raise UserError(f"--local-cache-limit {text}: must be more than 0")
    return int(value)


def default_folder() -> str:
    import tempfile
    return os.path.join(tempfile.gettempdir(), f"g2sd-cache-{os.getuid()}")


@dataclass(frozen=True)
class FileSpec:
    """One shard file to mirror: `rel` under shard `shard` (its folder name), `size` bytes."""

    shard: int
    name: str
    rel: str
    size: int


def _alive_here(host: str, pid: int) -> bool:
    if host != os.uname().nodename:
        return True     # another host's: not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalMirror:
    """Local copies of the files of a remote cache at `fs`/`root` (shown as `url`) under `folder`.

    `check(spec, local_path)` returns the problem with a downloaded file (digest), or None."""

    def __init__(self, fs, root: str, url: str, folder: Path, cfg: LocalCacheConfig,
                 check: Callable[[FileSpec, str], str | None], policy: RetryPolicy | None = None):
        self.fs, self.root, self.url, self.dir, self.cfg = fs, root.rstrip("/"), url, Path(folder), cfg
        self.check, self.policy = check, policy
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--local-cache {self.dir}: cannot create it ({e.strerror})") from e
        self.fetched_bytes = 0
        self._lock = threading.Condition()
        self._inflight: dict[str, Future] = {}
        self._failed: dict[str, BaseException] = {}      # files whose download the reader waited for and that failed
        self._reserved: set[str] = set()   # files of this process whose temporary holds their room (in `_usage`)
        self._pool = ThreadPoolExecutor(max_workers=max(1, cfg.threads), thread_name_prefix="shard-download")
        self._plan: list[list[int]] = []           # per step of the node, the shards it reads
        self._uses: dict[int, list[int]] = {}      # shard -> the steps (indices in _plan) that read it
        self._files: dict[int, list[FileSpec]] = {}
        self._pos = 0
        self._current: int | None = None          # the shard of the read under way (never evicted for another)
        self._seq = 0
        self.remove_stale()

    # -- paths ------------------------------------------------------------------------------------------
    def local_path(self, spec: FileSpec) -> Path:
        return self.dir / spec.name / spec.rel

    def _temp(self, spec: FileSpec) -> Path:
        final = self.local_path(spec)
        with self._lock:
            self._seq += 1
            n = self._seq
        return final.with_name(f".{final.name}.{spec.size}{TMP_MARK}{os.uname().nodename}-{os.getpid()}-{n}")

    def remove_stale(self) -> None:
        """Delete temporaries of downloads whose process is gone (a killed trainer's)."""
        for path in self.dir.rglob(f"*{TMP_MARK}*"):
            tail = path.name.split(TMP_MARK, 1)[1]
            parts = tail.rsplit("-", 2)
            if len(parts) == 3 and parts[1].isdigit() and _alive_here(parts[0], int(parts[1])):
                continue
            path.unlink(missing_ok=True)

    # -- the plan ------------------------------------------------------------------------------------------
    def set_plan(self, steps: list[list[int]], files: Callable[[int], list[FileSpec]]) -> None:
        """The shards the node reads from now on, step by step (each step's shards in any order: a step's reads
        may come in any order, so the plan's position moves by steps); `files(shard)` the files a read needs."""
        with self._lock:
            self._plan = [list(dict.fromkeys(step)) for step in steps]
            self._uses = defaultdict(list)
            for i, step in enumerate(self._plan):
                for s in step:
                    self._uses[s].append(i)
            self._files = {s: files(s) for s in self._uses}
            self._pos, self._current = 0, None
        self._prefetch()

    def _next_use(self, shard: int) -> int | None:
        uses = self._uses.get(shard, [])
        i = bisect.bisect_left(uses, self._pos)
        return uses[i] if i < len(uses) else None

    def touch(self, shard: int) -> None:
        """The reader is at a read of `shard`: move the plan's position to the step of that read, prefetch ahead."""
        with self._lock:
            self._current = shard
            nxt = self._next_use(shard)
            if nxt is not None and nxt != self._pos:
                self._pos = nxt
            elif nxt is None:
                return
        self._prefetch()

    # -- space -------------------------------------------------------------------------------------------
    def _usage(self) -> tuple[int, list[tuple[float, Path, str, int]]]:
        """Bytes held (final files + temporaries at their full size) and the final files as
        (last use, path, "shard folder/rel" key, size)."""
        used, finals = 0, []
        for path in self.dir.glob("*/**/*"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if not path.is_file() or path.name.endswith(".lock"):
                continue
            if TMP_MARK in path.name:
                size = path.name.split(TMP_MARK, 1)[0].rsplit(".", 1)[-1]
                used += int(size) if size.isdigit() else st.st_size
            else:
                used += st.st_size
                finals.append((st.st_atime, path, path.relative_to(self.dir).as_posix(), st.st_size))
        return used, finals

    def _owed(self, spec: FileSpec) -> int:
        """Bytes of the files the plan reads before `spec`'s shard that are neither here nor being fetched (call
        with self._lock held). A prefetch leaves room for them: download threads take the node lock in any order,
        and a later file that took the room first would be evicted again by the reader's own request for an
        earlier one, then fetched a second time."""
        mine = self._next_use(spec.shard)
        if mine is None:
            return 0
        owed = 0
        for s, fs in self._files.items():
            n = self._next_use(s)
            if n is None or n >= mine:
                continue
            owed += sum(f.size for f in fs
                        if f"{f.name}/{f.rel}" not in self._reserved and not self.local_path(f).exists())
        return owed

    def _make_room(self, need: int, urgent: bool, spec: FileSpec | None = None) -> bool:
        """Evict until `need` more bytes fit under the limit (call with the node lock held). A file is needed when
        the rest of the plan reads it (by file, not by shard: a shard's files of another view, an earlier
        epoch's, are not needed although the shard is read again). A prefetch (not `urgent`) of `spec` also keeps
        room for the files read before it (`_owed`) and evicts no needed file."""
        limit = self.cfg.limit
        if limit is None:
            return True
        used, finals = self._usage()
        with self._lock:
            if not urgent and spec is not None:
                need += self._owed(spec)
        if used + need <= limit:
            return True
        with self._lock:
            nxt = {f"{f.name}/{f.rel}": self._next_use(s) for s, fs in self._files.items() for f in fs}
            soon = {f"{f.name}/{f.rel}" for f in self._files.get(self._current, [])}   # the read under way
        unneeded = sorted((f for f in finals if nxt.get(f[2]) is None), key=lambda f: f[0])
        needed = sorted((f for f in finals if nxt.get(f[2]) is not None and f[2] not in soon),
                        key=lambda f: -nxt[f[2]])
        for _, path, _, size in unneeded + (needed if urgent else []):
            if used + need <= limit:
                break
            path.unlink(missing_ok=True)
            used -= size
        return used + need <= limit

    # -- downloads ----------------------------------------------------------------------------------------
    def _node_lock(self):
        fd = os.open(self.dir / ".space.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _download(self, spec: FileSpec, urgent: bool) -> None:
        final, key = self.local_path(spec), f"{spec.name}/{spec.rel}"
        final.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(final.with_name(f".{final.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)     # one downloader per file on this node
            if final.exists():
                return
            node = self._node_lock()
            try:
                if spec.size > (self.cfg.limit or spec.size):
                    raise UserError(f"--local-cache-limit {self.cfg.limit} bytes is smaller than one shard file "
                                    f"({self.url}/{spec.name}/{spec.rel}: {spec.size} bytes); raise it")
                if not self._make_room(spec.size, urgent, spec):
                    if not urgent:
                        return       # a prefetch waits for room; the reader's own request will evict
                    raise UserError(f"--local-cache-limit {self.cfg.limit} bytes cannot hold the files of the next "
                                    f"read ({spec.size} bytes more for {spec.name}/{spec.rel}); raise it")
                tmp = self._temp(spec)
                tmp.touch()          # reserves its full size (the size is in its name)
                with self._lock:
                    self._reserved.add(key)
            finally:
                fcntl.flock(node, fcntl.LOCK_UN)
                os.close(node)
            try:
                self._fetch(spec, tmp)
                node = self._node_lock()      # the space accounting sees the temporary or the file, never both
                try:
                    os.replace(tmp, final)
                finally:
                    fcntl.flock(node, fcntl.LOCK_UN)
                    os.close(node)
            finally:
                tmp.unlink(missing_ok=True)
                with self._lock:
                    self._reserved.discard(key)
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)

    def _fetch(self, spec: FileSpec, tmp: Path) -> None:
        remote = f"{self.root}/{spec.name}/{spec.rel}"
        shown = f"{self.url}/{spec.name}/{spec.rel}"

        def get() -> None:
            self.fs.get_file(remote, str(tmp))
            got = tmp.stat().st_size
            if got != spec.size:
                raise TruncatedBody(f"received {got} of {spec.size} bytes")

        for attempt in range(2):      # a digest mismatch is fetched once more: it may be a bad transfer
            with_retries(get, f"download of {shown}", self.policy)
            with self._lock:
                self.fetched_bytes += spec.size
            problem = self.check(spec, str(tmp))
            if problem is None:
                return
        raise CacheCorruptError.in_shard(spec.name, f"{problem} (the object {shown} on the store, downloaded twice)")

    def _submit(self, spec: FileSpec, urgent: bool) -> Future:
        key = f"{spec.name}/{spec.rel}"
        with self._lock:
            if urgent and key in self._failed:    # failed after its retries: the same answer, not a new round
                fut = Future()
                fut.set_exception(self._failed[key])
                return fut
            fut = self._inflight.get(key)
            if fut is None or (urgent and fut.done()):
                fut = self._pool.submit(self._download, spec, urgent)
                self._inflight[key] = fut
                fut.add_done_callback(lambda f, k=key: self._done(k, f))
            return fut

    def _done(self, key: str, fut: Future) -> None:
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]


    def _prefetch(self) -> None:
        with self._lock:
            ahead, seen = [], set()
            for s in (s for step in self._plan[self._pos:] for s in step):
                if s in seen:
                    continue
                seen.add(s)
                ahead += [f for f in self._files.get(s, []) if not self.local_path(f).exists()]
                if len(ahead) >= self.cfg.prefetch_files:
                    break
            ahead = [f for f in ahead[:self.cfg.prefetch_files]
                     if f"{f.name}/{f.rel}" not in self._inflight and f"{f.name}/{f.rel}" not in self._failed]
        for spec in ahead:
            self._submit(spec, urgent=False)

    def path(self, spec: FileSpec) -> str:
        """The local copy of `spec`, downloaded now if it is not here (blocks; raises the download's error)."""
        final = self.local_path(spec)
        for _ in range(3):
            if final.exists():
                os.utime(final)      # the LRU's clock (atime and mtime)
                return str(final)
            fut = self._submit(spec, urgent=True)
            try:
                fut.result()
            except BaseException as e:
                with self._lock:
                    self._failed[f"{spec.name}/{spec.rel}"] = e
                raise
        if final.exists():
            return str(final)
        raise UserError(f"{final}: evicted again before it could be read; raise --local-cache-limit")

    def close(self) -> None:
        """Cancel the prefetches not started and wait for those running (each removes its temporary)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
