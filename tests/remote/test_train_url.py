"""Training from a cache on S3 (moto on 127.0.0.1) through a node-local copy of its shard files: the same
losses as from a local disk, each file fetched once per epoch when it fits, never over the size limit when
it does not, and a corrupted object refused by its digest."""
from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest
from tests.common.helpers import MICRO_STUDENT

from g2sd_cache.cache.local_mirror import LocalMirror
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.train import TrainConfig, train


def _upload(local_cache: Path, url: str) -> None:
    """The micro cache on the store, object for object (tests/remote/test_extract_url.py shows extract makes
    exactly these objects)."""
    fs, path = fsspec.core.url_to_fs(url)
    for p in sorted(local_cache.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{path}/{p.relative_to(local_cache).as_posix()}")


def _train(out: Path, cache: str, **kw) -> list[float]:
    cfg = dict(out=str(out), cache=cache, student=MICRO_STUDENT, batch_size=4, workers=0, device="cpu", log_every=1,
               save_every=1000, warmup_steps=1, blr=1e-3, seed=0, steps=6, shuffle_window=5)
    train(TrainConfig(**(cfg | kw)))
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _view_bytes(cache: Path, view: int) -> int:
    return sum(p.stat().st_size for p in cache.glob(f"shard-*/*/c/{view}/**/*") if p.is_file())


def test_training_from_s3_gives_the_local_losses_and_fetches_each_file_once(s3_bucket, micro_cache, tmp_path,
                                                                            monkeypatch):
    url = f"{s3_bucket}/c"
    _upload(micro_cache, url)
    fetched = []
    real = LocalMirror._fetch
    monkeypatch.setattr(LocalMirror, "_fetch", lambda self, spec, tmp: (fetched.append(spec), real(self, spec, tmp))[1])
    local = _train(tmp_path / "local", str(micro_cache))
    remote = _train(tmp_path / "remote", url, local_cache=str(tmp_path / "lc"))
    assert remote == local     # 6 steps of 4 = 2 epochs: views 0 and 1
    # each file of each view once, all of them: the epochs' share of the cache, no more
    names = [(f.name, f.rel) for f in fetched]
    assert len(names) == len(set(names))
    assert sum(f.size for f in fetched) == _view_bytes(micro_cache, 0) + _view_bytes(micro_cache, 1)
    # a second run reads the local copies: nothing is fetched
    fetched.clear()
    assert _train(tmp_path / "again", url, local_cache=str(tmp_path / "lc")) == local
    assert fetched == []


def test_a_limit_smaller_than_an_epoch_evicts_and_is_never_exceeded(s3_bucket, micro_cache, tmp_path, monkeypatch):
    url = f"{s3_bucket}/c"
    _upload(micro_cache, url)
    one_shard = max(sum(p.stat().st_size for p in (micro_cache / s).glob("*/c/0/**/*") if p.is_file())
                    for s in ("shard-00000", "shard-00001", "shard-00002"))
    limit = int(2.5 * one_shard)            # an epoch reads 3 shards; a micro-batch of 4 may span 2
    peak = []
    real = LocalMirror._download

    def download(self, spec, urgent):
        real(self, spec, urgent)
        node = self._node_lock()
        peak.append(self._usage()[0])
        os.close(node)
    monkeypatch.setattr(LocalMirror, "_download", download)
    local = _train(tmp_path / "local", str(micro_cache))
    assert _train(tmp_path / "remote", url, local_cache=str(tmp_path / "lc"), local_cache_limit=str(limit)) == local
    assert peak and max(peak) <= limit
    held = sum(p.stat().st_size for p in (tmp_path / "lc").rglob("*") if p.is_file())
    assert held <= limit


def test_a_corrupted_object_is_refused_by_its_digest(s3_bucket, micro_cache, tmp_path):
    url = f"{s3_bucket}/c"
    _upload(micro_cache, url)
    fs, path = fsspec.core.url_to_fs(url)
    victim = sorted(p for p in fs.find(f"{path}/shard-00001") if "/target/c/0/" in p)[0]
    data = bytearray(fs.cat_file(victim))
    data[len(data) // 3] ^= 0xFF          # one flipped bit in a chunk's body: same size
    fs.pipe_file(victim, bytes(data))
    # refused as a corrupt local file is, naming the object
    with pytest.raises(UserError, match=r"shard-00001 is corrupt: target/c/0/\S+: inner chunk \d+ fails its crc32c "
                                        r"\(the object s3://\S+/c/shard-00001/target/c/0/\S+ on the store"):
        _train(tmp_path / "remote", url, local_cache=str(tmp_path / "lc"))
    # nothing of it under a final name
    assert not [p for p in (tmp_path / "lc").rglob("shard-00001/target/c/0/**/*") if p.is_file() and not p.name.endswith(".lock")]


def test_a_limit_of_a_few_spans_fetches_each_byte_once_per_epoch(s3_bucket, image_folder, tmp_path, monkeypatch,
                                                                 capsys):
    """--shuffle-span: the epoch is read span by span (generic/plan.py), so a local copy limited to ~2 spans' files,
    a third of the epoch's share, fetches every file of each epoch exactly once, never holds more than the limit,
    and trains the local-disk losses of the same order; without spans the same limit fetches files again."""
    from g2sd_cache.generic.extract import run_extract
    from tests.common.helpers import micro_extract_config
    cache = tmp_path / "cache"        # 6 shards of 2 images x 2 views, 1-view inner chunks: blocks of one row
    run_extract(micro_extract_config(image_folder, cache, shard_size=4, chunk_views=1))
    url = f"{s3_bucket}/c"
    _upload(cache, url)
    unit = max(sum(p.stat().st_size for p in (cache / s.name).glob("*/c/0/**/*") if p.is_file())
               for s in cache.glob("shard-*"))
    limit = int(2.2 * unit)           # the shard read now and the next one
    assert 3 * limit < 2 * _view_bytes(cache, 0)
    fetched, peak = [], []
    real_fetch, real_download = LocalMirror._fetch, LocalMirror._download
    monkeypatch.setattr(LocalMirror, "_fetch", lambda self, spec, tmp: (fetched.append(spec), real_fetch(self, spec, tmp))[1])

    def download(self, spec, urgent):
        real_download(self, spec, urgent)
        node = self._node_lock()
        peak.append(self._usage()[0])
        os.close(node)
    monkeypatch.setattr(LocalMirror, "_download", download)
    kw = dict(steps=6, batch_size=4, shuffle_window=2, shuffle_span=2)       # 12 views an epoch: 2 epochs
    local = _train(tmp_path / "local", str(cache), **kw)
    assert _train(tmp_path / "remote", url, local_cache=str(tmp_path / "lc"), local_cache_limit=str(limit), **kw) == local
    names = [(f.name, f.rel) for f in fetched]
    assert len(names) == len(set(names))
    assert sum(f.size for f in fetched) == _view_bytes(cache, 0) + _view_bytes(cache, 1)
    assert peak and max(peak) <= limit
    assert "fetched more than once" not in capsys.readouterr().out
    fetched.clear()                   # the whole-epoch shuffle with that limit: some file is fetched again
    _train(tmp_path / "whole", url, local_cache=str(tmp_path / "lc2"), local_cache_limit=str(limit),
           **(kw | {"shuffle_span": 0}))
    assert sum(f.size for f in fetched) > _view_bytes(cache, 0) + _view_bytes(cache, 1)
    assert "files are fetched more than once; --shuffle-span" in capsys.readouterr().out    # train says so


def test_a_remote_shard_is_checked_once_per_process_with_one_listing(s3_bucket, micro_cache, tmp_path, monkeypatch):
    """First touch of a remote shard: its object sizes from one listing (not a HEAD per file: ~10 ms of CPU and a
    round trip each), once however many download threads touch it at the same time; a missing object is named."""
    import collections
    import threading

    import s3fs

    from g2sd_cache.cache.local_mirror import LocalCacheConfig
    from g2sd_cache.cache.reader import Cache, open_cache
    from g2sd_cache.common.errors import CacheCorruptError
    url = f"{s3_bucket}/c"
    _upload(micro_cache, url)
    cache = open_cache(url, LocalCacheConfig(str(tmp_path / "lc")))
    calls, checks = collections.Counter(), []
    real_call, real_check = s3fs.S3FileSystem._call_s3, Cache._check_sizes

    async def counted(self, method, *a, **k):
        calls[method] += 1
        return await real_call(self, method, *a, **k)
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    monkeypatch.setattr(Cache, "_check_sizes", lambda self, shard, **k: (checks.append(shard), real_check(self, shard, **k))[1])
    threads = [threading.Thread(target=cache._touch, args=(1,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert checks == [1]
    assert calls["head_object"] == 0 and calls["list_objects_v2"] >= 1
    fs, path = fsspec.core.url_to_fs(url)
    gone = sorted(p for p in fs.find(f"{path}/shard-00002") if "/mask/c/1/" in p)[0]
    fs.rm_file(gone)
    with pytest.raises(CacheCorruptError, match=r"shard-00002 is corrupt: file mask/c/1/\S+ is missing"):
        cache._touch(2)


def test_a_local_copy_evicted_while_mapped_is_let_go_at_the_next_open(s3_bucket, micro_cache, tmp_path):
    """A local copy removed while this process still maps it (another rank's mirror evicted it) keeps its disk
    blocks until the map is closed: the reader lets it go the next time it opens a file, so the folder's real
    disk use cannot run OPEN_FILES files past --local-cache-limit. Checked in the kernel's own list of this
    process's mappings."""
    import gc

    from g2sd_cache.cache.local_mirror import LocalCacheConfig
    from g2sd_cache.cache.reader import open_cache
    url = f"{s3_bucket}/c"
    _upload(micro_cache, url)
    folder = tmp_path / "lc"
    cache = open_cache(url, LocalCacheConfig(str(folder)))

    def deleted_maps() -> list[str]:
        gc.collect()
        return [line for line in Path("/proc/self/maps").read_text().splitlines()
                if str(folder) in line and line.endswith("(deleted)")]
    cache.read_block(0, 0, 0, 1)
    mapped = sorted(p for p in folder.rglob("*") if p.is_file() and "/shard-" in str(p) and not p.name.startswith("."))
    assert mapped, "the first read made no local copy"
    for p in mapped:
        p.unlink()                       # as another rank's eviction does
    assert deleted_maps(), "the reader should still map the removed copies (the situation under test)"
    cache.read_block(1, 0, 0, 1)         # the next open lets them go
    assert deleted_maps() == []
    cache.close()
