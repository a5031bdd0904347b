"""benchmarks/study.py's parity test (fidelity/paired.py, issue 18): each cached arm against fp16 at the same K
and pixels, paired seed by seed, checked against gaps worked out by hand; which arms the study trains (pcaR
with R >= the teacher's width skipped, fp16 references added, duplicates refused)."""
import pytest

from g2sd_cache.benchmarks.fidelity.arms import Arm, make_arms, summarise
from g2sd_cache.benchmarks.fidelity.paired import paired_gap, reference_key
from g2sd_cache.benchmarks.fidelity.report import table


def test_paired_gap_matches_hand_computed_values():
    # differences 0.0010, 0.0004, 0.0006: mean 0.002 / 3; squared deviations 1/9, 0.64/9, 0.04/9 (x 1e-6)
    # sum 1.68e-6 / 9 = 1.8667e-7, / 2 -> variance 9.3333e-8, std 3.0551e-4, SE 3.0551e-4 / sqrt 3 = 1.7638e-4
    g = paired_gap([0.0110, 0.0104, 0.0107], [0.0100, 0.0100, 0.0101], online_mean=0.01)
    assert g["seeds"] == 3
    assert g["mean"] == pytest.approx(6.6667e-4, rel=1e-4)
    assert g["std"] == pytest.approx(3.0551e-4, rel=1e-4)
    assert g["sem"] == pytest.approx(1.7638e-4, rel=1e-4)
    assert g["mean_pct"] == pytest.approx(6.6667, rel=1e-4) and g["sem_pct"] == pytest.approx(1.7638, rel=1e-4)
    assert g["resolved"] is False and g["parity"] is False          # SE 1.76 % of online: too few seeds to judge

    # differences 2, -1, 2, 1 (x 1e-5): mean 1e-5, deviations 1, -2, 1, 0 -> variance 6e-10 / 3, SE 7.0711e-6
    g = paired_gap([0.01002, 0.00999, 0.01002, 0.01001], [0.01, 0.01, 0.01, 0.01], online_mean=0.01)
    assert g["mean"] == pytest.approx(1e-5, rel=1e-6) and g["sem"] == pytest.approx(7.0711e-6, rel=1e-4)
    assert (g["resolved"], g["within_2se"], g["parity"]) == (True, True, True)    # 1e-5 <= 2 x 7.07e-6

    # differences 3, 2, 4 (x 1e-4): mean 3e-4, std 1e-4, SE 5.7735e-5 (0.58 % of online): resolved, 5.2 SE off
    g = paired_gap([0.0103, 0.0102, 0.0104], [0.01, 0.01, 0.01], online_mean=0.01)
    assert g["sem"] == pytest.approx(5.7735e-5, rel=1e-4)
    assert (g["resolved"], g["within_2se"], g["parity"]) == (True, False, False)

    # differences 4, 1, 2 (x 1e-4): mean 2.3333e-4, variance (2.7778 + 1.7778 + 0.1111) / 2 = 2.3333 (x 1e-8),
    # SE 8.8192e-5 (0.88 %): the mean is 2.65 SE from zero, outside 2 SE
    g = paired_gap([0.0104, 0.0101, 0.0102], [0.01, 0.01, 0.01], online_mean=0.01)
    assert g["sem"] == pytest.approx(8.8192e-5, rel=1e-4)
    assert (g["resolved"], g["within_2se"]) == (True, False)

    one = paired_gap([0.0103], [0.01], online_mean=0.01)
    assert one["mean"] == pytest.approx(3e-4) and one["sem"] is None and one["parity"] is None
    with pytest.raises(ValueError):
        paired_gap([0.01, 0.02], [0.01], online_mean=0.01)


def test_reference_is_fp16_at_the_same_k_and_pixels():
    assert reference_key("pca8", "jpeg", 4) == ("fp16", "jpeg", 4)
    assert reference_key("int8", "visible", 2) == ("fp16", "visible", 2)
    assert reference_key("fp16", "jpeg", 16) == ("fp16", "visible", 16)      # the pixel mode's own cost
    assert reference_key("fp16", "visible", 4) is None
    assert reference_key(None, None, None) is None                            # online


def _result(loss):
    return {"heldout_loss": loss, "heldout_cosine": 0.9, "train_loss": loss, "bytes_per_view": 100.0,
            "pixel_bytes_per_view": 50.0, "total_bytes_per_view": 200.0, "train_s": 1.0, "extract_s": 0.0}


def test_summarise_pairs_each_arm_with_its_reference_seed_by_seed():
    arms = [Arm("online", None, None), Arm("cached-k4", 4, "fp16"), Arm("int8-k4", 4, "int8"),
            Arm("fp16-jpeg-k4", 4, "fp16", "jpeg"), Arm("pca8-jpeg-k4", 4, "pca8", "jpeg")]
    losses = {"online": [0.0100, 0.0096], "cached-k4": [0.0104, 0.0094], "int8-k4": [0.0104, 0.0095],
              "fp16-jpeg-k4": [0.0105, 0.0094], "pca8-jpeg-k4": [0.0120, 0.0107]}
    rows = {r["name"]: r for r in summarise(arms, {k: [_result(v) for v in vs] for k, vs in losses.items()}, "t")}
    assert rows["online"]["reference"] is None and rows["online"]["gap_to_reference"] is None
    assert rows["cached-k4"]["reference"] is None
    assert rows["int8-k4"]["reference"] == "cached-k4"
    assert rows["fp16-jpeg-k4"]["reference"] == "cached-k4"
    assert rows["pca8-jpeg-k4"]["reference"] == "fp16-jpeg-k4"
    # pca8-jpeg-k4 - fp16-jpeg-k4: 0.0015, 0.0013 -> mean 0.0014, std 1.4142e-4, SE 1e-4; online's mean 0.0098
    g = rows["pca8-jpeg-k4"]["gap_to_reference"]
    assert g["mean"] == pytest.approx(0.0014) and g["sem"] == pytest.approx(1e-4, rel=1e-6)
    assert g["mean_pct"] == pytest.approx(14.2857, rel=1e-4) and g["sem_pct"] == pytest.approx(1.0204, rel=1e-4)
    assert g["resolved"] is False                                   # 1.02 % is not below 1 %
    # int8-k4 - cached-k4: 0, 0.0001 -> mean 5e-5, SE 5e-5; fp16-jpeg-k4 - cached-k4: 0.0001, 0
    assert rows["int8-k4"]["gap_to_reference"]["mean"] == pytest.approx(5e-5)
    assert rows["int8-k4"]["gap_to_reference"]["sem"] == pytest.approx(5e-5, rel=1e-6)
    assert rows["int8-k4"]["gap_to_reference"]["parity"] is True     # SE 0.51 % < 1 %, |gap| = 1 SE
    assert rows["fp16-jpeg-k4"]["gap_to_reference"]["mean"] == pytest.approx(5e-5)
    # the gap to online stays: pca8-jpeg-k4 - online = 0.0020, 0.0011
    assert rows["pca8-jpeg-k4"]["gap_to_online"]["mean"] == pytest.approx(0.00155)

    report = {"arms": list(rows.values()), "config": {
        "profile": "micro", "teacher": "t", "arch": "a", "student": "s", "train_images": 1, "heldout_images": 1,
        "steps": 1, "batch_size": 1, "epochs": 1, "seeds": [0, 1], "runtime_s": 1.0,
        "untrained_student": {"heldout_loss": {"mean": 1.0, "std": 0.0}, "heldout_cosine": {"mean": 0.0, "std": 0.0}}}}
    text = table(report)
    assert "| pca8-jpeg-k4 | fp16-jpeg-k4 | +0.001400 ± 0.000100 | +14.29 ± 1.02 % | no | no | unresolved |" in text
    assert "| int8-k4 | cached-k4 | +0.000050 ± 0.000050 | +0.51 ± 0.51 % | yes | yes | parity |" in text


def test_make_arms_skips_full_rank_pca_adds_references_and_trains_each_arm_once():
    said = []
    arms = make_arms([4], 4, ["fp16", "int8", "pca32", "pca31"], ("pca8:jpeg:4", "pca32:jpeg:4", "fp16:visible:4",
                                                                   "int8:jpeg:16"), width=32, say=said.append)
    names = [a.name for a in arms]
    assert names == ["online", "cached-k4", "int8-k4", "pca31-k4", "pca8-jpeg-k4", "int8-jpeg-k16",
                     "fp16-jpeg-k4", "fp16-jpeg-k16", "cached-k16"]
    assert sum("skipping" in line and "pca32" in line for line in said) == 2     # --codecs pca32 and --arms pca32:jpeg:4
    assert any("fp16:visible:4 is cached-k4" in line for line in said)
    assert any(line.startswith("adding cached-k16") for line in said)
    keys = [(a.codec, a.pixels, a.views) for a in arms[1:]]
    assert len(set(keys)) == len(keys)


def test_study_refuses_an_arm_given_twice_in_one_line(capsys):
    from g2sd_cache.benchmarks import study
    assert study.main(["--quick", "--arms", "int8:jpeg:2", "int8:jpeg:2"]) == 2
    assert capsys.readouterr().err.strip() == "error: --arms int8:jpeg:2 is given twice; give each arm once"
