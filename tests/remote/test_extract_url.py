"""Extract straight to an object store (a moto S3 server on 127.0.0.1): the same cache as on a local disk,
resumable after a kill, one writer at a time, and only our own caches replaced."""
from __future__ import annotations

import json

import fsspec
import pytest
from tests.common.helpers import micro_extract_config

from g2sd_cache.cache.schema import LOCK_FILE, MANIFEST, SHARD_RECORD
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import run_extract


def _local_files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.name not in (".g2sd-cache", LOCK_FILE, "config.yaml")}


def _remote_files(url: str) -> dict[str, bytes]:
    fs, path = fsspec.core.url_to_fs(url)
    out = {}
    for p in fs.find(path):
        rel = p[len(path.rstrip("/")) + 1:]
        if rel.rsplit("/", 1)[-1] not in (".g2sd-cache", LOCK_FILE, "config.yaml"):
            out[rel] = fs.cat_file(p)
    return out


def _same_cache(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """Every file identical but the manifest, which differs only in its creation time."""
    assert sorted(a) == sorted(b)
    for rel in a:
        if rel == MANIFEST:
            ja, jb = json.loads(a[rel]), json.loads(b[rel])
            ja.pop("created"), jb.pop("created")
            assert ja == jb
        else:
            assert a[rel] == b[rel], rel


def test_extract_to_s3_equals_local(s3_bucket, image_folder, micro_cache, tmp_path):
    url = f"{s3_bucket}/caches/c"
    staging = tmp_path / "staging"
    summary = run_extract(micro_extract_config(image_folder, url, staging=str(staging)))
    assert summary["cache_views"] == 24
    _same_cache(_remote_files(url), _local_files(micro_cache))
    fs, path = fsspec.core.url_to_fs(url)
    assert not fs.exists(f"{path}/{LOCK_FILE}")            # the lease is released
    assert list(staging.iterdir()) == []                   # staging emptied


def test_resume_after_killed_upload_redoes_only_the_uncommitted(s3_bucket, image_folder, micro_cache, tmp_path):
    url = f"{s3_bucket}/c"
    run_extract(micro_extract_config(image_folder, url))
    fs, path = fsspec.core.url_to_fs(url)
    # As a kill mid-upload leaves them: shard 1 without its commit record, shard 2 with a truncated file
    # under a complete record, and no manifest.
    fs.rm_file(f"{path}/shard-00001/{SHARD_RECORD}")
    victim = next(p for p in fs.find(f"{path}/shard-00002") if "/target/c/" in p)
    fs.pipe_file(victim, fs.cat_file(victim)[:-7])
    fs.rm_file(f"{path}/{MANIFEST}")
    before = {p: fs.info(p)["LastModified"] for p in fs.find(f"{path}/shard-00000")}
    run_extract(micro_extract_config(image_folder, url))
    _same_cache(_remote_files(url), _local_files(micro_cache))
    assert {p: fs.info(p)["LastModified"] for p in fs.find(f"{path}/shard-00000")} == before   # kept as it was


def test_concurrent_extract_refused_naming_the_holder(s3_bucket, image_folder):
    import os
    import time
    url = f"{s3_bucket}/c"
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{path}/.g2sd-cache", json.dumps({"what": "cache", "tool": "g2sd-cache"}).encode())
    holder = {"owner": "x", "host": "elsewhere", "pid": 4242, "command": "extract", "since": "then",
              "expires": time.time() + 600, "expires_at": "later"}
    fs.pipe_file(f"{path}/{LOCK_FILE}", json.dumps(holder).encode())
    with pytest.raises(UserError, match="another extract is writing into .*pid 4242 on host elsewhere"):
        run_extract(micro_extract_config(image_folder, url))
    # an expired lease, or one of a process gone from this host, is taken over
    fs.pipe_file(f"{path}/{LOCK_FILE}", json.dumps(holder | {"expires": time.time() - 1}).encode())
    run_extract(micro_extract_config(image_folder, url))
    dead = holder | {"host": os.uname().nodename, "pid": 2**22 + 17}
    fs.pipe_file(f"{path}/{LOCK_FILE}", json.dumps(dead).encode())
    run_extract(micro_extract_config(image_folder, url))


def test_overwrite_replaces_only_our_caches(s3_bucket, image_folder):
    fs = fsspec.filesystem("s3")
    data = f"{s3_bucket}/photos"
    fs.pipe_file(f"{data}/a.jpg", b"not ours")
    with pytest.raises(UserError, match="not a g2sd-cache cache"):
        run_extract(micro_extract_config(image_folder, data, overwrite=True))
    assert fs.cat_file(f"{data}/a.jpg") == b"not ours"
    url = f"{s3_bucket}/c"
    run_extract(micro_extract_config(image_folder, url))
    fs.pipe_file(f"{url}/notes.txt", b"mine")
    with pytest.raises(UserError, match="notes.txt"):
        run_extract(micro_extract_config(image_folder, url, overwrite=True, seed=1))
    fs.rm_file(f"{url}/notes.txt")
    with pytest.raises(UserError, match="another configuration"):
        run_extract(micro_extract_config(image_folder, url, seed=1))
    run_extract(micro_extract_config(image_folder, url, overwrite=True, seed=1))
    assert json.loads(fs.cat_file(f"{url}/{MANIFEST}"))["seed"] == 1


def test_a_calibrated_codec_extracts_to_s3_as_on_a_disk_and_readers_check_its_basis(s3_bucket, image_folder, tmp_path,
                                                                                     monkeypatch):
    """--codec auto with a URL --out: fitted here, basis.npy and calibration.json uploaded before any shard (and so
    before the manifest), reused by a resumed extract, and read back digest-checked: training from the store gives
    the local cache's losses, and a basis altered on the store refuses the cache."""
    from g2sd_cache.cache.destination import UrlDestination
    from g2sd_cache.cache.reader import open_cache
    from g2sd_cache.cache.schema import BASIS_FILE, CALIBRATION_FILE
    from tests.remote.test_train_url import _train
    kw = dict(codec="auto", max_error=0.05)
    local = tmp_path / "local"
    run_extract(micro_extract_config(image_folder, local, **kw))
    url = f"{s3_bucket}/c"
    writes = []
    for name in ("write_bytes", "write_text", "publish"):
        real = getattr(UrlDestination, name)
        monkeypatch.setattr(UrlDestination, name, lambda self, *a, _real=real, _n=name: (
            writes.append(a[0] if _n != "publish" else "shard"), _real(self, *a))[1])
    run_extract(micro_extract_config(image_folder, url, **kw))
    _same_cache(_remote_files(url), _local_files(local))          # basis.npy and calibration.json included
    fs, path = fsspec.core.url_to_fs(url)
    assert json.loads(fs.cat_file(f"{path}/{MANIFEST}"))["codec"] == "pca32"     # a low-rank codec: it has a basis
    assert writes.index(BASIS_FILE) < writes.index(CALIBRATION_FILE) < writes.index("shard") < writes.index(MANIFEST)
    # a resumed extract reuses the uploaded calibration rather than fitting again
    fs.rm_file(f"{path}/shard-00002/{SHARD_RECORD}")
    fs.rm_file(f"{path}/{MANIFEST}")
    writes.clear()
    run_extract(micro_extract_config(image_folder, url, **kw))
    assert BASIS_FILE not in writes and CALIBRATION_FILE not in writes and writes.count("shard") == 1
    _same_cache(_remote_files(url), _local_files(local))
    assert _train(tmp_path / "remote", url, local_cache=str(tmp_path / "lc")) == _train(tmp_path / "disk", str(local))
    raw = bytearray(fs.cat_file(f"{path}/{BASIS_FILE}"))
    raw[-5] ^= 0x01                   # the last float's mantissa: same size, still a valid .npy
    fs.pipe_file(f"{path}/{BASIS_FILE}", bytes(raw))
    with pytest.raises(UserError, match="basis"):
        open_cache(url)
