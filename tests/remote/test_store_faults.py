"""What the store or the network does wrong (tests/remote/faulty_proxy.py between s3fs and moto): 503s,
connection resets and truncated bodies are retried and change nothing; a failure that persists ends in one
line naming the object and the cause; a killed trainer's temporaries are removed by the next run."""
from __future__ import annotations

import os

import pytest
from tests.common.helpers import micro_extract_config
from tests.remote.faulty_proxy import Fault
from tests.remote.test_train_url import _train, _upload

from g2sd_cache.cache.local_mirror import LocalCacheConfig, LocalMirror
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import run_extract


def test_transient_faults_are_retried_and_change_nothing(faulty_s3, micro_cache, tmp_path):
    bucket, proxy = faulty_s3
    url = f"{bucket}/c"
    _upload(micro_cache, url)
    proxy.faults = [Fault("GET", "shard-00000/target/c/0", "503", 2),
                    Fault("GET", "shard-00001/pixels/c/0", "reset", 1),
                    Fault("GET", "shard-00002/target/c/0", "truncate", 2)]
    local = _train(tmp_path / "local", str(micro_cache))
    assert _train(tmp_path / "remote", url, local_cache=str(tmp_path / "lc")) == local
    assert [f.done for f in proxy.faults] == [2, 1, 2]          # each fault happened, and was survived


def test_a_persistent_failure_is_one_line_naming_the_object(faulty_s3, micro_cache, tmp_path):
    bucket, proxy = faulty_s3
    url = f"{bucket}/c"
    _upload(micro_cache, url)
    proxy.faults = [Fault("GET", "shard-00001/target/c/0", "503", -1)]
    with pytest.raises(UserError) as err:
        _train(tmp_path / "remote", url, local_cache=str(tmp_path / "lc"))
    assert "\n" not in str(err.value)
    assert f"download of {url}/shard-00001/target/c/0" in str(err.value)
    assert "failed 4 times with backoff" in str(err.value)
    # the prefetch's 4 tries, then (if the reader came after it ended) the reader's own 4; then no more
    assert proxy.faults[0].done in (4, 8)
    leftovers = [p for p in (tmp_path / "lc").rglob("*") if p.is_file() and "target/c/0" in p.as_posix()
                 and "shard-00001" in p.as_posix() and not p.name.endswith(".lock")]
    assert leftovers == []          # no partial download under any name


def test_extract_retries_a_failing_upload(faulty_s3, image_folder, micro_cache, tmp_path):
    from tests.remote.test_extract_url import _local_files, _remote_files, _same_cache
    bucket, proxy = faulty_s3
    proxy.faults = [Fault("PUT", "shard-00001/target", "503", 2), Fault("PUT", "shard-00002/shard.json", "reset", 1)]
    run_extract(micro_extract_config(image_folder, f"{bucket}/c"))
    assert [f.done for f in proxy.faults] == [2, 1]
    _same_cache(_remote_files(f"{bucket}/c"), _local_files(micro_cache))


def test_a_killed_trainers_temporaries_are_removed_by_the_next_run(tmp_path):
    folder = tmp_path / "lc"
    dead = 2**22 + 17        # above the default pid_max: no such process
    shard = folder / "shard-00000" / "target" / "c" / "0" / "0"
    shard.mkdir(parents=True)
    stale = shard / f".0.123.tmp-{os.uname().nodename}-{dead}-1"
    alive = shard / f".0.123.tmp-{os.uname().nodename}-{os.getppid()}-1"
    keep = shard / "0"
    for p in (stale, alive, keep):
        p.write_bytes(b"x")
    LocalMirror(None, "bucket/c", "s3://bucket/c", folder, LocalCacheConfig(str(folder)), lambda spec, path: None).close()
    assert not stale.exists() and alive.exists() and keep.exists()
