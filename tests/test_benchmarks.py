"""benchmarks/throughput.py stays runnable: `--quick` (micro presets) end to end in a subprocess, as a
user runs it, and its JSON carries every headline figure as a positive finite number."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"

KEYS = [
    "step.online_samples_per_s", "step.cached_samples_per_s", "step.speedup", "step.ideal_speedup",
    "step.efficiency",
    "data.image_only_samples_per_s", "data.cached_samples_per_s", "data.target_read_gb_per_s",
    "data.memcpy_gb_per_s",
    *(f"storage.{codec}.{field}" for codec in ("fp16", "bf16", "int8", "fp8")
      for field in ("bytes_per_view", "rel_rmse")),
    "extract.views_per_s", "extract.teacher_only_views_per_s",
]


def _get(report: dict, dotted: str):
    value = report
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"JSON lacks {dotted}"
        value = value[part]
    return value


@pytest.mark.slow
def test_throughput_quick_writes_every_figure(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"throughput.py --quick failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())

    for key in KEYS:
        value = _get(report, key)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} = {value!r}"
        assert math.isfinite(value) and value > 0, f"{key} = {value!r}"

    pairs = report["step"]["pairs"]
    assert pairs and pairs[0]["teacher"] == report["step"]["teacher"]
    assert pairs[0]["speedup"] == report["step"]["speedup"]
    for field in ("cpu_model", "usable_cores", "torch"):
        assert report["machine"][field], field
    for section in ("## 1. Step", "## 2. Data", "## 3. Loss", "## 4. Storage", "## 5. Extract", "## Targets"):
        assert section in proc.stdout, f"the printed report lacks {section!r}"
    assert all(r["status"] in ("PASS", "SHORT", "n/a") for r in report["targets"])


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_plot_without_matplotlib_says_how_to_get_it(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--plot", str(tmp_path / "p.png")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "pip install matplotlib" in proc.stderr
