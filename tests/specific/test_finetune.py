"""Stage 2 end to end on micro models: extract-logits, finetune (cached == replay == online step by step, exact
resume, evaluation and best.pt), export to timm with identical logits, verify of a logits cache, bad input."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from g2sd_cache.models.classifier import build_student, build_teacher, timm_distilled_model
from g2sd_cache.cli.finetune import finetune_config
from g2sd_cache.cli.main import main as cli_main, parse
from g2sd_cache.common.config import config_from_args
from g2sd_cache.common.errors import CacheCorruptError, UserError
from g2sd_cache.specific.evaluate import evaluate
from g2sd_cache.cli.export import export_run
from g2sd_cache.specific.extract_logits import run_extract_logits
from g2sd_cache.specific.finetune import finetune
from g2sd_cache.specific.finetuned import read_finetuned
from g2sd_cache.cache.logits import index_dtype, logits_specs, open_logits
from g2sd_cache.specific.config import FinetuneConfig, LogitsConfig
from g2sd_cache.verify.logits import verify_logits
from tests.common.helpers import sigterm_after_first_record, free_port

ROOT = Path(__file__).resolve().parents[2]
MICRO = "test_vit_micro_patch16"
TEACHER = "random:1"
PLAN = dict(img_size=32, group_size=4)     # image_folder: 12 images in 3 classes -> 3 groups per epoch



def logits_config(data, out, **kw) -> LogitsConfig:
    base = dict(data=str(data), out=str(out), teacher=TEACHER, teacher_arch=MICRO, cached_epochs=2, topk=2,
                shard_groups=2, workers=0, device="cpu", **PLAN)
    return LogitsConfig(**(base | kw))


@pytest.fixture(scope="module")
def logits_cache(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logits") / "lc"
    run_extract_logits(logits_config(image_folder, out))
    return out


def run_finetune(out: Path, data, init, **kw) -> list[dict]:
    base = dict(data=str(data), init=str(init), out=str(out), arch=MICRO, teacher_arch=MICRO, epochs=2, workers=0,
                device="cpu", log_every=1, warmup_epochs=1.0, blr=5e-2, seed=0, **PLAN)
    finetune(FinetuneConfig(**(base | kw)))
    return metrics(out)


def metrics(run: Path, kind: str = "loss") -> list[dict]:
    records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind in r]


def weights(run: Path) -> dict:
    return torch.load(Path(run) / "checkpoint.pt", weights_only=False)["model"]


def test_cached_logits_train_exactly_as_the_live_teacher(image_folder, stage1_export, logits_cache, tmp_path):
    """The logits cache replaces the teacher: cached, replay (cached + live teacher) and online training give the
    same losses at every step and the same weights, and replay finds the stored argmax equal to the live one."""
    kw = dict(logits=str(logits_cache))
    cached = run_finetune(tmp_path / "cached", image_folder, stage1_export, **kw)
    replay = run_finetune(tmp_path / "replay", image_folder, stage1_export, teacher=TEACHER, replay=True, **kw)
    # online sees the plan's own epochs; with 2 epochs and K = 2 those are the cached ones
    online = run_finetune(tmp_path / "online", image_folder, stage1_export, teacher=TEACHER)
    assert [m["step"] for m in cached] == list(range(1, 7)) and all(math.isfinite(m["loss"]) for m in cached)
    for run in (replay, online):
        assert [m["loss"] for m in run] == [m["loss"] for m in cached]
    assert all(m["replay_argmax_agreement"] == 1.0 for m in replay)
    assert all(0 <= m["replay_max_abs_logit_err"] < 1e-3 for m in replay)   # fp16 rounding of the stored logits
    for m in cached:
        assert m["loss"] == pytest.approx((m["loss_gt"] + m["loss_dist"]) / 2, rel=1e-6) and m["loss_dist"] > 0
    a, b = weights(tmp_path / "cached"), weights(tmp_path / "replay")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epochs_past_k_reuse_the_cached_epochs(image_folder, stage1_export, logits_cache, tmp_path):
    """Epoch e reads cached epoch e mod K: a 3-epoch run with K = 2 trains epoch 2 on the plan's epoch 0."""
    from g2sd_cache.common.dist import DistEnv
    from g2sd_cache.specific.finetune import Layout, RankItems
    cfg = FinetuneConfig(data=str(image_folder), out="x", init="x", epochs=3, **PLAN)
    items = list(RankItems(cfg, Layout(3, 1, 4, 1.0), DistEnv(0, 1, 0, torch.device("cpu")), 0, 0, cached_epochs=2))
    assert items == [(e, e % 2, g) for e in range(3) for g in range(3)]
    # 7 groups per epoch, 2 ranks x accum 2: 1 step per epoch (3 groups sit it out); resumed at epoch 0, group 0
    cfg = dataclasses.replace(cfg, accum_iter=2)
    ranks = [list(RankItems(cfg, Layout(7, 4, 16, 1.0), DistEnv(r, 2, 0, torch.device("cpu")), 0, 0, None))
             for r in range(2)]
    assert ranks == [[(e, e, g) for e in range(3) for g in (0, 2)], [(e, e, g) for e in range(3) for g in (1, 3)]]
    late = RankItems(cfg, Layout(7, 4, 16, 1.0), DistEnv(0, 2, 0, torch.device("cpu")), 1, 4, None)
    assert list(late) == [(2, 2, 0), (2, 2, 2)]       # epoch 1 at group 4: no full step left there
    got = run_finetune(tmp_path / "r", image_folder, stage1_export, logits=str(logits_cache), epochs=3)
    assert [m["epoch"] for m in got] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_stop_and_resume_give_the_same_losses_and_weights(image_folder, stage1_export, logits_cache, tmp_path):
    """Preempted mid-epoch (step 4 of 6, with micro-batches of 2 inside each group of 4) and resumed with other
    DataLoader workers, the run continues at the same group with the same losses and ends with the same weights."""
    kw = dict(logits=str(logits_cache), batch_size=2, val=str(image_folder))
    full = run_finetune(tmp_path / "full", image_folder, stage1_export, **kw)
    part = run_finetune(tmp_path / "part", image_folder, stage1_export, stop_after=4, **kw)
    assert [m["step"] for m in part] == [1, 2, 3, 4]
    resumed = run_finetune(tmp_path / "part", image_folder, stage1_export, resume=True, workers=2, **kw)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in full], rel=1e-6)
    assert [m["step"] for m in metrics(tmp_path / "part", "val_top1")] == [3, 6]   # no duplicate records
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(UserError, match="--resume: seed"):
        run_finetune(tmp_path / "part", image_folder, stage1_export, resume=True, seed=3, **kw)
    with pytest.raises(UserError, match="already holds a run"):
        run_finetune(tmp_path / "part", image_folder, stage1_export, **kw)


def test_resume_follows_moved_inputs_and_refuses_other_ones(image_folder, stage1_export, logits_cache, tmp_path):
    import shutil
    moved = tmp_path / "moved-lc"
    shutil.copytree(logits_cache, moved)
    run_finetune(tmp_path / "c", image_folder, stage1_export, logits=str(logits_cache), stop_after=1)
    got = run_finetune(tmp_path / "c", image_folder, stage1_export, logits=str(moved), resume=True, stop_after=2)
    assert [m["step"] for m in got] == [1, 2]
    with pytest.raises(UserError, match="--resume: mode"):
        run_finetune(tmp_path / "c", image_folder, stage1_export, teacher=TEACHER, resume=True)
    run_finetune(tmp_path / "o", image_folder, stage1_export, teacher=TEACHER, stop_after=1)
    with pytest.raises(UserError, match="--resume: the teacher \\(--teacher\\) is not the one"):
        run_finetune(tmp_path / "o", image_folder, stage1_export, teacher="random:7", resume=True)


def test_validation_every_epoch_keeps_the_best_weights(image_folder, stage1_export, logits_cache, tmp_path, capsys):
    run = tmp_path / "r"
    run_finetune(run, image_folder, stage1_export, logits=str(logits_cache), val=str(image_folder), epochs=3)
    vals = metrics(run, "val_top1")
    assert [v["epoch"] for v in vals] == [0, 1, 2] and all(v["val_n"] == 12 for v in vals)
    best = max(vals, key=lambda v: (v["val_top1"], -v["epoch"]))
    assert vals[-1]["best_top1"] == best["val_top1"]
    ft = read_finetuned(run, "test", prefer_best=True)
    assert ft.path.name == "best.pt" and ft.epoch == best["epoch"] and ft.classes == ("class000", "class001", "class002")
    again = evaluate(ft.model, str(image_folder), classes=ft.classes)
    assert again["top1"] == pytest.approx(best["val_top1"]) and again["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert cli_main(["evaluate", str(run), "--val", str(image_folder), "--workers", "0", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(best["val_top1"]) and "best.pt" in printed["model"]
    assert (run / "tb").is_dir() and "mode: cached" in (run / "config.yaml").read_text()


def _finetune_checkpoint(path: Path, arch: str, distilled: bool, classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """A finetune-format checkpoint of a randomly initialised (and perturbed) student."""
    model = build_student(arch, classes, 224, distilled=distilled, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    torch.save({"model": model.state_dict(), "stage": "finetune", "arch": arch, "num_classes": classes,
                "classes": [f"c{i}" for i in range(classes)], "img_size": 224, "distilled": distilled, "epoch": 4,
                "step": 40}, path)
    return model.eval()


@pytest.mark.parametrize("distilled", [True, False])
def test_export_loads_into_timm_with_identical_logits(tmp_path, distilled):
    """The distilled student -> timm's deit_tiny_distilled_patch16_224; the plain one -> vit_tiny_patch16_224 with
    global_pool='avg': strict keys, and the same eval logits."""
    student = _finetune_checkpoint(tmp_path / "best.pt", "vit_tiny_patch16", distilled)
    info = export_run(str(tmp_path / "best.pt"), str(tmp_path / "timm.pth"))
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    assert info["timm_model"] == name
    extra = {} if distilled else {"global_pool": "avg"}
    model = timm.create_model(name, pretrained=False, num_classes=3, **extra).eval()
    model.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), student(x), atol=1e-5, rtol=1e-5)
    mae = torch.load(export_run(str(tmp_path / "best.pt"), str(tmp_path / "mae.pth"), "mae")["path"], weights_only=True)
    assert set(mae) == {"model"} and all(torch.equal(v, student.state_dict()[k]) for k, v in mae["model"].items())


def test_export_of_a_micro_run_matches_timm_exactly(image_folder, stage1_export, logits_cache, tmp_path, capsys):
    run = tmp_path / "r"
    run_finetune(run, image_folder, stage1_export, logits=str(logits_cache), epochs=1)
    assert cli_main(["export", str(run), "--out", str(tmp_path / "m.pth")]) == 0
    assert "VisionTransformerDistilled" in capsys.readouterr().out
    model = timm_distilled_model(MICRO, 3, 32).eval()
    model.load_state_dict(torch.load(tmp_path / "m.pth", weights_only=True), strict=True)
    student = read_finetuned(run, "test").model
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), student(x))


def test_plain_fine_tuning_without_a_teacher(image_folder, stage1_export, tmp_path):
    got = run_finetune(tmp_path / "plain", image_folder, stage1_export, epochs=1)
    assert len(got) == 3 and all(m["loss_dist"] == 0 and m["loss"] == m["loss_gt"] for m in got)
    ft = read_finetuned(tmp_path / "plain", "test")
    assert not ft.distilled and ft.model.global_pool == "avg" and not hasattr(ft.model, "dist_token")


def test_logits_cache_layout_bytes_and_resume(image_folder, tmp_path):
    """22 B per sample per epoch at top-5 (fp16 values + uint16 classes + uint16 argmax), plus 4 B of crc32c per
    group and a 16 B index entry per group per shard file; a rerun after a lost shard rebuilds it identically."""
    assert sum(np.dtype(s.dtype).itemsize * math.prod(s.per_view_shape) for s in logits_specs(5, 1000).values()) == 22
    out = tmp_path / "lc"
    s = run_extract_logits(logits_config(image_folder, out, topk=3, shard_groups=3))
    cache = open_logits(out)
    m = cache.manifest
    assert (m.epochs, m.groups_per_epoch, m.samples, s["samples"]) == (2, 3, 24, 24)
    data = sum(size for entry in m.shards for rel, size in entry["files"].items() if "/c/" in rel)
    files, groups, per_sample = 3 * m.epochs, m.groups_per_epoch, 3 * 2 + 3 * 2 + 2   # 3 arrays x K shard files
    assert data == m.samples * per_sample + files * (groups * (4 + 16) + 4)
    before = {e: [cache.read(e, g) for g in range(3)] for e in range(2)}
    import shutil
    shutil.rmtree(out / "shard-00000")
    (out / "manifest.json").unlink()
    run_extract_logits(logits_config(image_folder, out, topk=3, shard_groups=3))
    after = open_logits(out)
    for e in range(2):
        for g in range(3):
            a, b = before[e][g], after.read(e, g)
            assert torch.equal(a.values, b.values) and torch.equal(a.argmax, b.argmax) and torch.equal(a.indices, b.indices)
    with pytest.raises(UserError, match="other settings \\(topk"):
        run_extract_logits(logits_config(image_folder, out, topk=2, shard_groups=3))


@pytest.mark.parametrize("classes,labels", [(40000, [0, 32767, 32768, 39999]), (65536, [65535, 32768, 1, 2]),
                                            (70000, [65535, 65536, 69999, 7])])
def test_class_indices_of_large_label_spaces_round_trip_through_the_cache(tmp_path, classes, labels):
    """Written by the shard writer and read back by LogitsCache, class indices >= 32,768 (an int16 would make
    32,768 into -32,768) and at the uint16 boundary come back as written; above 65,536 classes, int32."""
    from g2sd_cache.cache.logits import LOGITS_FORMAT, LOGITS_FORMAT_VERSION, LogitsCache, LogitsManifest, LogitsShardRecord
    from g2sd_cache.cache.digests import record_digest
    from g2sd_cache.cache.writer import ShardData, write_shard
    assert (index_dtype(65536), index_dtype(65537)) == ("uint16", "int32")
    specs = logits_specs(1, classes)
    arrays = {"values": np.full((1, 4, 1), 3.5, np.float16),
              "indices": np.asarray(labels, np.int64).reshape(1, 4, 1).astype(specs["indices"].dtype),
              "argmax": np.asarray(labels[::-1], np.int64).reshape(1, 4).astype(specs["argmax"].dtype)}
    record = LogitsShardRecord(index=0, first_group=0, groups=1, group_size=4, epochs=1)
    write_shard(tmp_path, ShardData(record, arrays), chunk_views=4)
    (tmp_path / "manifest.json").write_text(LogitsManifest(
        format=LOGITS_FORMAT, format_version=LOGITS_FORMAT_VERSION, teacher={}, teacher_precision="fp32", plan={},
        epochs=1, groups_per_epoch=1, group_size=4, topk=1, num_classes=classes, shard_groups=1,
        shards=[{"name": "shard-00000", "first_group": 0, "groups": 1, "files": record.files,
                 "record": record_digest((tmp_path / "shard-00000" / "shard.json").read_bytes())}], samples=4, bytes=0,
        created="").to_json())
    got = LogitsCache(tmp_path).read(0, 0)
    assert got.indices[:, 0].tolist() == labels and got.argmax.tolist() == labels[::-1]


def test_extract_logits_runs_the_teacher_in_its_own_precision_and_records_it(image_folder, logits_cache, tmp_path):
    """Default fp32 (G2SD's stage-2 teacher runs outside autocast); --teacher-precision bf16 really runs it under
    bf16 autocast (stored logits move by more than fp16 rounding), the manifest records it, verify shows it."""
    assert open_logits(logits_cache).manifest.teacher_precision == "fp32"
    out = tmp_path / "bf16"
    run_extract_logits(logits_config(image_folder, out, teacher_precision="bf16"))
    a, b = open_logits(logits_cache), open_logits(out)
    assert b.manifest.teacher_precision == "bf16-autocast"
    va = torch.cat([a.read(e, g).values for e in range(2) for g in range(3)])
    vb = torch.cat([b.read(e, g).values for e in range(2) for g in range(3)])
    assert float((va - vb).abs().max()) > 4 * float(va.abs().max()) * 2 ** -11   # 8x fp16 rounding
    report = verify_logits(str(out), deep=2, data=str(image_folder), device="cpu")
    assert report.ok, report.problems
    assert report.summary["teacher_precision"] == "bf16-autocast" and report.summary["deep"]["precision"] == "bf16"
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        run_extract_logits(logits_config(image_folder, tmp_path / "h", teacher_precision="fp16"))


def test_logits_cache_files_are_bound_to_their_place(image_folder, logits_cache, tmp_path):
    """Two same-size files of one shard swapped (epoch 0's and epoch 1's values: every crc32c still holds) are
    refused when read and named by verify: shard.json records each file's digest, the manifest each record's."""
    import shutil
    c = tmp_path / "lc"
    shutil.copytree(logits_cache, c)
    a, b = c / "shard-00000" / "values" / "c" / "0" / "0" / "0", c / "shard-00000" / "values" / "c" / "1" / "0" / "0"
    assert a.stat().st_size == b.stat().st_size
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(CacheCorruptError, match="shard-00000.*values/c/0/0/0 is not the one its record describes"):
        open_logits(c).read(0, 0)
    open_logits(c).read(0, 2)       # shard-00001 is intact
    problems = verify_logits(str(c)).problems
    assert any("shard-00000" in p and "values/c/0/0/0" in p for p in problems), problems
    # a shard.json from another shard no longer matches the manifest's digest of it
    rec = c / "shard-00001" / "shard.json"
    rec.write_text(rec.read_text().replace('"groups": 1', '"groups":  1'))
    with pytest.raises(CacheCorruptError, match="shard-00001.*shard.json is not the one the manifest records"):
        open_logits(c).read(0, 2)


def test_an_image_replaced_by_same_size_bytes_is_refused_by_cached_finetune_and_verify(
        image_folder, stage1_export, logits_cache, tmp_path):
    """The listing ties images by name and size only: an image whose bytes changed (same size) would train on
    the stored predictions of another picture. The logits cache records each image's crc32c: finetune stops
    in one line naming it, verify --data names it."""
    import shutil
    from g2sd_cache.cache.digests import SourceChangedError
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    victim = sorted(data.rglob("*.jpg"))[5]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    with pytest.raises(SourceChangedError, match=victim.name):
        run_finetune(tmp_path / "r", data, stage1_export, logits=str(logits_cache), epochs=1)
    problems = verify_logits(str(logits_cache), data=str(data)).problems
    assert any(victim.name in p and "changed" in p for p in problems), problems
    assert verify_logits(str(logits_cache), data=str(image_folder)).ok


def test_verify_checks_a_logits_cache(image_folder, tmp_path, capsys):
    out = tmp_path / "lc"
    run_extract_logits(logits_config(image_folder, out))
    assert cli_main(["verify", str(out), "--data", str(image_folder), "--deep", "2", "--teacher", TEACHER]) == 0
    assert "argmax agreement 100.00%" in capsys.readouterr().out
    chunk = out / "shard-00001" / "argmax" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    report = verify_logits(str(out))
    assert not report.ok and any(p.startswith("shard-00001: argmax, epoch 1") and "crc32c" in p for p in report.problems)
    assert cli_main(["verify", str(out)]) == 1


def _one_line_error(argv: list[str], capsys) -> str:
    assert cli_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_bad_input_is_one_line(image_folder, stage1_export, logits_cache, tmp_path, capsys):
    common = ["--arch", MICRO, "--teacher-arch", MICRO, "--img-size", "32", "--group-size", "4", "--epochs", "1",
              "--workers", "0", "--device", "cpu"]
    ft = ["finetune", "--data", str(image_folder), "--init", str(stage1_export), *common]
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes((next(image_folder.rglob("*.jpg"))).read_bytes())
    assert "not in a class sub-folder" in _one_line_error(
        ["finetune", "--data", str(flat), "--init", str(stage1_export), "--out", str(tmp_path / "a"), *common], capsys)
    # a teacher without a classifier head: a stage-1 encoder
    assert "has no classifier head" in _one_line_error([*ft, "--out", str(tmp_path / "b"), "--teacher",
                                                        str(stage1_export)], capsys)
    # a teacher fine-tuned on 5 classes for data of 3
    five = tmp_path / "five.pth"
    torch.save({"model": build_teacher("random:2", MICRO, 5, 32)[0].state_dict()}, five)
    assert "classifies into 5 classes but the data has 3" in _one_line_error(
        [*ft, "--out", str(tmp_path / "c"), "--teacher", str(five)], capsys)
    # a logits cache of another plan (another seed)
    assert "another stage-2 plan (seed differ)" in _one_line_error(
        [*ft, "--out", str(tmp_path / "d"), "--logits", str(logits_cache), "--seed", "9"], capsys)
    # --init that is neither a stage-1 run nor an export
    junk = tmp_path / "junk.pth"
    torch.save({"weight": torch.zeros(3)}, junk)
    assert "holds no ViT encoder" in _one_line_error(
        ["finetune", "--data", str(image_folder), "--init", str(junk), "--out", str(tmp_path / "e"), *common], capsys)
    assert "folder without checkpoint.pt" in _one_line_error(
        ["finetune", "--data", str(image_folder), "--init", str(tmp_path), "--out", str(tmp_path / "f"), *common], capsys)
    # a teacher replaying a cache it did not make
    assert "not the teacher that made" in _one_line_error(
        [*ft, "--out", str(tmp_path / "g"), "--logits", str(logits_cache), "--teacher", "random:7", "--replay"], capsys)
    assert "--replay runs the live teacher" in _one_line_error(
        [*ft, "--out", str(tmp_path / "g"), "--logits", str(logits_cache), "--replay"], capsys)
    # a validation folder with a class the training data lacks
    val = tmp_path / "val"
    (val / "zebra").mkdir(parents=True)
    (val / "zebra" / "z.jpg").write_bytes((next(image_folder.rglob("*.jpg"))).read_bytes())
    assert "zebra" in _one_line_error([*ft, "--out", str(tmp_path / "h"), "--val", str(val)], capsys)
    # extract-logits: more top-k than classes; a recipe value this implementation does not support
    assert "--topk 4 is more than the 3 classes" in _one_line_error(
        ["extract-logits", "--data", str(image_folder), "--teacher", TEACHER, "--teacher-arch", MICRO, "--img-size",
         "32", "--group-size", "4", "--topk", "4", "--out", str(tmp_path / "i"), "--workers", "0", "--device", "cpu"],
        capsys)
    cfg = tmp_path / "sgd.yaml"
    cfg.write_text("optimizer: sgd\n")
    assert "optimizer 'sgd' is not supported" in _one_line_error([*ft, "--out", str(tmp_path / "j"), "--config", str(cfg)],
                                                                 capsys)
    assert not any((tmp_path / name / "checkpoint.pt").exists() for name in "abcdefghij")


def test_logits_with_a_teacher_named_by_the_config_trains_from_the_cache_and_says_so(image_folder, stage1_export,
                                                                                        logits_cache, tmp_path, capsys):
    """The README's command: the recipe config names a teacher file and the flags add --logits. That is cached
    mode (the teacher is neither loaded nor run, so the file need not exist), printed as the run's first line;
    replay needs --replay."""
    given = ["--config", str(ROOT / "configs" / "finetune_vit_small.yaml"), "--data", "d", "--out", "o", "--init", "i"]
    cfg = finetune_config(parse(["finetune", *given, "--logits", "L"]))
    assert cfg.teacher == "mae_finetuned_vit_base.pth" and cfg.mode == "cached"
    assert finetune_config(parse(["finetune", *given, "--logits", "L", "--replay"])).mode == "replay"
    assert dataclasses.replace(cfg, replay=True).mode == "replay"
    capsys.readouterr()
    got = run_finetune(tmp_path / "r", image_folder, stage1_export, logits=str(logits_cache),
                       teacher=str(tmp_path / "no-such-teacher.pth"), epochs=1)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("mode: cached") and "no teacher forward" in out[0] and "--replay" in out[0]
    assert got and all("replay_argmax_agreement" not in m for m in got)


def test_the_recipe_config_is_accepted_and_gives_the_defaults():
    path = ROOT / "configs" / "finetune_vit_small.yaml"
    given = ["--config", str(path), "--data", "d", "--out", "o"]
    cfg = finetune_config(parse(["finetune", *given, "--init", "i"]))
    defaults = FinetuneConfig(data="d", out="o", init="i", teacher=cfg.teacher)
    assert cfg.teacher == "mae_finetuned_vit_base.pth"
    assert cfg.recipe() == defaults.recipe()
    assert cfg == dataclasses.replace(defaults, precision="fp16", batch_size=128)   # G2SD's fp16; its per-GPU batch
    logits = config_from_args(LogitsConfig, parse(["extract-logits", *given, "--teacher", "t"]))
    assert logits.recipe() == cfg.recipe() and logits.teacher == "t"
    with pytest.raises(UserError, match="distilled: true but neither --teacher nor --logits"):
        finetune_config(parse(["finetune", *given, "--init", "i", "--teacher", ""]))


def _torchrun(nproc: int, port: int, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "g2sd_cache.cli.main", "finetune", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_two_ranks_resumed_on_one_continue_the_same_run(image_folder, stage1_export, logits_cache, tmp_path):
    """Elastic: 2 gloo ranks (one group each per step) stopped mid-epoch and resumed on 1 rank with --accum-iter 2
    give, step by step, the losses of an uninterrupted 1-rank run with --accum-iter 2 (the same groups per step)."""
    plan = dict(img_size=32, group_size=2)          # 6 groups per epoch, 3 steps of 2 groups
    cache = tmp_path / "lc2"
    run_extract_logits(logits_config(image_folder, cache, **plan))
    full = run_finetune(tmp_path / "full", image_folder, stage1_export, logits=str(cache), accum_iter=2, **plan)
    done = _torchrun(2, free_port(), "--data", image_folder, "--init", stage1_export, "--out", tmp_path / "ddp", "--arch", MICRO,
                     "--img-size", 32, "--group-size", 2, "--epochs", 2, "--workers", 0, "--device", "cpu",
                     "--log-every", 1, "--warmup-epochs", 1, "--blr", 5e-2, "--logits", cache, "--stop-after", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = run_finetune(tmp_path / "ddp", image_folder, stage1_export, logits=str(cache), accum_iter=2, resume=True,
                           **plan)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in full], rel=1e-4)


@pytest.mark.slow
def test_finetune_benchmark_quick_writes_every_figure(tmp_path):
    """benchmarks/finetune.py (throughput's finetune section, alone) stays runnable: --quick end to end, every
    headline figure positive and finite, and a bad flag is one line."""
    out = tmp_path / "finetune.json"
    script = str(ROOT / "benchmarks" / "finetune.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--device", "cpu", "--threads", "1", "--reps", "1",
                           "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    step = report["step"][0]
    figures = [step[k] for k in ("teacher_s_per_sample", "online_s_per_sample", "cached_s_per_sample", "speedup",
                                 "ideal_speedup", "efficiency")]
    figures += [report["storage"][k] for k in ("measured_bytes_per_sample", "imagenet_bytes_per_sample")]
    figures += [report["extract"][k] for k in ("extract_samples_per_s", "teacher_only_samples_per_s", "ratio")]
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in figures), figures
    assert report["storage"]["payload_bytes_per_sample"] == 22
    assert report["config"]["reps"] == 1 and report["machine"]["torch_threads"] == 1
    assert "| teacher → student | batch | teacher forward |" in proc.stdout and "extract-logits (" in proc.stdout
    bad = subprocess.run([sys.executable, script, "--quick", "--sections", "step,nope"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip() == ("--sections: unknown section nope; choose from step, "
                                                          "storage, extract")


def test_sigterm_saves_a_checkpoint_and_stops(image_folder, stage1_export, logits_cache, tmp_path):
    """A preemption notice ends the run after the current step with a checkpoint that --resume continues."""
    run = tmp_path / "term"
    code, out, err = sigterm_after_first_record(
        ["finetune", "--data", str(image_folder), "--init", str(stage1_export), "--logits", str(logits_cache), "--out",
         str(run), "--arch", MICRO, "--img-size", "32", "--group-size", "4", "--epochs", "100000", "--workers", "0",
         "--device", "cpu", "--log-every", "1"], run, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert code == 0, err[-2000:]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["stage"] == "finetune" and ckpt["step"] >= 1 and "stopped at step" in out
    assert [m["step"] for m in metrics(run)] == list(range(1, ckpt["step"] + 1))


@pytest.mark.slow
def test_demo_micro_runs_both_stages(tmp_path):
    from g2sd_cache.cli.demo import DEMO_OUTPUTS, DemoConfig, run_demo
    summary = run_demo(DemoConfig(out=str(tmp_path / "demo"), preset="micro", images=32, steps=4, batch_size=8,
                                  workers=0, device="cpu"))
    s2 = summary["stage2"]
    assert s2["online_losses_equal"] and len(s2["val_top1"]) == 2 and s2["samples_cached"] == 2 * 32
    assert s2["export_top1"] == pytest.approx(max(s2["val_top1"]))   # best.pt, exported to timm, evaluated again
    assert (tmp_path / "demo" / "student-timm.pth").is_file()
    # everything the demo wrote is among the outputs a rerun replaces (a rerun keeps anything else)
    assert {p.name for p in (tmp_path / "demo").iterdir()} <= {*DEMO_OUTPUTS, ".g2sd-demo"}
    # a second demo replaces the first; a folder the demo did not make is refused untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="replaces only a folder it made"):
        run_demo(DemoConfig(out=str(mine), preset="micro"))
    assert (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_two_ranks_extract_the_same_logits_cache_as_one(image_folder, logits_cache, tmp_path):
    """torchrun with 2 ranks: disjoint shards per rank, the manifest from rank 0, the arrays of a 1-rank run."""
    out = tmp_path / "lc-ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
           "g2sd_cache.cli.main", "extract-logits", "--data", str(image_folder), "--out", str(out), "--teacher", TEACHER,
           "--teacher-arch", MICRO, "--img-size", "32", "--group-size", "4", "--cached-epochs", "2", "--topk", "2",
           "--shard-groups", "1", "--workers", "0", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = open_logits(logits_cache), open_logits(out)
    assert len(two.manifest.shards) == 3 and verify_logits(str(out)).ok
    for e in range(2):
        for g in range(3):
            a, b = one.read(e, g), two.read(e, g)
            assert torch.equal(a.values, b.values) and torch.equal(a.argmax, b.argmax)
