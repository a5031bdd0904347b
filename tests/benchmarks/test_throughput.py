"""benchmarks/throughput.py stays runnable: `--quick` (micro presets) end to end in a subprocess, as a
user runs it, and its JSON carries every figure the README quotes (stage 2's included: the finetune section)
as a positive finite number."""
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from g2sd_cache.cache.codecs import CODECS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "throughput.py"

# Every figure the README's "What it costs" and "Performance" sections quote (storage: every codec there is).
KEYS = [
    "step.online_samples_per_s", "step.cached_samples_per_s", "step.speedup", "step.ideal_speedup",
    "step.efficiency", "step.student_gflop_per_sample", "step.teacher_gflop_per_sample",
    "data.image_only_samples_per_s", "data.cached_samples_per_s", "data.pixel_cache_speedup",
    "data.no_pixels_samples_per_s", "data.feed_cores_per_gpu.image", "data.feed_cores_per_gpu.cached",
    "data.feed_rate_samples_per_s", "data.assumed_gpu_tflops", "data.cached_gb_per_s", "data.memcpy_gb_per_s",
    # (the --quick teachers' targets are 32 wide: the ViT-B tiered presets cannot code them and are listed as skipped)
    *(f"storage.{codec}.{field}" for codec in [*(n for n, c in CODECS.items() if c.tiers is None), "pca64+lossless",
                                                "pca64+jpeg"]
      for field in ("bytes_per_view", "target_bytes_per_view", "pixel_bytes_per_view", "rel_rmse")),
    # issue 18's compact caches: the loader's rate on each, and the cores it needs at the ViT-T rate
    *(f"data.cached_samples_per_s_by_codec.{c}" for c in ("pca64", "pca64+lossless", "pca64+jpeg")),
    "extract.views_per_s", "extract.teacher_only_views_per_s",
    "finetune.storage.measured_bytes_per_sample", "finetune.storage.imagenet_bytes_per_sample",
    "finetune.extract.extract_samples_per_s", "finetune.extract.teacher_only_samples_per_s", "finetune.extract.ratio",
]
# Per (teacher, student) pair of the finetune section (stage 2): the README's "Stage 2" table.
FINETUNE_STEP_KEYS = ["teacher_s_per_sample", "online_s_per_sample", "cached_s_per_sample", "speedup",
                      "ideal_speedup", "efficiency"]


def _get(report: dict, dotted: str):
    """report["a"]["b"]... for "a.b...", where a number indexes a list ("finetune.step.0.speedup")."""
    value = report
    for part in dotted.split("."):
        if isinstance(value, list):
            assert part.isdigit() and int(part) < len(value), f"JSON lacks {dotted}"
            value = value[int(part)]
        else:
            assert isinstance(value, dict) and part in value, f"JSON lacks {dotted}"
            value = value[part]
    return value


@pytest.mark.slow
def test_throughput_quick_writes_every_figure(tmp_path):
    out, png = tmp_path / "throughput.json", tmp_path / "throughput.png"
    plot = ["--plot", str(png)] if importlib.util.find_spec("matplotlib") else []
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--json", str(out), *plot],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"benchmarks/throughput.py --quick failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())

    finetune_steps = report["finetune"]["step"]
    assert finetune_steps, "the finetune section timed no pair"
    for key in KEYS + [f"finetune.step.{i}.{k}" for i in range(len(finetune_steps)) for k in FINETUNE_STEP_KEYS]:
        value = _get(report, key)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} = {value!r}"
        assert math.isfinite(value) and value > 0, f"{key} = {value!r}"

    # on CPU the GPU's rate is an estimate, and says so
    assert report["data"]["feed_rate_is_estimate"] is True and "ESTIMATE" in report["data"]["feed_rate_basis"]
    assert "(estimate)" in proc.stdout
    gflop = report["step"]["gflop_per_sample"]
    assert 9 < gflop["mae_vit_small_patch16_dec256d4b"] < 13, gflop   # the default student, about 11 GFLOP
    assert report["storage"]["skipped"] == ["pca32+128+256", "pca16+64+128", "pca16+64+128+lossless",
                                            "pca32+128+256+jpeg"]
    visible = [n for n in report["storage"]["codecs"] if report["storage"][n]["pixels"] == "visible"]
    for codec in visible:   # pixels are stored by default, and are the same bytes in every codec
        assert report["storage"][codec]["pixel_bytes_per_view"] >= report["storage"][codec]["formula_pixel_bytes_per_view"]

    for p in finetune_steps:   # the ratios are those of the timings they are said to be
        assert p["speedup"] == pytest.approx(p["online_s_per_sample"] / p["cached_s_per_sample"])
        assert p["ideal_speedup"] == pytest.approx(1 + p["teacher_s_per_sample"] / p["cached_s_per_sample"])
        assert p["efficiency"] == pytest.approx(p["speedup"] / p["ideal_speedup"])
    assert report["finetune"]["storage"]["payload_bytes_per_sample"] == 22   # top-5 fp16 + uint16 classes + argmax
    assert report["finetune"]["storage"]["measured_bytes_per_sample"] > 22
    assert report["finetune"]["extract"]["samples"] == report["finetune"]["config"]["extract_images"]

    pairs = report["step"]["pairs"]
    assert pairs and pairs[0]["teacher"] == report["step"]["teacher"]
    assert pairs[0]["speedup"] == report["step"]["speedup"]
    for row in pairs[0]["rounds"]:   # every cell timed over several steps, impossible timings listed
        assert min(row["timed_steps"].values()) >= 3 and isinstance(row["below_lower_bound"], list), row
    assert pairs[0]["below_lower_bound"] == [b for row in pairs[0]["rounds"] for b in row["below_lower_bound"]]
    for field in ("cpu_model", "usable_cores", "torch"):
        assert report["machine"][field], field
    for section in ("## 1. Step", "## 2. Data", "## 3. Loss", "## 4. Storage", "## 5. Extract", "## 6. Finetune",
                    "## Targets"):
        assert section in proc.stdout, f"the printed report lacks {section!r}"
    assert all(r["status"] in ("PASS", "SHORT", "n/a") for r in report["targets"])
    assert [r for r in report["targets"] if r["what"].startswith("finetune step efficiency")], report["targets"]
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, says", [(["--students", "vit_nope"], "--students: unknown preset vit_nope"),
                                        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
                                        (["--device", "tpu"], "--device tpu: expected cpu, cuda or cuda:N")])
def test_bad_flags_say_what_is_wrong_in_one_line(tmp_path, args, says):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and says in proc.stderr, proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_without_matplotlib_says_how_to_get_it(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--plot", str(tmp_path / "p.png")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "pip install matplotlib" in proc.stderr


def test_a_step_cell_times_until_its_mean_is_stable_and_flags_impossible_timings():
    """time_cell keeps timing past its minimum while the step times scatter (here 10 / 30 ms alternating, then a
    steady 20 ms), stops once the standard error of the mean is within stable_rel, and says so; a cell that never
    settles stops at max_steps marked unstable. below_lower_bound flags an online step timed under the teacher
    plus the student alone (17.4 ms against 21.9 + 5 ms) and leaves a plausible one alone."""
    from g2sd_cache.benchmarks.common import profile_for
    from g2sd_cache.benchmarks.sections.step import below_lower_bound, time_cell
    prof = dataclasses.replace(profile_for(torch.device("cpu"), quick=True), steps=3, max_steps=40, stable_rel=0.035)
    durations = iter([0.010, 0.030] * 3 + [0.020] * 100)
    now = [0.0]

    def clock():
        return now[0]

    def step():
        now[0] += next(durations)
    cell = time_cell(step, prof, torch.device("cpu"), clock=clock)
    assert cell["stable"] and 3 < cell["timed_steps"] < 40 and cell["rel_sem"] <= 0.035, cell
    assert cell["s_per_step"] == pytest.approx(0.020, rel=0.1)
    noisy = iter([0.010, 0.030] * 100)
    cell = time_cell(lambda: now.__setitem__(0, now[0] + next(noisy)), prof, torch.device("cpu"), clock=clock)
    assert not cell["stable"] and cell["timed_steps"] == 40

    def c(ms, rel=0.01):
        return {"s_per_step": ms / 1e3, "rel_sem": rel}
    got = {("online", "T", "S"): c(17.4), ("cached", "S"): c(22.0), ("teacher", "T"): c(5.0), ("student", "S"): c(21.9)}
    flagged = below_lower_bound(got, "T", "S")
    assert [f["cell"] for f in flagged] == ["online T S"]
    assert flagged[0]["lower_bound_ms"] == pytest.approx(26.9)
    got[("online", "T", "S")] = c(27.5)
    assert below_lower_bound(got, "T", "S") == []
