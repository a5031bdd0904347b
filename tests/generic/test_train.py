"""The trainer: cached == replay-online step by step, exact resume, DDP shares, export, schedule, failures."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from tests.common.helpers import MICRO_STUDENT, MICRO_TEACHER, micro_extract_config, sigterm_after_first_record, free_port
from g2sd_cache.common.errors import UserError
from g2sd_cache.cli.export import export_encoder
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.models.mae import build_student
from g2sd_cache.training.schedule import get_lr, scaled_lr
from g2sd_cache.generic.train import TrainConfig, train


def run_train(out: Path, data, **kw) -> list[dict]:
    base = dict(data=str(data) if data is not None else None, out=str(out), student=MICRO_STUDENT, batch_size=3, workers=0, device="cpu",
                log_every=1, save_every=1000, warmup_steps=1, blr=1e-3, seed=0)
    if "warmup_epochs" in kw:
        base.pop("warmup_steps")
    base.update(kw)
    train(TrainConfig(**base))
    return metrics(out)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def samples(run: Path, rank: int = 0) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / f"samples-rank{rank}.jsonl").read_text().splitlines()]


def test_cached_and_replay_online_training_give_the_same_loss_at_every_step(micro_cache, image_folder, tmp_path):
    """The cache replaces the teacher: training on stored targets == training on the live teacher's
    targets for the same views (fp16 codec tolerance), step by step for 10 steps."""
    cached = run_train(tmp_path / "cached", image_folder, cache=str(micro_cache), steps=10)
    replay = run_train(tmp_path / "replay", image_folder, cache=str(micro_cache), teacher="random", steps=10)
    assert [m["step"] for m in cached] == list(range(1, 11))
    for a, b in zip(cached, replay):
        assert math.isfinite(a["loss"])
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-5)
        assert b["replay_rel_rmse"] < 1e-3          # fp16 rounding of LN-ed features


def test_cached_training_lowers_the_loss_on_the_same_views(micro_cache, image_folder, tmp_path):
    """Epochs 0 and 8 train on the same 12 cached views (view e mod 2): eight epochs later their mean loss is
    far lower. (Single steps of 3 samples at a warm-up lr are noise: step 10 may well exceed step 1.)"""
    m = run_train(tmp_path / "r", image_folder, cache=str(micro_cache), epochs=9, blr=0.1, warmup_epochs=1)
    first, last = (sum(x["loss"] for x in m if x["epoch"] == e) / 4 for e in (0, 8))
    assert len(m) == 36 and last < 0.6 * first, (first, last)


@pytest.mark.parametrize("pixels,accum,stop,steps,workers", [(True, 3, 2, 7, 0), (False, 1, 23, 25, 2)])
def test_stop_after_then_resume_gives_the_same_losses_and_samples(micro_cache, micro_cache_no_pixels, image_folder,
                                                                  tmp_path, pixels, accum, stop, steps, workers):
    """Preempted mid-epoch and resumed, a run sees the same samples in the same order and the same
    losses as an uninterrupted run: from stored pixels with gradient accumulation and a padded last step
    (12 views, 9 per step), and decoding images in 2 workers, resumed with 1 worker."""
    cache = micro_cache if pixels else micro_cache_no_pixels
    kw = dict(cache=str(cache), steps=steps, batch_size=3 if pixels else 1, accum_iter=accum, shuffle_window=5,
              log_samples=True, warmup_epochs=0.3)
    full = run_train(tmp_path / "full", image_folder, workers=workers, **kw)
    part = run_train(tmp_path / "part", image_folder, stop_after=stop, workers=workers, **kw)
    assert [m["step"] for m in part] == list(range(1, stop + 1))
    resumed = run_train(tmp_path / "part", image_folder, resume=True, workers=max(0, workers - 1), **kw)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in full], rel=1e-6)
    assert samples(tmp_path / "part") == samples(tmp_path / "full")
    got = samples(tmp_path / "full")
    used = [i for s in got if s["epoch"] == 0 for i, ok in zip(s["index"], s["valid"]) if ok]
    assert sorted(used) == list(range(12))
    assert {v for s in got for v, ok in zip(s["view"], s["valid"]) if s["epoch"] == 1 and ok} == {1}  # e mod K
    assert all(len(s["key"]) == len(s["index"]) for s in got)


def test_resume_refuses_a_changed_data_order(micro_cache, image_folder, tmp_path):
    run_train(tmp_path / "r", image_folder, cache=str(micro_cache), steps=4, stop_after=2)
    with pytest.raises(UserError, match="seed"):
        run_train(tmp_path / "r", image_folder, cache=str(micro_cache), steps=4, resume=True, seed=2)
    with pytest.raises(UserError, match="--resume"):
        run_train(tmp_path / "r", image_folder, cache=str(micro_cache), steps=4)
    with pytest.raises(UserError, match="not a g2sd-cache training run"):
        run_train(tmp_path / "empty", image_folder, cache=str(micro_cache), steps=4, resume=True)
    from g2sd_cache.cache.ownership import claim_run_folder
    claim_run_folder(tmp_path / "r2", resume=False)      # one of our run folders, but without a checkpoint
    with pytest.raises(UserError, match="no checkpoint.pt"):
        run_train(tmp_path / "r2", image_folder, cache=str(micro_cache), steps=4, resume=True)
    with pytest.raises(UserError, match="student"):
        run_train(tmp_path / "r", image_folder, cache=str(micro_cache), steps=4, resume=True,
                  student="mae_vit_tiny_patch16_dec128d4b")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is an existing file"):
        run_train(tmp_path / "file", image_folder, cache=str(micro_cache), steps=1)
    with pytest.raises(UserError, match="is a folder"):
        export_encoder(str(tmp_path / "r"), str(tmp_path))


@pytest.mark.slow
def test_two_gloo_ranks_read_disjoint_views_once_and_run_the_same_steps(micro_cache, image_folder, tmp_path):
    """torchrun with 2 CPU ranks x 2 workers: over one epoch every cached view of the epoch's view index
    is used exactly once, the ranks' views are disjoint and both run the same number of steps."""
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "g2sd_cache.cli.main", "train", "--data", str(image_folder), "--cache", str(micro_cache),
           "--out", str(run), "--student", MICRO_STUDENT, "--epochs", "1", "--batch-size", "2",
           "--workers", "2", "--shuffle-window", "4", "--device", "cpu", "--log-every", "1", "--log-samples",
           "--warmup-epochs", "0.5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = samples(run, 0), samples(run, 1)
    assert [s["step"] for s in r0] == [s["step"] for s in r1] == [0, 1, 2]
    ids0 = {i for s in r0 for i in s["index"]}
    ids1 = {i for s in r1 for i in s["index"]}
    assert not ids0 & ids1
    assert sorted(ids0 | ids1) == list(range(12)) and sum(len(s["index"]) for s in r0 + r1) == 12
    assert len(metrics(run)) == 3


def test_online_mode_trains_with_the_teacher_in_the_loop(image_folder, tmp_path):
    got = run_train(tmp_path / "online", image_folder, teacher="random", arch=MICRO_TEACHER, img_size=64, steps=3)
    assert len(got) == 3 and all(math.isfinite(m["loss"]) for m in got)
    assert {"step", "epoch", "loss", "lr", "samples_per_s", "data_wait_frac_rank0"} <= set(got[0])
    assert (tmp_path / "online" / "config.yaml").read_text().count("mode: online") == 1
    assert list((tmp_path / "online" / "tb").iterdir())


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(micro_cache, image_folder, tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(UserError, match=r"NaN or Inf at step \d+"):
        run_train(run, image_folder, cache=str(micro_cache), steps=20, blr=1e30, warmup_epochs=0, save_every=1)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert ckpt["step"] >= 1


def test_export_loads_into_timm_with_strict_keys_and_computes_the_same_features(image_folder, tmp_path):
    cache = tmp_path / "c224"
    run_extract(micro_extract_config(image_folder, cache, img_size=224, views=1))
    run = tmp_path / "tiny"
    run_train(run, image_folder, cache=str(cache), student="mae_vit_tiny_patch16_dec128d4b", steps=1, batch_size=2)
    info = export_encoder(str(run), str(tmp_path / "enc.pth"))
    assert info["timm_model"] == "vit_tiny_patch16_224"
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, pretrained=False)
    model.load_state_dict(torch.load(tmp_path / "enc.pth"), strict=True)
    student = build_student("mae_vit_tiny_patch16_dec128d4b", 32)
    student.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False)["model"])
    x = torch.randn(2, 3, 224, 224)
    all_visible = torch.zeros(2, 196, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), student.forward_encoder(student.visible_input(x, all_visible), all_visible), atol=1e-5)


def test_student_forward_shapes():
    s = build_student("mae_vit_small_patch16_dec256d4b", target_dim=512)
    mask = torch.ones(2, 196, dtype=torch.bool)
    mask[:, :49] = False
    assert s(torch.randn(2, 3, 224, 224), mask).shape == (2, 197, 512)
    assert s.forward_encoder(s.visible_input(torch.randn(2, 3, 224, 224), mask), mask).shape == (2, 50, 384)


def test_schedule_values_at_known_steps():
    kw = dict(base_lr=1e-3, min_lr=1e-5, warmup_steps=10, total_steps=110)
    assert get_lr(0, **kw) == 0.0
    assert get_lr(5, **kw) == pytest.approx(5e-4)
    assert get_lr(10, **kw) == pytest.approx(1e-3)
    assert get_lr(60, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert get_lr(110, **kw) == pytest.approx(1e-5)
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_cli_user_errors_are_one_line(tmp_path, image_folder):
    """Mistakes print one line naming the problem, no traceback, exit status 2."""
    cases = [
        ["train", "--data", str(image_folder), "--out", str(tmp_path / "x")],
        ["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y"), "--cache", str(tmp_path)],
    ]
    for args in cases:
        done = subprocess.run([sys.executable, "-m", "g2sd_cache.cli.main", *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in done.stderr and lines[0].startswith("g2sd-cache train: error:")


def test_config_file_sets_options_and_flags_override_it(micro_cache, image_folder, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"data: {image_folder}\ncache: {micro_cache}\nstudent: {MICRO_STUDENT}\nsteps: 2\n"
                   f"batch_size: 2\nworkers: 0\ndevice: cpu\nlog_every: 1\nwarmup_steps: 1\n")
    done = subprocess.run([sys.executable, "-m", "g2sd_cache.cli.main", "train", "--config", str(cfg),
                           "--out", str(tmp_path / "run"), "--steps", "3"], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3]
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nbatchsize: 3\n")
    done = subprocess.run([sys.executable, "-m", "g2sd_cache.cli.main", "train", "--config", str(bad), "--out",
                           str(tmp_path / "r2")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown option(s) batchsize" in done.stderr


def test_cached_training_streams_tar_sources_and_uses_every_view_once(tmp_path):
    """With webdataset tars the trainer reads each tar sequentially beside its cache shard and joins by key."""
    from g2sd_cache.data.synthetic import make_tar_shards
    tars = make_tar_shards(tmp_path / "tars", count=10, per_shard=4, seed=3)
    spec = str(tmp_path / "tars" / "train-{000000..000002}.tar")
    cache = tmp_path / "tar-cache"
    run_extract(micro_extract_config(spec, cache, views=1, pixels="none"))
    assert len(tars) == 3
    run = tmp_path / "tar-run"
    got = run_train(run, spec, cache=str(cache), epochs=1, batch_size=2, workers=2, log_samples=True)
    assert len(got) == 5 and all(math.isfinite(m["loss"]) for m in got)
    seen = sorted(i for s in samples(run) for i in s["index"])
    assert seen == sorted((t << 32) | p for t, n in enumerate([4, 4, 2]) for p in range(n))
    assert all(all(s["valid"]) for s in samples(run))
    # a pixel cache of the same tars trains without them (no tar is read, so its blocks mix across tars)
    pix = tmp_path / "tar-cache-pixels"
    run_extract(micro_extract_config(spec, pix, views=1))
    alone = run_train(tmp_path / "tar-pix", None, cache=str(pix), epochs=1, batch_size=2, log_samples=True)
    assert len(alone) == 5 and all(math.isfinite(m["loss"]) for m in alone)
    assert sorted(i for s in samples(tmp_path / "tar-pix") for i in s["index"]) == seen


def test_loss_tokens_select_masked_visible_or_all_and_drop_invalid_samples():
    from g2sd_cache.generic.step import token_mask as _token_mask
    mask = torch.tensor([[True, False, True], [False, True, True]])
    valid = torch.tensor([True, False])
    assert _token_mask("all", mask, torch.tensor([True, True]), all_valid=True) is None
    assert _token_mask("all", mask, valid, all_valid=False).tolist() == [[True] * 4, [False] * 4]
    assert _token_mask("masked", mask, valid, all_valid=False).tolist() == [[False, True, False, True], [False] * 4]
    assert _token_mask("visible", mask, torch.tensor([True, True]), all_valid=True).tolist() == \
        [[True, False, True, False], [True, True, False, False]]


@pytest.mark.parametrize("tokens", ["masked", "visible"])
def test_training_on_masked_or_visible_tokens_only(micro_cache, image_folder, tmp_path, tokens):
    got = run_train(tmp_path / tokens, image_folder, cache=str(micro_cache), steps=2, loss_tokens=tokens)
    assert len(got) == 2 and all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in got)


def test_sigterm_saves_a_checkpoint_and_stops(micro_cache, image_folder, tmp_path):
    """A preemption notice (SIGTERM) ends the run at the next step with a checkpoint to resume from."""
    run = tmp_path / "term"
    code, out, err = sigterm_after_first_record(
        ["train", "--data", str(image_folder), "--cache", str(micro_cache), "--out", str(run), "--student",
         MICRO_STUDENT, "--steps", "100000", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--log-every",
         "1"], run)
    assert code == 0, err[-2000:]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert 1 <= ckpt["step"] < 100000 and "stopped at step" in out


def test_pixel_cache_trains_without_data_exactly_like_the_image_path(micro_cache, micro_cache_no_pixels,
                                                                      image_folder, tmp_path):
    """A cache with stored pixels trains with no --data (no image opened) and gives the losses that decoding
    the images gives on a --pixels none cache of the same views; with --data too (checked, not read)."""
    kw = dict(steps=6, batch_size=3, accum_iter=2, log_samples=True)
    pixels = run_train(tmp_path / "pix", None, cache=str(micro_cache), **kw)
    images = run_train(tmp_path / "img", image_folder, cache=str(micro_cache_no_pixels), workers=2, **kw)
    both = run_train(tmp_path / "both", image_folder, cache=str(micro_cache), **kw)
    assert [m["loss"] for m in pixels] == pytest.approx([m["loss"] for m in images], rel=1e-5)
    assert [m["loss"] for m in both] == [m["loss"] for m in pixels]
    assert samples(tmp_path / "pix") == samples(tmp_path / "img")
    assert "reads: cached pixels" in (tmp_path / "pix" / "config.yaml").read_text()


def test_a_cache_without_pixels_needs_data_in_one_line(micro_cache_no_pixels, tmp_path):
    done = subprocess.run([sys.executable, "-m", "g2sd_cache.cli.main", "train", "--cache", str(micro_cache_no_pixels),
                           "--out", str(tmp_path / "r"), "--device", "cpu"], capture_output=True, text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr
    assert "--pixels none" in lines[0] and "--data" in lines[0]


def test_warm_up_longer_than_the_run_is_refused_unless_given_in_steps(micro_cache, tmp_path):
    with pytest.raises(UserError, match=r"--warmup-epochs 10.0 is 40 steps .*--warmup-steps"):
        run_train(tmp_path / "w", None, cache=str(micro_cache), steps=5, warmup_epochs=10.0)
    got = run_train(tmp_path / "w2", None, cache=str(micro_cache), steps=3, warmup_steps=10)
    assert [m["lr"] for m in got] == pytest.approx([0.0, 1e-3 * 3 / 256 / 10, 1e-3 * 3 / 256 * 2 / 10])
    assert "warmup_steps: 10" in (tmp_path / "w2" / "config.yaml").read_text()


def _torchrun(nproc: int, port: int, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "g2sd_cache.cli.main", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_elastic_resume_on_another_number_of_ranks_continues_the_same_run(micro_cache, tmp_path):
    """The epoch order does not depend on the world size: a 2-rank run stopped mid-epoch and resumed on 1 rank
    (and a 1-rank run resumed on 2) gives, step by step, the losses of an uninterrupted 1-rank run at the same
    global batch of 4, and uses every view of every epoch exactly once."""
    common = ["--cache", micro_cache, "--student", MICRO_STUDENT, "--steps", 6, "--device", "cpu", "--log-every", 1,
              "--warmup-steps", 1, "--blr", 1e-3, "--log-samples", "--shuffle-window", 5]
    full = run_train(tmp_path / "full", None, cache=str(micro_cache), steps=6, batch_size=4, blr=1e-3,
                     shuffle_window=5, log_samples=True)
    # 2 ranks x 2 -> stop at step 2 (mid-epoch: 8 of 12 views) -> 1 rank x 2 x accum 2
    done = _torchrun(2, free_port(), *common, "--out", tmp_path / "a", "--batch-size", 2, "--stop-after", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    a = run_train(tmp_path / "a", None, cache=str(micro_cache), steps=6, batch_size=2, accum_iter=2, blr=1e-3,
                  shuffle_window=5, log_samples=True, resume=True)
    # 1 rank x 4 -> stop at step 4 (mid-epoch 1) -> 2 ranks x 2
    run_train(tmp_path / "b", None, cache=str(micro_cache), steps=6, batch_size=4, blr=1e-3, shuffle_window=5,
              log_samples=True, stop_after=4)
    done = _torchrun(2, free_port(), *common, "--out", tmp_path / "b", "--batch-size", 2, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    b = metrics(tmp_path / "b")
    for got in (a, b):
        assert [m["step"] for m in got] == list(range(1, 7))
        assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in full], rel=1e-4)
    for run in ("a", "b"):
        used = {}
        for rank in (0, 1):
            for s in samples(tmp_path / run, rank):
                for i, v, ok in zip(s["index"], s["view"], s["valid"]):
                    if ok:
                        used.setdefault(s["epoch"], []).append((i, v))
        assert sorted(used[0]) == [(i, 0) for i in range(12)] and sorted(used[1]) == [(i, 1) for i in range(12)]


def test_resume_with_another_global_batch_under_epochs_trains_exactly_those_epochs(micro_cache, tmp_path):
    """--epochs 2 stopped at the end of epoch 0 with batch 8 and resumed with batch 4 (and 4 -> 8) trains each
    of the 12 views once per epoch, two epochs and no partial third, and the lr at every resumed step is the lr
    an uninterrupted run at the new batch has at the same sample."""
    for first, then in ((8, 4), (4, 8)):
        kw = dict(cache=str(micro_cache), epochs=2, warmup_epochs=1, log_samples=True, blr=1e-3)
        full = run_train(tmp_path / f"full{then}", None, batch_size=then, **kw)
        run = tmp_path / f"r{first}-{then}"
        run_train(run, None, batch_size=first, stop_after=-(-12 // first), **kw)
        resumed = run_train(run, None, batch_size=then, resume=True, **kw)
        per_epoch = {}
        for s in samples(run):
            per_epoch.setdefault(s["epoch"], []).extend(i for i, ok in zip(s["index"], s["valid"]) if ok)
        assert {e: sorted(v) for e, v in per_epoch.items()} == {0: list(range(12)), 1: list(range(12))}
        epoch1 = [m["lr"] for m in resumed if m["epoch"] == 1]
        assert epoch1 == pytest.approx([m["lr"] for m in full if m["epoch"] == 1], rel=1e-9)
        assert resumed[-1]["step"] == -(-12 // first) + -(-12 // then)


@pytest.mark.parametrize("batch,accum", [((6, 1), (3, 2)), ((8, 1), (4, 2))])
def test_how_a_step_is_cut_into_micro_batches_does_not_change_the_run(micro_cache, tmp_path, batch, accum):
    """One normalisation per optimizer step: batch 6 x 1 and 3 x 2 (and 8 x 1 vs 4 x 2, whose second step is half
    stand-ins: 12 views, 8 per step) give the same losses at every step and the same gradients: AdamW's exp_avg
    (a running mean of the gradients) after the steps. Weights would not do: at the default lr they move ~1e-6,
    and AdamW turns the rounding noise of an exactly-zero gradient (attention key biases) into +-lr steps."""
    runs = []
    for b, a in (batch, accum):
        out = tmp_path / f"b{b}a{a}"
        runs.append(run_train(out, None, cache=str(micro_cache), steps=3, batch_size=b, accum_iter=a))
        runs[-1] = (runs[-1], torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["state"])
    (m1, s1), (m2, s2) = runs
    assert [m["loss"] for m in m1] == pytest.approx([m["loss"] for m in m2], rel=1e-5)
    assert s1.keys() == s2.keys()
    for k in s1:
        a, b = s1[k]["exp_avg"], s2[k]["exp_avg"]
        scale = max(a.abs().max().item(), 1e-12)
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * scale), (k, (a - b).abs().max().item(), scale)


@pytest.mark.parametrize("codec", ["pca16", "pca4+8+16"])
def test_cached_training_on_a_low_rank_cache_equals_replay_within_the_codec_bound(image_folder, tmp_path, codec):
    """A pca16 cache (16 of the micro teacher's 32 dimensions, decoded on the device before the loss), or a tiered
    pca4+8+16 one (28 dimensions in 8, 4 and 2 bits), trains like the live teacher on the same views: the replayed
    targets differ from the stored ones by the codec's calibrated error (the worst held-out view bounds every
    batch), and so does the loss, step by step."""
    cache = tmp_path / "lowrank"
    run_extract(micro_extract_config(image_folder, cache, codec=codec))
    cal = json.loads((cache / "manifest.json").read_text())["calibration"]["errors"][codec]
    assert 0.005 < cal["rel_rmse"] < 0.2       # a real truncation, not a lossless code
    cached = run_train(tmp_path / "cached", image_folder, cache=str(cache), steps=6)
    replay = run_train(tmp_path / "replay", image_folder, cache=str(cache), teacher="random", steps=6)
    for a, b in zip(cached, replay):
        assert math.isfinite(a["loss"])
        assert 0.2 * cal["rel_rmse"] < b["replay_rel_rmse"] < 1.5 * cal["max_view_rel_rmse"]
        # smooth-L1 is 1-Lipschitz per element and LN-ed targets have RMS 1: |loss change| <= RMS(target change)
        assert a["loss"] == pytest.approx(b["loss"], rel=0, abs=b["replay_rel_rmse"])
