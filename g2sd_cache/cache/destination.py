"""Where extract puts a cache: a local folder (`LocalDestination`) or an fsspec URL (`UrlDestination`).

Shards are always written on a local disk first (cache/writer.py). For a folder that is the cache itself:
the shard is renamed into place. For a URL the shard is written into a staging folder, then uploaded
file by file, its `shard.json` last: on the store a shard exists exactly when its shard.json does (the
commit record), so a kill during an upload leaves files that no reader looks at and that the next run
replaces. The staging folder holds at most the shard being written (the writer's queue holds one more in
memory) and each shard is deleted from it once uploaded. The manifest is written last of all.

Resume on a URL: a shard counts as done when its shard.json is there and every file it lists is on the
store at its recorded size with its recorded digest (zarr.json whole; a zarr shard file by its index and
inner crc32c, read with a few ranged GETs: cache/digests.py); anything else under its name is removed
and the shard redone.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from g2sd_cache.cache.digests import fsspec_reader, record_digest, shard_digests
from g2sd_cache.cache.lease import LeaseLock
from g2sd_cache.cache.ownership import (CACHE_KINDS, FolderLock, TOOL, claim_cache_folder, is_our_temporary, _now,
                                        _version)
from g2sd_cache.cache.remote import is_remote, url_fs, with_retries
from g2sd_cache.cache.schema import (BASIS_FILE, CALIBRATION_FILE, CACHE_MARKER, CONFIG, FORMAT_VERSION, LOCK_FILE, MANIFEST, SHARD_PREFIX, SHARD_RECORD,
                                     TMP_MARK, shard_name)
from g2sd_cache.common.config import read_yaml
from g2sd_cache.common.errors import UserError
from g2sd_cache.common.fsutil import write_bytes_atomic, write_text_atomic


class LocalDestination:
    """A cache folder on a local or mounted disk: shards are published by rename (cache/writer.py)."""

    def __init__(self, out: str, kind: str = "targets"):
        self.out = Path(out)
        self.staging = self.out
        self.kind = kind
        self.lock: FolderLock | None = None

    def claim(self, overwrite: bool) -> None:
        self.lock = claim_cache_folder(self.out, overwrite, kind=self.kind)

    def read_config(self) -> dict | None:
        path = self.out / CONFIG
        return read_yaml(path) if path.exists() else None

    def write_text(self, rel: str, text: str) -> None:
        write_text_atomic(self.out / rel, text)

    def write_bytes(self, rel: str, data: bytes) -> None:
        write_bytes_atomic(self.out / rel, data)

    def read_bytes(self, rel: str) -> bytes | None:
        path = self.out / rel
        return path.read_bytes() if path.is_file() else None

    def read_record(self, index: int) -> bytes | None:
        path = self.out / shard_name(index) / SHARD_RECORD
        return path.read_bytes() if path.is_file() else None

    def is_complete(self, index: int) -> bool:
        return (self.out / shard_name(index) / SHARD_RECORD).is_file()

    def clear_unfinished(self, indices: list[int]) -> None:
        mine = {shard_name(i) for i in indices}
        for path in self.out.glob(f".shard-*{TMP_MARK}*"):
            if is_our_temporary(path.name) and path.name[1:].split(TMP_MARK)[0] in mine:
                shutil.rmtree(path, ignore_errors=True)

    publish = None     # the writer's rename is the publication

    def check(self) -> None:
        pass

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class UrlDestination:
    """A cache at an fsspec URL (s3://, gs://, memory://, ...)."""

    def __init__(self, url: str, staging: str | None, lease_s: float = 120.0, kind: str = "targets"):
        self.url = url.rstrip("/")
        self.kind = kind
        self.fs, self.path = url_fs(self.url)
        self.path = self.path.rstrip("/")
        self.lease_s = lease_s
        root = Path(staging) if staging else Path(tempfile.gettempdir())
        try:
            root.mkdir(parents=True, exist_ok=True)
            # our own folder inside it (named as a temporary of this process): deleted at the end
            self.staging = Path(tempfile.mkdtemp(dir=root, prefix=f"g2sd-staging{TMP_MARK}"))
        except OSError as e:
            raise UserError(f"--staging {root}: cannot create a staging folder there ({e.strerror})") from e
        self.lease: LeaseLock | None = None

    # -- small objects ---------------------------------------------------------------------------------
    def _p(self, rel: str) -> str:
        return f"{self.path}/{rel}"

    def _cat(self, rel: str) -> bytes | None:
        try:
            return with_retries(lambda: self.fs.cat_file(self._p(rel)), f"{self.url}/{rel}")
        except FileNotFoundError:
            return None

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One PUT: an object store never shows a partly written object under its name."""
        with_retries(lambda: self.fs.pipe_file(self._p(rel), data), f"{self.url}/{rel}")

    def read_bytes(self, rel: str) -> bytes | None:
        return self._cat(rel)

    def read_config(self) -> dict | None:
        raw = self._cat(CONFIG)
        if raw is None:
            return None
        data = yaml.safe_load(raw)
        if not isinstance(data, dict):
            raise UserError(f"{self.url}/{CONFIG} is not a configuration written by extract; choose another --out")
        return data

    def read_record(self, index: int) -> bytes | None:
        return self._cat(f"{shard_name(index)}/{SHARD_RECORD}")

    # -- ownership ---------------------------------------------------------------------------------------
    def _entries(self) -> list[str]:
        try:
            listed = with_retries(lambda: self.fs.ls(self.path, detail=False, refresh=True), self.url)
        except FileNotFoundError:
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in listed]
        return sorted(n for n in names if n)

    def _marker(self) -> dict | None:
        raw = self._cat(CACHE_MARKER)
        try:
            data = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        return data if isinstance(data, dict) and data.get("tool") == TOOL and data.get("what") == "cache" else None

    def _is_cache(self) -> bool:
        return self._marker() is not None

    def _kind(self) -> str:
        """The kind of cache the marker names (markers written before kinds were recorded: a target cache's)."""
        kind = (self._marker() or {}).get("kind")
        return kind if kind in CACHE_KINDS else "targets"

    def _objects(self, prefix: str) -> dict[str, int]:
        """Every object under `prefix` (relative to it) -> size."""
        try:
            found = with_retries(lambda: self.fs.find(self._p(prefix), detail=True), f"{self.url}/{prefix}")
        except FileNotFoundError:
            return {}
        base = self._p(prefix).rstrip("/") + "/"
        return {p[len(base):]: int(info.get("size") or 0) for p, info in found.items()
                if p.startswith(base) and info.get("type") != "directory"}

    def _ours(self, name: str) -> bool:
        if name in (CACHE_MARKER, LOCK_FILE, CONFIG, MANIFEST, BASIS_FILE, CALIBRATION_FILE) or TMP_MARK in name:
            return True
        if not name.startswith(SHARD_PREFIX):
            return False
        for rel in self._objects(name):   # a shard: its record, zarr.json, and array folders of zarr files
            parts = rel.split("/")
            if not (rel in (SHARD_RECORD, "zarr.json") or (len(parts) == 2 and parts[1] == "zarr.json")
                    or (len(parts) > 2 and parts[1] == "c")):
                return False
        return True

    def claim(self, overwrite: bool) -> None:
        """As ownership.claim_cache_folder, on a URL: only a marked cache is resumed or replaced, and only
        when it holds nothing a cache does not write; the lease makes this extract the one writer."""
        entries = [e for e in self._entries() if e != LOCK_FILE]
        if entries and not self._is_cache():
            what = ("a cache of an older g2sd-cache or one copied without its marker" if MANIFEST in entries
                    else f"not ours (it holds {', '.join(entries[:4])}{' ...' if len(entries) > 4 else ''})")
            raise UserError(f"--out {self.url} is not a g2sd-cache cache (no {CACHE_MARKER} marker): it is {what}; "
                            f"nothing was changed. Choose a new or empty location")
        command = CACHE_KINDS[self.kind]
        self.lease = LeaseLock(self.fs, self._p(LOCK_FILE), self.url, command, self.lease_s)
        try:
            found = self._kind() if entries else None
            if found is not None and found != self.kind:
                raise UserError(f"--out {self.url} is a {found} cache (written by `g2sd-cache {CACHE_KINDS[found]}`); "
                                f"{command} writes a {self.kind} cache and replaces only its own kind"
                                f"{' (even with --overwrite)' if overwrite else ''}: nothing was changed. Choose another --out")
            if entries and overwrite:
                foreign = [e for e in entries if not self._ours(e)]
                if foreign:
                    raise UserError(f"--out {self.url} is a cache but also holds {', '.join(foreign[:4])}, which a "
                                    f"cache does not write; --overwrite deletes nothing it did not write: move those "
                                    f"away first")
                for name in entries:   # the marker last: an interrupted --overwrite leaves a marked cache
                    if name != CACHE_MARKER:
                        with_retries(lambda: self.fs.rm(self._p(name), recursive=True), f"{self.url}/{name}")
            if not self._is_cache():
                marker = {"what": "cache", "tool": TOOL, "version": _version(), "format_version": FORMAT_VERSION,
                          "kind": self.kind, "created": _now()}
                self.write_text(CACHE_MARKER, json.dumps(marker, indent=1) + "\n")
        except BaseException:
            self.release()
            raise

    def check(self) -> None:
        if self.lease is not None:
            self.lease.check()

    # -- shards -----------------------------------------------------------------------------------------
    def is_complete(self, index: int) -> bool:
        """The shard's shard.json is there and every file it lists has its recorded size and digest."""
        name = shard_name(index)
        raw = self.read_record(index)
        if raw is None:
            return False
        try:
            record = json.loads(raw)
            files, digests = dict(record["files"]), dict(record["digests"])
        except (ValueError, KeyError, TypeError):
            return self._discard(name, "its shard.json is unreadable")
        sizes = self._objects(name)
        wrong = [rel for rel, size in files.items() if sizes.get(rel) != size]
        if wrong:
            return self._discard(name, f"{wrong[0]} is missing or has the wrong size")
        try:
            got = shard_digests(files, lambda rel: self._cat(f"{name}/{rel}") or b"",
                                lambda rel: fsspec_reader(self.fs, self._p(f"{name}/{rel}")))
        except ValueError as e:
            return self._discard(name, str(e))
        bad = [rel for rel in files if got.get(rel) != digests.get(rel)]
        return True if not bad else self._discard(name, f"{bad[0]} does not match its digest")

    def _discard(self, name: str, why: str) -> bool:
        print(f"note: {self.url}/{name} is redone: {why}")
        with_retries(lambda: self.fs.rm_file(self._p(f"{name}/{SHARD_RECORD}")), f"{self.url}/{name}")
        return False

    def clear_unfinished(self, indices: list[int]) -> None:
        """Remove what killed uploads left under the names of shards about to be redone (ours: no shard.json)."""
        present = set(self._entries())
        for i in indices:
            name = shard_name(i)
            if name in present and self._ours(name):
                with_retries(lambda: self.fs.rm(self._p(name), recursive=True), f"{self.url}/{name}")

    def publish(self, local: Path) -> None:
        """Upload the finished shard folder `local` (in staging), shard.json last, then delete it locally."""
        self.check()
        name = local.name
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        for rel in files:
            if rel != SHARD_RECORD:
                with_retries(lambda: self.fs.put_file(str(local / rel), self._p(f"{name}/{rel}")),
                             f"upload of {self.url}/{name}/{rel}")
        sizes = self._objects(name)
        for rel in files:
            if rel != SHARD_RECORD and sizes.get(rel) != (local / rel).stat().st_size:
                raise UserError(f"upload of {self.url}/{name}/{rel}: the store holds {sizes.get(rel)} bytes, "
                                f"{(local / rel).stat().st_size} were sent; rerun to redo the shard")
        self.check()
        with_retries(lambda: self.fs.put_file(str(local / SHARD_RECORD), self._p(f"{name}/{SHARD_RECORD}")),
                     f"upload of {self.url}/{name}/{SHARD_RECORD}")
        shutil.rmtree(local)

    def release(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def open_destination(out: str, staging: str | None = None, lease_s: float = 120.0, kind: str = "targets"):
    """Where a cache of `kind` ("targets": extract, "logits": extract-logits) is written."""
    return UrlDestination(out, staging, lease_s, kind) if is_remote(out) else LocalDestination(out, kind)


def finished_records(out, indices: list[int]) -> tuple[list[str], list[str]]:
    """Rank 0, before it writes a manifest: each finished shard's shard.json text and its digest (which the
    manifest records, binding each record, and so every file it lists, to this cache). `out`: a destination
    of this module (a folder or a URL); a shard without its record is one line, not a half-made manifest."""
    texts, digests = [], []
    for i in indices:
        raw = out.read_record(i)
        if raw is None:
            raise UserError(f"shard {shard_name(i)} is missing after extraction; rerun the same command")
        texts.append(raw.decode())
        digests.append(record_digest(raw))
    return texts, digests
