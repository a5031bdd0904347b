"""The node-local copy of a remote cache's files (cache/local_mirror.py), on fsspec's memory store: one
download per file for all the ranks of a node, the size limit, sizes as users write them."""
from __future__ import annotations

import threading

import fsspec
import pytest

from g2sd_cache.cache.local_mirror import FileSpec, LocalCacheConfig, LocalMirror, parse_size
from g2sd_cache.common.errors import UserError


def _store(name: str, files: dict[str, bytes]):
    fs = fsspec.filesystem("memory")
    for rel, data in files.items():
        fs.pipe_file(f"/{name}/{rel}", data)
    return fs


def test_ranks_sharing_a_folder_download_each_file_once(tmp_path):
    fs = _store("m1", {"shard-00000/target/c/0/0/0": b"x" * 1000})
    spec = FileSpec(0, "shard-00000", "target/c/0/0/0", 1000)
    mirrors = [LocalMirror(fs, "/m1", "memory://m1", tmp_path, LocalCacheConfig(str(tmp_path)), lambda s, p: None)
               for _ in range(4)]
    paths = [None] * 4
    threads = [threading.Thread(target=lambda i=i: paths.__setitem__(i, mirrors[i].path(spec))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(m.fetched_bytes for m in mirrors) == 1000
    assert len(set(paths)) == 1 and open(paths[0], "rb").read() == b"x" * 1000
    for m in mirrors:
        m.close()


def test_a_file_larger_than_the_limit_is_one_line(tmp_path):
    fs = _store("m2", {"shard-00000/pixels/c/0/0": b"y" * 5000})
    mirror = LocalMirror(fs, "/m2", "memory://m2", tmp_path, LocalCacheConfig(str(tmp_path), limit=4000),
                         lambda s, p: None)
    with pytest.raises(UserError, match="--local-cache-limit 4000 bytes is smaller than one shard file"):
        mirror.path(FileSpec(0, "shard-00000", "pixels/c/0/0", 5000))
    mirror.close()


def test_a_digest_mismatch_is_fetched_twice_then_refused(tmp_path):
    fs = _store("m3", {"shard-00000/mask/c/0/0": b"z" * 10})
    calls = []
    mirror = LocalMirror(fs, "/m3", "memory://m3", tmp_path, LocalCacheConfig(str(tmp_path)),
                         lambda s, p: calls.append(p) or "file mask/c/0/0 is not the one its record describes")
    with pytest.raises(UserError, match="shard-00000 is corrupt: file mask/c/0/0 is not the one .* downloaded twice"):
        mirror.path(FileSpec(0, "shard-00000", "mask/c/0/0", 10))
    assert len(calls) == 2
    assert [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")] == []
    mirror.close()


def test_sizes_as_users_write_them():
    assert parse_size("200GB") == 200 * 2**30
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("1.5T") == int(1.5 * 2**40)
    assert parse_size("1000") == 1000
    assert parse_size(None) is None
    with pytest.raises(UserError, match="--local-cache-limit lots"):
        parse_size("lots")


def test_a_prefetch_leaves_room_for_the_files_read_before_its_own(tmp_path):
    """Download threads take the node lock in any order. A prefetch of shard 2's file that runs before shard 1's
    must not take the room shard 1 needs: the reader's own request for shard 1 would then evict shard 2's file
    (needed, but read later) and it would be fetched twice. So it waits, and the plan's order fills the folder."""
    files = {f"shard-0000{s}/target/c/0/0": bytes([s]) * 1000 for s in range(3)}
    fs = _store("m4", files)
    specs = {s: FileSpec(s, f"shard-0000{s}", "target/c/0/0", 1000) for s in range(3)}
    # no automatic prefetch: the test runs the download threads' work itself, in the order that goes wrong
    cfg = LocalCacheConfig(str(tmp_path), limit=2500, prefetch_files=0)
    mirror = LocalMirror(fs, "/m4", "memory://m4", tmp_path, cfg, lambda s, p: None)
    mirror.set_plan([[0], [1], [2]], lambda s: [specs[s]])
    mirror.path(specs[0])                               # the read under way
    mirror._download(specs[2], urgent=False)            # shard 2's prefetch happens to run first: no room for 1 then
    assert not mirror.local_path(specs[2]).exists() and mirror.fetched_bytes == 1000
    mirror._download(specs[1], urgent=False)            # shard 1's prefetch: the next read, it fits
    assert mirror.local_path(specs[1]).exists() and mirror.fetched_bytes == 2000
    mirror.touch(1)                                     # the reader moves on: shard 0 is not needed again
    mirror.path(specs[1])
    mirror._download(specs[2], urgent=False)            # now shard 2 fits, evicting only shard 0
    assert mirror.local_path(specs[2]).exists() and not mirror.local_path(specs[0]).exists()
    assert mirror.fetched_bytes == 3000                 # every file once
    mirror.close()
