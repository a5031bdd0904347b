"""The trainer's side: run folders it may write, sources it checks, learning rates it refuses, stopping cleanly.

Caches come from the micro teacher at 64 px (tests/conftest.py); corruption is always done on a copy
of the shared `micro_cache`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.common.helpers import MICRO_STUDENT
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.train import train
from tests.common.faults import hold_lock, micro_train_config, one_line


# ----------------------------------------------------------------------------------------------
# 15. runs: the trainer's side of owning folders, trusting sources, and stopping cleanly

def test_train_out_refuses_a_cache_a_dataset_and_a_foreign_folder(micro_cache, image_folder, tmp_path):
    """Own only what is yours: `train --out` never writes into the cache, the image folder or a folder of someone
    else's files (one line each, nothing written); a new folder becomes a marked run folder."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("my: own\n")
    (foreign / "metrics.jsonl").write_text("{}\n")
    for out, what in ((micro_cache, "cache"), (image_folder, "images"), (foreign, "not ours")):
        before = sorted(p.name for p in Path(out).iterdir())
        with pytest.raises(UserError) as e:
            train(micro_train_config(image_folder, micro_cache, out))
        assert str(out) in one_line(e.value) and what in str(e.value), str(e.value)
        assert sorted(p.name for p in Path(out).iterdir()) == before
    assert (foreign / "config.yaml").read_text() == "my: own\n"
    train(micro_train_config(image_folder, micro_cache, tmp_path / "new", steps=1))
    assert (tmp_path / "new" / ".g2sd-run").is_file() and (tmp_path / "new" / "checkpoint.pt").is_file()


def test_training_from_images_refuses_a_source_image_changed_since_extract(micro_cache_no_pixels, image_folder,
                                                                           tmp_path):
    """Content bound to its place (train): the image path checks every image's bytes against the crc32c extract
    recorded, so a same-size replacement stops training (naming the image) or, under --on-error skip, is left out
    and counted."""
    data = tmp_path / "images"
    shutil.copytree(image_folder, data)
    key = "class001/img000004.jpg"
    raw = bytearray((data / key).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (data / key).write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        train(micro_train_config(data, micro_cache_no_pixels, tmp_path / "fail", epochs=1, steps=None))
    assert key in one_line(e.value) and "changed since the cache was extracted" in str(e.value)
    train(micro_train_config(data, micro_cache_no_pixels, tmp_path / "skip", epochs=1, steps=None, on_error="skip"))
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_views"] for r in records) == 1


@pytest.mark.parametrize("blr", [0.0, -1.0, float("nan"), float("inf")])
def test_a_learning_rate_that_is_not_positive_and_finite_is_refused(micro_cache, image_folder, tmp_path, blr):
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, micro_cache, tmp_path / "r", blr=blr))
    assert "--blr" in one_line(e.value)
    assert not (tmp_path / "r").exists()


def test_weights_that_become_non_finite_stop_the_run_and_are_never_saved(micro_cache, image_folder, tmp_path,
                                                                         monkeypatch):
    """An update that makes the weights NaN/Inf (here the only step's, whose loss was still finite) stops the run
    like a non-finite loss: no checkpoint of those weights is written, so export has nothing to export."""
    from g2sd_cache.generic.step import Distiller
    step = Distiller.optimizer_step

    def overflowing_step(self, lr):
        step(self, lr)
        with torch.no_grad():
            next(self.student.parameters()).view(-1)[0] = float("inf")
    monkeypatch.setattr(Distiller, "optimizer_step", overflowing_step)
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, micro_cache, tmp_path / "r", steps=1))
    assert "weights became NaN or Inf" in one_line(e.value)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_sigint_saves_a_checkpoint_and_stops(micro_cache, tmp_path):
    """Ctrl-C is a preemption like SIGTERM: the run saves a checkpoint at the next step and exits 0."""
    run = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, "-m", "g2sd_cache.cli.main", "train", "--cache", str(micro_cache), "--out",
                             str(run), "--student", MICRO_STUDENT, "--steps", "100000", "--batch-size", "2",
                             "--device", "cpu", "--log-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 1 <= ckpt["step"] < 100000 and "stopped at step" in out and "interrupted" in err + out


def test_resume_drops_the_metrics_of_steps_it_redoes_and_records_what_changed(micro_cache, image_folder, tmp_path):
    """After a crash past the last checkpoint, metrics.jsonl holds steps the resumed run redoes: they are dropped,
    so every step appears once. Changing the schedule (--steps, --blr) on resume is accepted with a printed note
    that config.yaml records."""
    run = tmp_path / "r"
    train(micro_train_config(image_folder, micro_cache, run, steps=6, stop_after=2))
    with open(run / "metrics.jsonl", "a") as f:          # what a run killed after logging steps 3 and 4 leaves
        for step in (3, 4):
            f.write(json.dumps({"step": step, "loss": 99.0}) + "\n")
    train(micro_train_config(image_folder, micro_cache, run, steps=7, blr=2e-4, resume=True))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 8)) and all(r["loss"] != 99.0 for r in records)
    config = (run / "config.yaml").read_text()
    assert "steps: 6 -> 7" in config and "blr: 0.00015 -> 0.0002" in config



def test_a_second_run_into_a_run_folder_in_use_is_refused_naming_the_holder(micro_cache, image_folder, tmp_path):
    """One writer at a time: while a train (or finetune) holds a run folder's lock, another train --resume, train or
    finetune into it is refused in one line naming that process (pid, host), and the run's files stay as they were;
    the lock dies with its holder, and a finished run releases it (the resume then works)."""
    from g2sd_cache.specific.config import FinetuneConfig
    from g2sd_cache.specific.finetune import finetune
    run = tmp_path / "run"
    train(micro_train_config(image_folder, micro_cache, run, steps=2))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".g2sd-run.lock"}
    holder = hold_lock(run / ".g2sd-run.lock")
    try:
        for attempt, command in ((lambda: train(micro_train_config(image_folder, micro_cache, run, steps=4, resume=True)),
                                  "train"),
                                 (lambda: finetune(FinetuneConfig(data=str(image_folder), out=str(run), init="x",
                                                                  resume=True, workers=0, device="cpu")), "finetune")):
            with pytest.raises(UserError) as e:
                attempt()
            assert f"another {command} is writing into {run} (pid {holder.pid} on host elsewhere" in one_line(e.value)
    finally:
        holder.kill()
        holder.wait()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".g2sd-run.lock"} == before
    train(micro_train_config(image_folder, micro_cache, run, steps=4, resume=True))
    train(micro_train_config(image_folder, micro_cache, run, steps=5, resume=True))   # the previous run let go
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 5
