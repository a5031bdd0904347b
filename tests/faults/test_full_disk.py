"""Promise 1 beyond extract, a full or read-only disk is one line and leaves nothing half-written: best.pt, a
run's first checkpoint, export, the lock file and the marker of a new cache.

The disk is simulated at fsutil's temporary-file seam (tests/common/faults.py) or at `os.open`, so these run
anywhere; micro models at 32 px on `image_folder`."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import g2sd_cache.cache.ownership as ownership
import g2sd_cache.common.fsutil as fsutil
from g2sd_cache.cache.schema import LOCK_FILE
from g2sd_cache.cli.export import export_run
from g2sd_cache.cli.main import main as cli_main
from g2sd_cache.common.errors import UserError
from g2sd_cache.specific.config import FinetuneConfig
from g2sd_cache.specific.finetune import finetune
from tests.common.faults import enospc_in_atomic_writes, one_line

MICRO = "test_vit_micro_patch16"



def finetune_config(data, init, out, **kw) -> FinetuneConfig:
    base = dict(data=str(data), init=str(init), out=str(out), arch=MICRO, teacher_arch=MICRO, teacher="random:1",
                epochs=1, warmup_epochs=0.0, blr=1e-3, log_every=1, img_size=32, group_size=4, workers=0,
                device="cpu")
    return FinetuneConfig(**(base | kw))


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(f"*{fsutil.TMP_MARK}*")]


def test_best_pt_on_a_full_disk_is_one_line_and_keeps_the_epoch(image_folder, stage1_export, tmp_path, monkeypatch):
    enospc_in_atomic_writes(monkeypatch, "best.pt")
    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        finetune(finetune_config(image_folder, stage1_export, run, val=str(image_folder)))
    assert "best.pt" in one_line(e.value) and "no space left" in str(e.value)
    assert temporaries(run) == [] and not (run / "best.pt").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1   # the epoch's training is saved


def test_first_checkpoint_on_a_full_disk_does_not_claim_an_earlier_one(image_folder, stage1_export, tmp_path,
                                                                        monkeypatch):
    enospc_in_atomic_writes(monkeypatch, "checkpoint.pt")
    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        finetune(finetune_config(image_folder, stage1_export, run))
    assert "no space left" in one_line(e.value) and "intact" not in str(e.value)
    assert "no checkpoint of this run was saved yet" in str(e.value) and temporaries(run) == []


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory) -> Path:
    """A run folder holding a micro stage-1 checkpoint, as `train` writes it."""
    from tests.common.faults import micro_train_config
    from g2sd_cache.generic.train import train
    from g2sd_cache.data.synthetic import make_image_folder
    from tests.common.helpers import micro_extract_config
    from g2sd_cache.generic.extract import run_extract
    root = tmp_path_factory.mktemp("s1")
    images = make_image_folder(root / "images", 4, seed=2, classes=2)
    run_extract(micro_extract_config(images, root / "cache"))
    train(micro_train_config(images, root / "cache", root / "run", steps=1))
    return root / "run"


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_export_to_a_full_or_read_only_disk_is_one_line(stage1_run, tmp_path, monkeypatch, fault):
    if fault == "full":
        enospc_in_atomic_writes(monkeypatch, "model.pth")
    else:
        def read_only(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        monkeypatch.setattr(fsutil, "_open_temp", read_only)
    with pytest.raises(UserError) as e:
        export_run(str(stage1_run), str(tmp_path / "model.pth"))
    assert "model.pth" in one_line(e.value) and ("no space" if fault == "full" else "read-only") in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_lock_file_on_a_read_only_folder_is_one_line(image_folder, tmp_path, monkeypatch, capsys):
    real_open = os.open

    def open_(path, flags, *args, **kw):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kw)
    monkeypatch.setattr(ownership.os, "open", open_)
    rc = cli_main(["extract-logits", "--data", str(image_folder), "--out", str(tmp_path / "lc"), "--teacher",
                   "random:1", "--teacher-arch", MICRO, "--img-size", "32", "--group-size", "4", "--topk", "2",
                   "--workers", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "lock file" in one_line(RuntimeError(err.strip()))


def test_marker_of_a_new_cache_on_a_full_disk_is_one_line(image_folder, tmp_path, monkeypatch, capsys):
    """The first file a cache gets (its marker) fails: one line naming it, no temporary left."""
    enospc_in_atomic_writes(monkeypatch, ".g2sd-cache", room=0)
    out = tmp_path / "lc"
    rc = cli_main(["extract-logits", "--data", str(image_folder), "--out", str(out), "--teacher", "random:1",
                   "--teacher-arch", MICRO, "--img-size", "32", "--group-size", "4", "--topk", "2", "--workers", "0",
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "No space left" in one_line(RuntimeError(err.strip())) and temporaries(out) == []
