"""Promise 1, nothing half-written looks complete: kill -9 and a full disk during extract.

Caches come from the micro teacher at 64 px (tests/conftest.py); corruption is always done on a copy
of the shared `micro_cache`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.common.helpers import MICRO_TEACHER, micro_extract_config
from g2sd_cache import open_cache
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.cache.schema import MANIFEST, TMP_MARK
from g2sd_cache.data.synthetic import make_image_folder
from g2sd_cache.verify.cache import verify_cache
from tests.common.faults import assert_caches_equal, assert_complete_shards_sound, enospc_in_atomic_writes, enospc_on


# ----------------------------------------------------------------------------------------------
# 1. kill -9 during extract

@pytest.mark.slow
def test_kill9_during_extract_then_rerun_equals_uninterrupted(tmp_path):
    """Nothing half-written looks complete: `kill -9` of extract at a random moment (twice: at a random point of a fresh run, then in the
    resumed run soon after it writes its first shard), then a rerun of the same command: the cache equals an
    uninterrupted run's array by array, every folder under a final shard name is complete after each kill,
    and verify passes."""
    images = make_image_folder(tmp_path / "img", 24, seed=3, classes=2)
    cfg = dict(views=2, shard_size=4, chunk_views=2, batch_size=4)       # 2 images per shard: 12 shards
    ref = tmp_path / "ref"
    run_extract(micro_extract_config(images, ref, **cfg))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "g2sd_cache.cli.main", "extract", "--data", str(images), "--out", str(out),
            "--teacher", "random", "--arch", MICRO_TEACHER, "--img-size", "64", "--views", "2", "--shard-size", "4",
            "--chunk-views", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    log = []
    # kill 0: at a random moment of the run (extraction spans ~3 s after the first shard here);
    # kill 1: in the resumed run, shortly after it starts writing shards of its own
    for attempt, max_delay in enumerate([3.0, 1.0]):
        before = set(os.listdir(out)) if out.is_dir() else set()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 120:
            if out.is_dir() and any(n.startswith((".shard-", "shard-")) for n in set(os.listdir(out)) - before):
                break
            time.sleep(0.005)
        delay = rng.uniform(0, max_delay)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        state = sorted(os.listdir(out)) if out.is_dir() else []
        log.append(f"kill {attempt}: {delay:.3f} s after its first shard, finished before the kill: {finished}, "
                   f"left: {state}")
        if out.is_dir():
            assert_complete_shards_sound(out)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    print("\n".join(log))
    assert done.returncode == 0, (done.stderr[-2000:], log, f"seed {seed}")
    assert not list(out.glob(f"*{TMP_MARK}*")), log
    assert_caches_equal(out, ref)
    report = verify_cache(str(out), data=str(images))
    assert report.ok, (report.problems, log, f"seed {seed}")


# ----------------------------------------------------------------------------------------------
# 4. disk full


def test_disk_full_during_extract_fails_cleanly_and_rerun_completes(micro_cache, image_folder, tmp_path, monkeypatch):
    """Nothing half-written looks complete: the disk fills up (ENOSPC half-way through a file of the second shard): extract raises an
    error that says so, writes no manifest and leaves no folder under a final shard name that is not complete;
    a rerun with space completes, removes the temporaries, verifies, and equals an uninterrupted run."""
    out = tmp_path / "c"
    hit = enospc_on(monkeypatch, f".shard-00001{TMP_MARK}", "/target/c/")
    with pytest.raises((OSError, UserError)) as e:
        run_extract(micro_extract_config(image_folder, out))
    assert hit and "no space left" in str(e.value).lower()
    assert not (out / MANIFEST).exists()
    assert not (out / "shard-00001").exists()
    assert_complete_shards_sound(out)
    monkeypatch.undo()
    run_extract(micro_extract_config(image_folder, out))
    assert not list(out.glob(f"*{TMP_MARK}*"))
    assert verify_cache(str(out), data=str(image_folder)).ok
    assert_caches_equal(out, micro_cache)


def test_disk_full_while_writing_the_manifest(micro_cache, image_folder, tmp_path, monkeypatch):
    """Nothing half-written looks complete: the disk fills up while manifest.json is written: extract raises, no manifest.json exists
    (the cache is not readable as finished), and a rerun with space (a new process) writes it, leaves no
    temporary file behind and verifies clean."""
    out = tmp_path / "c"
    enospc_in_atomic_writes(monkeypatch, MANIFEST + TMP_MARK)
    with pytest.raises((OSError, UserError), match="No space left"):
        run_extract(micro_extract_config(image_folder, out))
    assert not (out / MANIFEST).exists()
    with pytest.raises(UserError, match="incomplete"):
        open_cache(str(out))
    monkeypatch.undo()
    # The rerun is another process (another pid), and a kill -9 mid-write leaves the temporary whatever
    # handlers run: leave this process's half-written temporary under another pid's name.
    for tmp in out.glob(f"{MANIFEST}{TMP_MARK}*"):
        tmp.unlink()
    (out / f"{MANIFEST}{TMP_MARK}1").write_text('{"format_version": 1, "tea')
    run_extract(micro_extract_config(image_folder, out))
    assert_caches_equal(out, micro_cache)
    report = verify_cache(str(out))
    assert report.ok, report.problems
