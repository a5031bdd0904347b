"""Every user mistake ends in one line, and the right one: stage-2 weights given as stage 1's, damaged manifests,
binary configs, impossible seeds and geometries, empty caches, checkpoints that do not fit, what inspect shows,
and messages that name the option the user actually gave.

Caches come from the micro teacher at 64 px (tests/conftest.py); damage is always done on a copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from g2sd_cache.cache.inspect import format_report, inspect_report
from g2sd_cache.cache.schema import MANIFEST
from g2sd_cache.cli.main import main as cli_main
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.generic.train import train
from g2sd_cache.models.classifier import build_student
from g2sd_cache.specific.config import FinetuneConfig, LogitsConfig
from g2sd_cache.specific.extract_logits import run_extract_logits
from g2sd_cache.specific.finetune import finetune
from g2sd_cache.verify.cache import verify_cache
from tests.common.faults import chunk_span, flip_byte, micro_train_config, one_line, shard_file
from tests.common.helpers import micro_extract_config

MICRO = "test_vit_micro_patch16"
PLAN = dict(img_size=32, group_size=4, workers=0, device="cpu")


def cli_error(capsys, *argv: str) -> str:
    """`g2sd-cache ARGV` in this process must fail with exit status 2 and one line on stderr; returns the line."""
    rc = cli_main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, (rc, err)
    return err



@pytest.fixture(scope="module")
def logits_cache(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logits") / "lc"
    run_extract_logits(LogitsConfig(data=str(image_folder), out=str(out), teacher="random:1", teacher_arch=MICRO,
                                    cached_epochs=1, topk=2, shard_groups=2, **PLAN))
    return out


def finetune_config(data, out, **kw) -> FinetuneConfig:
    base = dict(data=str(data), out=str(out), arch=MICRO, teacher_arch=MICRO, epochs=1, warmup_epochs=0.0,
                log_every=1, **PLAN)
    return FinetuneConfig(**(base | kw))


def test_init_with_a_stage2_export_says_what_it_is(image_folder, tmp_path):
    distilled = tmp_path / "finetuned.pth"
    torch.save(build_student(MICRO, 3, 32, distilled=True, seed=0).state_dict(), distilled)
    with pytest.raises(UserError) as e:
        finetune(finetune_config(image_folder, tmp_path / "run", init=str(distilled), teacher="random:1"))
    assert "distilled classifier" in one_line(e.value) and "g2sd-cache train" in str(e.value)


def test_non_utf8_manifests_are_one_line(micro_cache, logits_cache, image_folder, tmp_path, capsys):
    cache = shutil.copytree(micro_cache, tmp_path / "c")
    (cache / MANIFEST).write_bytes(b"\xff\xfe{" + (micro_cache / MANIFEST).read_bytes()[1:])
    for argv in (["verify", str(cache)], ["inspect", str(cache)]):
        assert "not UTF-8" in cli_error(capsys, *argv)
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, cache, tmp_path / "run"))
    assert "not UTF-8" in one_line(e.value)
    logits = shutil.copytree(logits_cache, tmp_path / "lc")
    (logits / MANIFEST).write_bytes(b"\xff" + (logits_cache / MANIFEST).read_bytes())
    for argv in (["verify", str(logits)], ["inspect", str(logits)]):
        assert "not UTF-8" in cli_error(capsys, *argv)
    with pytest.raises(UserError) as e:
        finetune(finetune_config(image_folder, tmp_path / "ft", init=str(tmp_path), logits=str(logits)))
    assert "not UTF-8" in one_line(e.value)


def test_binary_config_is_one_line_before_any_run_folder(micro_cache, tmp_path, capsys):
    config = tmp_path / "bin.yaml"
    config.write_bytes(b"\x00\xff\xfe\x01steps: 4")
    out = tmp_path / "run"
    line = cli_error(capsys, "train", "--cache", str(micro_cache), "--out", str(out), "--config", str(config))
    assert "not a UTF-8 text file" in line and not out.exists()
    line = cli_error(capsys, "finetune", "--data", "x", "--out", str(out), "--config", str(config))
    assert "not a UTF-8 text file" in line and not out.exists()


@pytest.mark.parametrize("overrides, says", [
    (dict(mask_ratio=0.99), "leaves no visible patch"),
    (dict(img_size=0), "--img-size 0"),
    (dict(seed=-1), "--seed -1"),
])
def test_impossible_extract_options_are_one_line(image_folder, tmp_path, overrides, says):
    out = tmp_path / "c"
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(image_folder, out, **overrides))
    assert says in one_line(e.value) and not out.exists()


def test_impossible_seeds_and_policies_are_one_line_before_any_run_folder(micro_cache, image_folder, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, micro_cache, out, seed=-1))
    assert "--seed -1" in one_line(e.value) and not out.exists()
    for kw, says in ((dict(seed=-1), "--seed -1"), (dict(auto_augment="garbage"), "--auto-augment garbage")):
        with pytest.raises(UserError) as e:
            finetune(finetune_config(image_folder, out, init="x", **kw))
        assert says in one_line(e.value) and not out.exists()


def test_an_empty_cache_is_refused_by_extract_verify_and_train(tmp_path, monkeypatch):
    """Only unreadable images: extract publishes no manifest; a cache that has one anyway (an older extract
    wrote it) fails verify and is refused by train, in one line each."""
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "c"
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(images.parent, out, on_error="skip"))
    assert "every input" in one_line(e.value) and not (out / MANIFEST).exists()
    import g2sd_cache.cache.manifest_checks as manifest_checks
    monkeypatch.setattr(manifest_checks, "refuse_empty", lambda *a: None)   # what an older extract did
    run_extract(micro_extract_config(images.parent, out, on_error="skip"))
    report = verify_cache(str(out))
    assert not report.ok and any("holds no views" in p for p in report.problems)
    with pytest.raises(UserError) as e:
        train(micro_train_config(images.parent, out, tmp_path / "run"))
    assert "holds no views" in one_line(e.value)


def test_finetune_resume_with_a_checkpoint_that_does_not_fit(image_folder, stage1_export, tmp_path):
    run = tmp_path / "run"
    finetune(finetune_config(image_folder, run, init=str(stage1_export), teacher="random:1"))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    ckpt["model"]["junk"] = ckpt["model"].pop("head.weight")
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(UserError) as e:
        finetune(finetune_config(image_folder, run, teacher="random:1", resume=True, epochs=2))
    assert "does not match this student" in one_line(e.value) and "head.weight" in str(e.value)


def test_corrupt_logits_cache_names_what_finetune_can_do(image_folder, stage1_export, logits_cache, tmp_path):
    logits = shutil.copytree(logits_cache, tmp_path / "lc")
    path = logits / "shard-00000" / "argmax" / "c" / "0" / "0"
    flip_byte(path, 3)
    with pytest.raises(UserError) as e:
        finetune(finetune_config(image_folder, tmp_path / "run", init=str(stage1_export), logits=str(logits)))
    line = one_line(e.value)
    assert "extract-logits" in line and "--on-error" not in line and "rerun extract," not in line


def test_inspect_shows_a_logits_cache(logits_cache, capsys):
    assert cli_main(["inspect", str(logits_cache)]) == 0
    out = capsys.readouterr().out
    assert "logits cache" in out and "top-2 logits" in out and "older g2sd-cache" not in out


def test_inspect_shows_a_cache_with_a_corrupt_chunk_and_names_it(micro_cache, tmp_path):
    cache = shutil.copytree(micro_cache, tmp_path / "c")
    f = shard_file(cache, "shard-00000", "target")
    offset, _ = chunk_span(f, cache / "shard-00000" / "target", 0)
    flip_byte(f, offset + 3)
    r = inspect_report(str(cache), sample_views=len(list(cache.glob("shard-*"))) * 8)
    assert r["views"] == 24 and r["corrupt"] and "shard-00000" in r["corrupt"][0]
    assert "CORRUPT" in format_report(r) and r["sampled_views"] > 0


def test_messages_name_the_option_given(micro_cache, image_folder, tmp_path, capsys):
    # (evaluate's --val: tests/faults/test_stage2_inputs.py::test_evaluate_names_val_for_a_missing_folder)
    line = cli_error(capsys, "finetune", "--data", str(image_folder), "--init", "x", "--out", str(micro_cache),
                     "--img-size", "32", "--group-size", "4", "--arch", MICRO)
    assert "train writes" not in line and "finetune" in line
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")
    line = cli_error(capsys, "train", "--cache", str(micro_cache), "--out", str(dangling))
    assert "is a link to" in line and "File exists" not in line


@pytest.mark.parametrize("text, says", [('steps: "four"', "four"), ("seed: null", "null"), ("seed: 1.5", "1.5")])
def test_config_values_of_the_wrong_type_are_one_line_before_any_run_folder(micro_cache, image_folder, tmp_path,
                                                                            capsys, text, says):
    config = tmp_path / "c.yaml"
    config.write_text(text + "\n")
    out = tmp_path / "run"
    assert says in cli_error(capsys, "train", "--cache", str(micro_cache), "--out", str(out), "--config", str(config))
    assert not out.exists()
    if "seed" in text:
        assert says in cli_error(capsys, "finetune", "--data", str(image_folder), "--init", "x", "--out", str(out),
                                 "--img-size", "32", "--group-size", "4", "--config", str(config))
        assert not out.exists()

