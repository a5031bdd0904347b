"""benchmarks/study.py (issue 13) runs end to end in its quick profile: every arm (online, cached K, every codec of
CODECS) is extracted and trained through the product, evaluated on held-out views, and reported in the --json
schema of the issue."""
import json
import math
from pathlib import Path

import pytest

from g2sd_cache.cache.codecs import CODECS
from g2sd_cache.cache.lowrank import parse_rank

ROOT = Path(__file__).resolve().parents[2]
ARM_KEYS = {"name", "views", "codec", "bytes_per_view", "heldout_loss", "heldout_cosine", "train_loss",
            "gap_to_online", "gap_sem", "heldout_loss_per_seed", "pixels", "teacher", "pixel_bytes_per_view", "total_bytes_per_view",
            "reference", "gap_to_reference"}
WIDTH = 32   # the micro teacher's decoder width: pcaR with R >= 32 is skipped


def _study():
    from g2sd_cache.benchmarks import study
    return study


def _trained(name: str) -> bool:
    """Whether the quick study trains codec `name` at its width: pcaR below the width, pcaA+B+C within it."""
    if CODECS[name].tiers is not None:
        return sum(CODECS[name].tiers) <= WIDTH
    return (parse_rank(name) or 0) < WIDTH


@pytest.mark.slow
def test_quick_study_trains_every_arm_and_reports_the_issue_schema(tmp_path, capsys):
    study = _study()
    out = tmp_path / "study.json"
    assert study.main(["--quick", "--device", "cpu", "--workdir", str(tmp_path / "work"), "--json", str(out),
                       "--arms", "int8:jpeg:2", "pca8:jpeg:2"]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"arms", "config"}
    arms = {a["name"]: a for a in report["arms"]}
    k = report["config"]["codec_views"]
    # online, cached K for the profile's K, every codec at K (the default codec at K is cached-kK itself; pcaR
    # with R >= the teacher's width is skipped, and so is a tiered pcaA+B+C keeping more than the width)
    codec_arms = [c for c in CODECS if c != study.DEFAULT_CODEC and _trained(c)]
    expected = {"online", *(f"cached-k{v}" for v in report["config"]["views"]),
                *(f"{c}-k{k}" for c in codec_arms), "int8-jpeg-k2", "pca8-jpeg-k2", "fp16-jpeg-k2"}
    assert set(arms) == expected and len(arms) == len(report["arms"])

    seeds = report["config"]["seeds"]
    assert len(seeds) >= 2
    init = report["config"]["untrained_student"]["heldout_loss"]["mean"]
    for a in report["arms"]:
        assert set(a) == ARM_KEYS, a["name"]
        for metric in ("heldout_loss", "heldout_cosine", "train_loss", "gap_to_online"):
            assert set(a[metric]) == {"mean", "std"} and all(math.isfinite(v) for v in a[metric].values()), a
        assert -1 <= a["heldout_cosine"]["mean"] <= 1
        # every arm learned something in its few steps: below the untrained student on images it never saw
        assert 0 < a["heldout_loss"]["mean"] < init, a["name"]
        gap = a["heldout_loss"]["mean"] - arms["online"]["heldout_loss"]["mean"]
        assert a["gap_to_online"]["mean"] == pytest.approx(gap, abs=1e-9)
    assert arms["online"]["views"] is None and arms["online"]["bytes_per_view"] is None
    assert arms["online"]["gap_to_online"] == {"mean": 0.0, "std": 0.0}
    assert {a["teacher"] for a in report["arms"]} == {"random"}
    # the extra jpeg arm: the same int8 targets as int8-k2, its pixels stored in far fewer bytes than exact ones
    jpeg, exact = arms["int8-jpeg-k2"], arms["int8-k2"]
    # each judged against fp16 at its K and pixels, paired seed by seed; fp16 with jpeg pixels against exact ones
    assert (jpeg["reference"], exact["reference"], arms["fp16-jpeg-k2"]["reference"], arms["pca8-jpeg-k2"]["reference"]) \
        == ("fp16-jpeg-k2", "cached-k2", "cached-k2", "fp16-jpeg-k2")
    for a, ref in ((jpeg, arms["fp16-jpeg-k2"]), (arms["fp16-jpeg-k2"], arms["cached-k2"])):
        diffs = [x - y for x, y in zip(a["heldout_loss_per_seed"], ref["heldout_loss_per_seed"])]
        assert a["gap_to_reference"]["mean"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-12)
        assert a["gap_to_reference"]["seeds"] == len(seeds)
    assert arms["online"]["gap_to_reference"] is None and arms["cached-k2"]["gap_to_reference"] is None
    assert jpeg["pixels"] == "jpeg" and exact["pixels"] == "visible" and jpeg["codec"] == "int8"
    assert jpeg["bytes_per_view"] == pytest.approx(exact["bytes_per_view"], rel=0.01)
    assert exact["pixel_bytes_per_view"] >= 4 * 16 * 16 * 3 and jpeg["pixel_bytes_per_view"] < 0.8 * exact["pixel_bytes_per_view"]
    assert jpeg["total_bytes_per_view"] > jpeg["bytes_per_view"] + jpeg["pixel_bytes_per_view"]

    # bytes per view: the stored codes (and scales) of [T, D] targets
    tokens = (report["config"]["img_size"] // 16) ** 2 + 1
    width = WIDTH
    fp16 = arms["cached-k1"]["bytes_per_view"]
    assert fp16 == pytest.approx(tokens * width * 2, rel=0.05)
    assert arms[f"int8-k{k}"]["bytes_per_view"] == pytest.approx(tokens * width + 4 * tokens, rel=0.05)
    for name, codec in CODECS.items():   # a new codec (int4) is compared without changes here
        if not _trained(name):
            assert f"{name}-k{k}" not in arms
            continue
        arm = arms[f"cached-k{k}" if name == study.DEFAULT_CODEC else f"{name}-k{k}"]
        assert arm["codec"] == name and arm["views"] == k and 0 < arm["bytes_per_view"] <= fp16 * 1.01

    captured = capsys.readouterr()
    printed = captured.out
    assert "| arm | reference | gap to reference |" in printed
    assert "skipping --codecs pca32" in captured.err
    assert "skipping --codecs pca32+128+256: it keeps 416 coefficients per token" in captured.err
    assert "| arm | K | codec |" in printed and all(f"| {name} |" in printed for name in arms)
    # each arm trained the same number of steps through `g2sd-cache train`: its log says so
    logs = tmp_path / "work" / "logs"
    steps = report["config"]["steps"]
    for name in arms:
        for seed in seeds:
            assert f"finished at step {steps}/{steps}" in (logs / f"{name}-seed{seed}.log").read_text()


def test_study_refuses_bad_options_in_one_line(capsys):
    study = _study()
    assert study.main(["--quick", "--seeds", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --seeds must be at least 1"
    assert study.main(["--quick", "--student", "mae_vit_small_patch16_dec256d4b", "--arch", "mae_vit_huge_patch14"]) == 2
    assert "patch size" in capsys.readouterr().err
