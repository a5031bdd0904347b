"""Promise 4 for stage 2, bad inputs are named: an unreadable image in extract-logits, finetune, evaluate and
finetune --val follows --on-error (skip: replaced or left out and listed; fail: one line naming it), a validation
failure never costs the epoch's training, and labelled tars with a huge .cls or a non-image member are one line.

Micro classifiers at 32 px on `image_folder` (12 images in 3 classes: 3 mixing groups of 4 per epoch, so every
image is in a group every epoch)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from g2sd_cache.common.errors import UserError
from g2sd_cache.data.synthetic import jpeg_bytes, synthetic_image
from g2sd_cache.models.classifier import build_student
from g2sd_cache.specific.config import FinetuneConfig, LogitsConfig
from g2sd_cache.specific.evaluate import evaluate
from g2sd_cache.specific.extract_logits import run_extract_logits
from g2sd_cache.specific.finetune import finetune
from tests.common.faults import one_line, tar_with_members

MICRO = "test_vit_micro_patch16"
PLAN = dict(img_size=32, group_size=4, workers=0, device="cpu")



@pytest.fixture(scope="module")
def bad_folder(image_folder, tmp_path_factory) -> tuple[Path, str]:
    """`image_folder` with one image truncated in place: (folder, its key)."""
    root = tmp_path_factory.mktemp("bad") / "images"
    shutil.copytree(image_folder, root)
    victim = sorted(root.rglob("*.jpg"))[4]
    victim.write_bytes(victim.read_bytes()[:300])
    return root, victim.relative_to(root).as_posix()


def finetune_config(data, init, out, **kw) -> FinetuneConfig:
    base = dict(data=str(data), init=str(init), out=str(out), arch=MICRO, teacher_arch=MICRO, teacher="random:1",
                epochs=1, warmup_epochs=0.0, blr=1e-3, log_every=1, **PLAN)
    return FinetuneConfig(**(base | kw))


def test_extract_logits_unreadable_image_fails_naming_it_or_is_replaced_and_listed(bad_folder, tmp_path):
    folder, key = bad_folder
    base = dict(data=str(folder), teacher="random:1", teacher_arch=MICRO, cached_epochs=1, topk=2, shard_groups=2,
                **PLAN)
    with pytest.raises(UserError) as e:
        run_extract_logits(LogitsConfig(out=str(tmp_path / "fail"), on_error="fail", **base))
    assert key in one_line(e.value) and "--on-error skip" in str(e.value)
    summary = run_extract_logits(LogitsConfig(out=str(tmp_path / "skip"), on_error="skip", **base))
    assert summary["unreadable"] == [key] and summary["cache_samples"] == 12


def test_finetune_unreadable_training_image_follows_on_error(bad_folder, stage1_export, tmp_path):
    folder, key = bad_folder
    with pytest.raises(UserError) as e:
        finetune(finetune_config(folder, stage1_export, tmp_path / "fail", on_error="fail"))
    assert key in one_line(e.value)
    summary = finetune(finetune_config(folder, stage1_export, tmp_path / "skip", on_error="skip"))
    assert summary["unreadable"] == [key] and summary["steps"] == 3


def test_finetune_val_failure_keeps_the_epochs_training(image_folder, bad_folder, stage1_export, tmp_path):
    """An unreadable validation image with --on-error fail stops the run, but after the epoch's checkpoint: resume
    continues at the next epoch instead of redoing it. With skip, validation leaves it out and goes on."""
    folder, key = bad_folder
    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        finetune(finetune_config(image_folder, stage1_export, run, val=str(folder), epochs=2, on_error="fail"))
    assert key in one_line(e.value) and str(e.value).startswith(f"--val {folder}")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["position"], ckpt["step"]) == (1, 0, 3)
    summary = finetune(finetune_config(image_folder, stage1_export, tmp_path / "skip", val=str(folder),
                                       on_error="skip"))
    assert summary["best_top1"] is not None


@pytest.fixture(scope="module")
def classifier():
    return build_student(MICRO, 3, 32, distilled=False, seed=0)


def test_evaluate_unreadable_image_fails_naming_it_or_is_left_out_and_listed(bad_folder, classifier):
    folder, key = bad_folder
    with pytest.raises(UserError) as e:
        evaluate(classifier, str(folder))
    assert key in one_line(e.value) and "--on-error skip" in str(e.value)
    r = evaluate(classifier, str(folder), on_error="skip")
    assert r["n"] == 11 and r["unreadable"] == [key]


def test_evaluate_tars_with_a_huge_class_index_or_a_non_image_member(tmp_path, classifier):
    good = jpeg_bytes(synthetic_image(3, (64, 48)))
    huge = tmp_path / "huge.tar"
    tar_with_members(huge, [("a.jpg", good), ("a.cls", b"1" * 25)])
    with pytest.raises(UserError) as e:
        evaluate(classifier, str(huge))
    assert "sample a has .cls" in one_line(e.value) and "below 10^9" in str(e.value)
    text = tmp_path / "text.tar"
    tar_with_members(text, [("a.jpg", good), ("a.cls", b"0"), ("b.jpg", b"not an image at all"), ("b.cls", b"1")])
    with pytest.raises(UserError) as e:
        evaluate(classifier, str(text))
    assert "image b" in one_line(e.value)
    r = evaluate(classifier, str(text), on_error="skip")
    assert r["n"] == 1 and r["unreadable"] == ["b"]


def test_evaluate_refuses_a_zero_batch_size(image_folder, classifier):
    with pytest.raises(UserError) as e:
        evaluate(classifier, str(image_folder), batch_size=0)
    assert "--batch-size 0" in one_line(e.value)


def test_evaluate_names_val_for_a_missing_folder(tmp_path, classifier):
    with pytest.raises(UserError) as e:
        evaluate(classifier, str(tmp_path / "nowhere"))
    assert one_line(e.value).startswith("--val ")

