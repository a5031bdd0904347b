"""Promises 6 and 7, own only what is yours and one writer at a time.

Caches come from the micro teacher at 64 px (tests/conftest.py); corruption is always done on a copy
of the shared `micro_cache`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.common.helpers import MICRO_TEACHER, micro_extract_config
from g2sd_cache import open_cache
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.cache.schema import MANIFEST, TMP_MARK
from g2sd_cache.verify.cache import verify_cache
from tests.common.faults import copy_cache, hold_lock, one_line


# ----------------------------------------------------------------------------------------------
# 11. own only what is yours

def test_overwrite_refuses_every_folder_that_is_not_a_marked_cache(image_folder, micro_cache, tmp_path):
    """Own only what is yours: `extract --overwrite` into an image folder holding a config.yaml, a training run
    folder, or a folder of other files refuses in one line naming what it is, and deletes nothing."""
    data = tmp_path / "images"
    shutil.copytree(image_folder, data)
    (data / "config.yaml").write_text("mine: 1\n")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "config.yaml", "metrics.jsonl"):
        (run / name).write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    for folder, what in ((data, "a folder of images"), (run, "not ours (it holds checkpoint.pt")):
        before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
        with pytest.raises(UserError) as e:
            run_extract(micro_extract_config(image_folder, folder, overwrite=True))
        assert what in one_line(e.value) and "nothing was changed" in str(e.value)
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    with pytest.raises(UserError, match="notes.txt"):
        run_extract(micro_extract_config(image_folder, other))


def test_overwrite_deletes_a_cache_only_if_it_holds_nothing_else(micro_cache, image_folder, tmp_path):
    """Own only what is yours: --overwrite replaces a marked cache, but refuses one that also holds a file a cache
    does not write (naming it), and leaves that file alone."""
    c = copy_cache(micro_cache, tmp_path / "c")
    (c / "shard-00001" / "my-notes.txt").write_text("x")
    (c / "results.csv").write_text("x")
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(image_folder, c, overwrite=True, seed=1))
    assert "results.csv" in one_line(e.value) and "shard-00001" in str(e.value)
    assert (c / "results.csv").exists() and (c / "shard-00001" / "my-notes.txt").exists()
    (c / "results.csv").unlink()
    (c / "shard-00001" / "my-notes.txt").unlink()
    run_extract(micro_extract_config(image_folder, c, overwrite=True, seed=1))
    assert verify_cache(str(c)).ok and open_cache(str(c)).manifest.seed == 1


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock's (its content names the last process that took it)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".g2sd-cache.lock"}


def test_overwrite_replaces_only_a_cache_of_its_own_kind(micro_cache, image_folder, tmp_path):
    """Own only what is yours: `extract-logits --overwrite` into a target cache, and `extract --overwrite` into a
    logits cache, refuse in one line naming the kind found; both caches stay byte for byte."""
    from g2sd_cache.specific.config import LogitsConfig
    from g2sd_cache.specific.extract_logits import run_extract_logits
    targets = copy_cache(micro_cache, tmp_path / "targets")
    logits = tmp_path / "logits"
    logits_cfg = dict(data=str(image_folder), teacher="random:1", teacher_arch="test_vit_micro_patch16", topk=2,
                      shard_groups=2, workers=0, device="cpu", img_size=32, group_size=4)
    run_extract_logits(LogitsConfig(out=str(logits), **logits_cfg))
    before_t, before_l = _tree(targets), _tree(logits)
    for overwrite in (True, False):
        with pytest.raises(UserError) as e:
            run_extract_logits(LogitsConfig(out=str(targets), overwrite=overwrite, **logits_cfg))
        assert "is a targets cache" in one_line(e.value) and "nothing was changed" in str(e.value)
        with pytest.raises(UserError) as e:
            run_extract(micro_extract_config(image_folder, logits, overwrite=overwrite))
        assert "is a logits cache" in one_line(e.value) and "nothing was changed" in str(e.value)
    assert _tree(targets) == before_t and _tree(logits) == before_l
    assert verify_cache(str(targets)).ok


def test_clean_up_removes_only_what_the_writer_made(micro_cache, image_folder, tmp_path):
    """Own only what is yours: a rerun's clean-up deletes only temporaries of the cache's own files (exact name
    pattern), never a user's file named like one; --overwrite refuses a shard holding a user's folder even when
    that folder looks like a zarr array (it holds a zarr.json), and deletes nothing."""
    c = copy_cache(micro_cache, tmp_path / "c")
    (c / "results.tmp-final.csv").write_text("mine")
    (c / ".shard-00001.tmp-notes").mkdir()
    (c / ".shard-00001.tmp-notes" / "keep.txt").write_text("mine")
    run_extract(micro_extract_config(image_folder, c))
    assert (c / "results.tmp-final.csv").read_text() == "mine"
    assert (c / ".shard-00001.tmp-notes" / "keep.txt").read_text() == "mine"
    (c / "results.tmp-final.csv").unlink()
    shutil.rmtree(c / ".shard-00001.tmp-notes")
    user = c / "shard-00001" / "my-analysis"
    user.mkdir()
    (user / "zarr.json").write_text("{}")
    (user / "results.csv").write_text("mine")
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(image_folder, c, overwrite=True, seed=1))
    assert "shard-00001" in one_line(e.value)
    assert (user / "results.csv").read_text() == "mine" and (c / MANIFEST).is_file()


def test_a_format_1_cache_is_refused_with_one_line_saying_to_re_extract(micro_cache, image_folder, tmp_path, capsys):
    """Own only what is yours / format 2: a cache of the previous format (no marker, format_version 1) is refused by
    open_cache, verify and a resuming extract, each in one line that says to re-extract."""
    c = copy_cache(micro_cache, tmp_path / "c")
    (c / ".g2sd-cache").unlink()
    m = json.loads((c / MANIFEST).read_text())
    (c / MANIFEST).write_text(json.dumps(m | {"format_version": 1}))
    for attempt in (lambda: open_cache(str(c)), lambda: verify_cache(str(c)),
                    lambda: run_extract(micro_extract_config(image_folder, c))):
        with pytest.raises(UserError) as e:
            attempt()
        assert "format 1" in one_line(e.value).replace("version 1", "format 1") and "extract" in str(e.value)


def test_claim_run_folder_takes_only_new_empty_or_own_run_folders(micro_cache, image_folder, tmp_path):
    """Own only what is yours: a run folder is claimed (marker written) only if new, empty or already one of our
    runs; a cache, a dataset, a file or a folder with other files is refused in one line; --resume needs a run."""
    from g2sd_cache.cache.ownership import RUN_MARKER, claim_run_folder, is_run
    fresh = tmp_path / "runs" / "a"
    claim_run_folder(fresh, resume=False)
    assert is_run(fresh) and (fresh / RUN_MARKER).is_file()
    (fresh / "checkpoint.pt").write_text("x")
    claim_run_folder(fresh, resume=True)                               # ours: resumable
    claim_run_folder(fresh, resume=False)                              # the trainer decides about its checkpoint
    (tmp_path / "empty").mkdir()
    claim_run_folder(tmp_path / "empty", resume=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("x")
    (mine / "metrics.jsonl").write_text("x")
    (tmp_path / "file").write_text("x")
    for path, words in ((micro_cache, "a g2sd-cache cache"), (image_folder, "a folder of images"),
                        (mine, "config.yaml, metrics.jsonl"), (tmp_path / "file", "existing file")):
        before = sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else None
        with pytest.raises(UserError) as e:
            claim_run_folder(path, resume=False)
        assert words in one_line(e.value), e.value
        assert before is None or sorted(p.name for p in Path(path).iterdir()) == before
    with pytest.raises(UserError, match="not a g2sd-cache training run"):
        claim_run_folder(tmp_path / "nowhere", resume=True)


# ----------------------------------------------------------------------------------------------
# 12. one writer at a time

def test_a_second_extract_into_a_locked_cache_says_who_holds_it(image_folder, tmp_path):
    """One writer at a time: while another process holds --out's lock, extract refuses in one line naming that
    process (pid and host) and writes nothing; once the holder dies (kill -9), the lock is gone with it."""
    out = tmp_path / "c"
    out.mkdir()
    holder = hold_lock(out / ".g2sd-cache.lock")
    try:
        with pytest.raises(UserError) as e:
            run_extract(micro_extract_config(image_folder, out))
        assert f"another extract is writing into {out} (pid {holder.pid} on host elsewhere" in one_line(e.value)
        assert sorted(p.name for p in out.iterdir()) == [".g2sd-cache.lock"]
    finally:
        holder.kill()
        holder.wait()
    run_extract(micro_extract_config(image_folder, out))
    assert verify_cache(str(out)).ok


def test_a_killed_writers_temporaries_are_removed_by_the_next_run(micro_cache, image_folder, tmp_path):
    """One writer at a time: temporaries left by a writer that is gone (a shard folder complete on disk whose
    rename failed, a half-written manifest) are removed by the next extract, which holds the lock; so verify
    passes without anyone deleting them by hand. A live process's temporary is left alone."""
    from g2sd_cache.cache.ownership import remove_stale_temporaries
    c = copy_cache(micro_cache, tmp_path / "c")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = os.uname().nodename
    shutil.copytree(c / "shard-00001", c / f".shard-00001{TMP_MARK}{host}-{dead}")   # complete, never renamed
    (c / f"{MANIFEST}{TMP_MARK}{host}-{dead}").write_text('{"format_version": 2, "tea')
    assert not verify_cache(str(c)).ok
    run_extract(micro_extract_config(image_folder, c))
    assert not list(c.glob(f"*{TMP_MARK}*"))
    assert verify_cache(str(c)).ok
    alive = c / f".shard-00002{TMP_MARK}{host}-{os.getppid()}"
    alive.mkdir()
    assert remove_stale_temporaries(c) == [] and alive.exists()


@pytest.mark.slow
def test_the_same_extract_started_twice_one_runs_one_refuses(image_folder, tmp_path):
    """One writer at a time: the same extract command run twice at once (the first paused while it holds the lock,
    so the runs overlap on any machine): the second exits 2 with one line naming the first (never `Directory not
    empty` on a shard rename, which two writers of the same shards hit); the first completes and the cache verifies."""
    out = tmp_path / "c"
    args = [sys.executable, "-m", "g2sd_cache.cli.main", "extract", "--data", str(image_folder), "--out", str(out),
            "--teacher", "random", "--arch", MICRO_TEACHER, "--img-size", "32", "--workers", "0", "--device", "cpu",
            "--views", "2", "--shard-size", "4", "--chunk-views", "2"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".g2sd-cache").exists():        # written under the lock, right after taking it
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out_first, err_first = first.communicate(timeout=300)
    assert first.returncode == 0, err_first
    assert second.returncode == 2, second.stderr
    assert second.stderr.startswith("g2sd-cache extract: error: another extract is writing into") and \
        f"pid {first.pid}" in second.stderr and second.stderr.count("\n") == 1, second.stderr
    assert verify_cache(str(out)).ok


def test_export_never_replaces_a_file_it_did_not_write(micro_cache, image_folder, tmp_path, capsys):
    """Own only what is yours: `export RUN --out` over the run's checkpoint.pt, a cache's manifest.json or any file of
    the user's exits 2 with one line and leaves the file byte for byte; an export it wrote itself (unchanged since)
    is replaced by a rerun, and once the user edits it, it is theirs and refused."""
    from g2sd_cache.cli.main import main as cli_main
    from g2sd_cache.generic.train import train
    from tests.common.faults import micro_train_config
    run = tmp_path / "run"
    train(micro_train_config(image_folder, micro_cache, run, steps=1))
    cache = copy_cache(micro_cache, tmp_path / "c")
    mine = tmp_path / "teacher.pth"
    mine.write_bytes(b"my weights")
    capsys.readouterr()
    for target in (run / "checkpoint.pt", cache / MANIFEST, mine):
        before = target.read_bytes()
        assert cli_main(["export", str(run), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "already exists" in err and str(target) in err, err
        assert target.read_bytes() == before
    out = tmp_path / "encoder.pth"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    assert cli_main(["export", str(run), "--out", str(out), "--format", "mae"]) == 0     # its own file: replaced
    assert "model" in torch.load(out, weights_only=True)
    with open(out, "ab") as f:
        f.write(b"edited")
    assert cli_main(["export", str(run), "--out", str(out)]) == 2
    assert out.read_bytes().endswith(b"edited")


def test_a_demo_rerun_replaces_its_own_outputs_and_keeps_what_the_user_added(micro_cache, image_folder, tmp_path):
    """Own only what is yours: rerunning the demo into its folder deletes what the demo wrote there (images, caches,
    its runs, its export) but keeps a user's notes and a `train --out DEMO/my-run` run, and names them."""
    from g2sd_cache.cli.demo import DEMO_OUTPUTS
    from g2sd_cache.cache.ownership import claim_demo_folder
    from g2sd_cache.generic.train import train
    from tests.common.faults import micro_train_config
    demo = tmp_path / "demo"
    assert claim_demo_folder(demo, DEMO_OUTPUTS) == []
    shutil.copytree(image_folder, demo / "images")
    shutil.copytree(micro_cache, demo / "cache")
    (demo / "student-timm.pth").write_bytes(b"export")
    (demo / "notes.txt").write_text("mine")
    train(micro_train_config(image_folder, demo / "cache", demo / "my-run", steps=1))
    kept = claim_demo_folder(demo, DEMO_OUTPUTS)
    assert sorted(kept) == ["my-run", "notes.txt"]
    assert sorted(p.name for p in demo.iterdir()) == [".g2sd-demo", "my-run", "notes.txt"]
    assert (demo / "notes.txt").read_text() == "mine" and (demo / "my-run" / "checkpoint.pt").is_file()
