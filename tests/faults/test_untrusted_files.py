"""Promise 5, trust nothing loaded: weights-only checkpoints, atomic and fsync-ed writes.

Caches come from the micro teacher at 64 px (tests/conftest.py); corruption is always done on a copy
of the shared `micro_cache`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from g2sd_cache.common.errors import UserError
from g2sd_cache.cache.schema import TMP_MARK
from tests.common.faults import enospc_in_atomic_writes, one_line


# ----------------------------------------------------------------------------------------------
# 10. trust nothing loaded

def _run_folder_with(tmp_path: Path, state) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state, run / "checkpoint.pt")
    return run


class _RunsCode:
    """A pickle that would touch a file when unpickled with weights_only=False."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_never_run(tmp_path, capsys):
    """Trust nothing loaded: `export RUN` on a checkpoint whose pickle calls os.system refuses it in one line naming
    the object, and the command never runs (weights-only loading)."""
    from g2sd_cache.cli.main import main as cli_main
    witness = tmp_path / "ran"
    run = _run_folder_with(tmp_path, {"model": _RunsCode(witness)})
    assert cli_main(["export", str(run), "--out", str(tmp_path / "enc.pth")]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err and "could run code" in err and err.count("\n") == 1, err
    assert not witness.exists(), "the checkpoint's pickle ran"
    assert not (tmp_path / "enc.pth").exists()


def test_a_checkpoint_without_the_expected_entries_is_one_line(tmp_path):
    """Trust nothing loaded: a valid torch file lacking a training checkpoint's entries is a one-line error naming
    what is missing (export's and --resume's keys), never a KeyError."""
    from g2sd_cache.common.checkpoint import load_checkpoint
    from g2sd_cache.cli.export import export_encoder
    run = _run_folder_with(tmp_path, {"model": {"w": torch.zeros(2)}, "step": 3})
    with pytest.raises(UserError) as e:
        export_encoder(str(run), str(tmp_path / "enc.pth"))
    assert "lacks student, target_dim, img_size;" in one_line(e.value)          # what export needs
    from g2sd_cache.common.checkpoint import RESUME_KEYS
    with pytest.raises(UserError) as e:
        load_checkpoint(run, required=RESUME_KEYS)                               # what --resume needs
    assert "lacks student, target_dim, img_size, optimizer, scaler, epoch, position" in one_line(e.value)
    with pytest.raises(UserError) as e:
        load_checkpoint(run, "train without --resume to start a new run there", required=("model", "rng"))
    assert "lacks rng;" in one_line(e.value) and "train without --resume" in str(e.value)
    torch.save([1, 2], run / "checkpoint.pt")
    with pytest.raises(UserError, match="holds a list"):
        load_checkpoint(run)


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    """Trust nothing loaded: the random generators' states are stored as tensors and plain values, so a checkpoint
    loads weights-only and restores every generator exactly."""
    import random as pyrandom

    from g2sd_cache.common.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
    torch.manual_seed(1), np.random.seed(2), pyrandom.seed(3)
    np.random.normal()                                      # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path, {"model": {}, "rng": rng_state()})
    want = (torch.rand(3), np.random.normal(size=3), [pyrandom.random() for _ in range(3)])
    set_rng_state(load_checkpoint(tmp_path, required=("rng",))["rng"])
    got = (torch.rand(3), np.random.normal(size=3), [pyrandom.random() for _ in range(3)])
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Runs: the disk fills up while a checkpoint is written: one line naming the space problem, no temporary left
    behind, and the previous checkpoint intact and loadable."""
    from g2sd_cache.common.checkpoint import load_checkpoint, save_checkpoint
    state = {"model": {"w": torch.arange(5.0)}, "step": 1}
    save_checkpoint(tmp_path, state)
    enospc_in_atomic_writes(monkeypatch, "checkpoint.pt" + TMP_MARK, room=1000)
    with pytest.raises(UserError) as e:
        save_checkpoint(tmp_path, state | {"model": {"w": torch.zeros(100_000)}, "step": 2})
    assert "no space left" in one_line(e.value) and "previous checkpoint is intact" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(tmp_path, required=("step",))["step"] == 1


def test_atomic_writes_fsync_the_file_before_and_the_folder_after_the_rename(tmp_path, monkeypatch):
    """Runs and caches: a file is fsync-ed before it is renamed into place and its folder after, so a power cut
    never leaves a zero-length file under the final name (the same helper writes checkpoints, manifests, shards)."""
    import g2sd_cache.common.fsutil as fsutil
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (events.append(("fsync", os.path.realpath(
        f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(fsutil.os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b))[1])
    target = tmp_path / "manifest.json"
    fsutil.write_text_atomic(target, "{}")
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"]
    assert TMP_MARK in events[0][1] and events[1][1] == str(target) and events[2][1] == str(tmp_path.resolve())
    events.clear()
    (tmp_path / "shard.tmp").mkdir()
    (tmp_path / "shard.tmp" / "a").write_text("x")
    fsutil.publish_dir(tmp_path / "shard.tmp", tmp_path / "shard")
    assert [e[0] for e in events] == ["fsync", "fsync", "rename", "fsync"] and events[0][1].endswith("/a")
