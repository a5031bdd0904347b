"""A logits cache (cache/logits.py) on an object store: read by copying it whole to a node-local folder.

Why whole and not through the target cache's plan-driven mirror (cache/local_mirror.py): a logits cache is
small (22 B per sample per cached epoch: ImageNet-1k at K = 8 is ~225 MB) and `finetune` reads every group of
a cached epoch every epoch, in a shuffled group order, so every file is needed at once and a size limit or
eviction buys nothing; one copy per node then memory-maps like a local cache (the stage-2 step never waits on
the store), and the copy is reused by every later run with the same cache.

    manifest.json (from the store) -> folder `logits-<its digest>` under the local cache, under a file lock
    (a node's ranks copy once) -> config.yaml -> per shard: shard.json, checked against the manifest's digest;
    each file into a temporary, its size, digest (shard.json's) and every inner chunk's crc32c checked, then
    renamed; shard.json -> manifest.json last: the copy is complete exactly when its manifest is there.

A wrong byte never gets a final name: a truncated body is retried (remote.with_retries), a digest or crc32c
mismatch is fetched once more and then refused naming the object. A killed copy leaves temporaries that the
next copy removes; files already renamed were checked and are kept.

`verbatim_copy` (verify): every object under the URL as it is, so that verify reports what the store holds
(leftovers, foreign objects, damage) with the same checks as on a disk.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from g2sd_cache.cache.digests import digest_mismatch, downloaded_file_problem, is_metadata, record_digest
from g2sd_cache.cache.logits import LogitsManifest
from g2sd_cache.cache.remote import TruncatedBody, url_fs, with_retries
from g2sd_cache.cache.schema import CONFIG, MANIFEST, SHARD_RECORD
from g2sd_cache.cache.zarr_layout import parse_layout
from g2sd_cache.common.errors import CacheCorruptError, UserError
from g2sd_cache.common.fsutil import TMP_MARK, write_bytes_atomic


def _cat(fs, path: str, shown: str) -> bytes | None:
    try:
        return with_retries(lambda: fs.cat_file(path), shown)
    except FileNotFoundError:
        return None


def read_manifest(url: str) -> tuple[bytes, LogitsManifest]:
    """The manifest of the logits cache at `url` (its bytes and parsed); one line if there is none."""
    fs, root = url_fs(url)
    root = root.rstrip("/")
    raw = _cat(fs, f"{root}/{MANIFEST}", f"{url}/{MANIFEST}")
    if raw is None:
        config = _cat(fs, f"{root}/{CONFIG}", f"{url}/{CONFIG}")
        if config is not None and b"g2sd-logits" in config[:4096]:
            raise UserError(f"logits cache {url} is incomplete: extract-logits has not finished (no {MANIFEST}); "
                            f"rerun the same command to complete it")
        raise UserError(f"{url} is not a logits cache (no {MANIFEST}); create one with `g2sd-cache extract-logits`")
    return raw, LogitsManifest.from_json(raw, url)


def _fetch(fs, remote: str, shown: str, tmp: Path, size: int) -> None:
    def get() -> None:
        fs.get_file(remote, str(tmp))
        got = tmp.stat().st_size
        if got != size:
            raise TruncatedBody(f"received {got} of {size} bytes")
    with_retries(get, f"download of {shown}")


def local_copy(url: str, folder: str) -> Path:
    """The node-local copy of the logits cache at `url` under `folder` (made or completed now); see the module
    docstring. Raises CacheCorruptError naming the object for a store object that fails its digest."""
    raw, manifest = read_manifest(url)
    fs, root = url_fs(url)
    root, url = root.rstrip("/"), url.rstrip("/")
    dest = Path(folder) / f"logits-{record_digest(raw)[:16]}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--local-cache {folder}: cannot create it ({e.strerror})") from e
    fd = os.open(dest / ".copy.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)      # one copy per node: the other ranks wait, then find it complete
        if (dest / MANIFEST).is_file() and (dest / MANIFEST).read_bytes() == raw:
            return dest
        for p in dest.rglob(f"*{TMP_MARK}*"):   # a killed copy's (under the lock no other copy runs)
            p.unlink(missing_ok=True)
        config = _cat(fs, f"{root}/{CONFIG}", f"{url}/{CONFIG}")
        if config is not None:
            write_bytes_atomic(dest / CONFIG, config)
        for entry in manifest.shards:
            _copy_shard(fs, root, url, dest, entry)
        write_bytes_atomic(dest / MANIFEST, raw)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return dest


def _copy_shard(fs, root: str, url: str, dest: Path, entry: dict) -> None:
    name = entry["name"]
    shown_record = f"{url}/{name}/{SHARD_RECORD}"
    record_raw = _cat(fs, f"{root}/{name}/{SHARD_RECORD}", shown_record)
    if record_raw is None:
        raise CacheCorruptError.in_shard(name, f"{SHARD_RECORD} is missing (the object {shown_record})")
    if record_digest(record_raw) != entry.get("record"):
        raise CacheCorruptError.in_shard(name, f"{SHARD_RECORD} is not the one the manifest records (the object "
                                               f"{shown_record} on the store)")
    try:
        digests = dict(json.loads(record_raw)["digests"])
    except (ValueError, KeyError, TypeError) as e:
        raise CacheCorruptError.in_shard(name, f"{SHARD_RECORD} is unreadable ({type(e).__name__})") from e
    files = dict(entry["files"])
    for rel in sorted(files, key=lambda r: (not is_metadata(r), r)):   # zarr.json first: they describe the rest
        final, size = dest / name / rel, int(files[rel])
        if final.is_file() and final.stat().st_size == size:
            continue       # renamed only after its checks
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}{TMP_MARK}{os.uname().nodename}-{os.getpid()}")
        shown = f"{url}/{name}/{rel}"
        problem = None
        for _ in range(2):     # a mismatch is fetched once more: it may be a bad transfer
            _fetch(fs, f"{root}/{name}/{rel}", shown, tmp, size)
            if is_metadata(rel):
                problem = digest_mismatch(rel, record_digest(tmp.read_bytes()), digests)
            else:
                try:
                    layout = parse_layout(json.loads((dest / name / rel.split("/", 1)[0] / "zarr.json").read_text()))
                except (OSError, ValueError) as e:
                    problem = f"{rel}: its array's zarr.json cannot be read ({type(e).__name__})"
                else:
                    problem = downloaded_file_problem(str(tmp), rel, layout, digests)
            if problem is None:
                break
        if problem is not None:
            tmp.unlink(missing_ok=True)
            raise CacheCorruptError.in_shard(name, f"{problem} (the object {shown} on the store, downloaded twice)")
        os.replace(tmp, final)
    write_bytes_atomic(dest / name / SHARD_RECORD, record_raw)


def verbatim_copy(url: str, into: Path) -> Path:
    """Every object under `url`, as it is, into the empty folder `into` (verify's view of the store)."""
    fs, root = url_fs(url)
    root = root.rstrip("/")
    try:
        found = with_retries(lambda: fs.find(root), url)
    except FileNotFoundError:
        found = []
    for path in found:
        rel = path[len(root) + 1:]
        if not rel:
            continue
        local = into / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        with_retries(lambda: fs.get_file(path, str(local)), f"download of {url}/{rel}")
    return into
