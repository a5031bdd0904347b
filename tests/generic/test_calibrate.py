"""Extract's calibration (generic/calibrate.py): `--codec auto --max-error E` picks the fewest bytes within E on
targets whose spectrum is known; the low-rank basis is a pure function of (seed, calibration sample), stored
exactly, recorded in the manifest, shown by inspect, and reused by a resumed extract."""
import json
import shutil

import numpy as np
import pytest
import torch

from tests.cache.test_lowrank import _low_rank
from tests.common.helpers import micro_extract_config
from g2sd_cache.cache import lowrank
from g2sd_cache.cache.inspect import format_calibration, format_report, inspect_report
from g2sd_cache.cache.reader import open_cache
from g2sd_cache.cache.schema import BASIS_FILE, CALIBRATION_FILE, MANIFEST
from g2sd_cache.cli.main import main as cli_main
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.calibrate import calibrate
from g2sd_cache.generic.extract import run_extract


@pytest.mark.parametrize("true_rank,expected", [(16, "pca32"), (40, "pca64"), (100, "pca128")])
def test_auto_picks_the_smallest_rank_that_holds_the_spectrum(true_rank, expected):
    """D = 256, exactly `true_rank` dimensions plus noise 1e-4: below that rank the truncation error is tens of
    per cent, at or above it only int8 rounding of the coefficients (~0.3 %) remains. int4 (~12 %) and every
    dense codec cost more bytes than pca128 (17 x 130 B per view)."""
    x = _low_rank(32, 17, 256, true_rank, noise=1e-4)
    cal = calibrate(x, "auto", 0.02)
    errs = cal.record["errors"]
    assert cal.codec == expected, {k: round(v["rel_rmse"], 4) for k, v in errs.items()}
    assert errs[expected]["rel_rmse"] < 0.01
    assert errs[expected]["target_bytes_per_view"] == 17 * (int(expected[3:]) + 2)
    assert cal.record["views"] == 32 and cal.record["fit_views"] == 24 and cal.record["heldout_views"] == 8
    assert cal.basis.shape == (int(expected[3:]) + 1, 256)
    assert torch.equal(lowrank.load_basis(cal.basis_raw), cal.basis)
    assert cal.record["basis"]["sha256"] == lowrank.basis_digest(cal.basis_raw)


def test_auto_picks_a_dense_codec_when_no_rank_is_enough_and_refuses_an_impossible_bound():
    x = torch.nn.functional.layer_norm(torch.randn(16, 9, 256, generator=torch.Generator().manual_seed(0)), (256,))
    cal = calibrate(x, "auto", 0.02)          # isotropic: no low rank is near; int8 (~0.5 %) is the cheapest
    assert cal.codec == "int8" and cal.basis is None and cal.record["basis"] is None
    assert calibrate(x, "auto", 0.2).codec == "int4"
    with pytest.raises(UserError, match="no codec is that close"):
        calibrate(x, "auto", 1e-7)


def test_pca_extract_stores_a_deterministic_basis_and_records_it(image_folder, tmp_path, capsys):
    a, b, other = tmp_path / "a", tmp_path / "b", tmp_path / "other"
    run_extract(micro_extract_config(image_folder, a, codec="pca8"))
    run_extract(micro_extract_config(image_folder, b, codec="pca8"))
    run_extract(micro_extract_config(image_folder, other, codec="pca8", seed=1))
    raw = (a / BASIS_FILE).read_bytes()
    assert raw == (b / BASIS_FILE).read_bytes() != (other / BASIS_FILE).read_bytes()
    m = json.loads((a / MANIFEST).read_text())
    assert m["codec"] == "pca8" and m["basis"] == {"file": BASIS_FILE, "sha256": lowrank.basis_digest(raw),
                                                   "shape": [9, 32]}
    cal = m["calibration"]
    assert cal["chosen"] == "pca8" and cal["views"] == 24 and set(cal["errors"]) == {"pca8"}
    assert json.loads((a / CALIBRATION_FILE).read_text()) == cal
    cache = open_cache(a)
    assert torch.equal(cache.basis, torch.from_numpy(np.load(a / BASIS_FILE)))
    basis = cache.basis.double()
    torch.testing.assert_close(basis[1:] @ basis[1:].T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-5)
    # the stored targets lie in the basis' span, about its centre
    t = cache[0].target.double() - basis[0]
    torch.testing.assert_close((t @ basis[1:].T) @ basis[1:], t, rtol=0, atol=1e-4)
    assert "pca8" in m["codec_error"]
    text = format_report(inspect_report(str(a)))
    assert "basis.npy float32 [9, 32]" in text and "<- chosen" in text and "calibration: 24 views" in text


def test_a_tiered_extract_writes_the_same_codes_twice_and_its_basis_has_every_direction(image_folder, tmp_path):
    """pca2+8+16 dithers its 4- and 2-bit tiers by (seed, image, view): two extracts of the same images write the
    same codes, so a resumed extract's shards match its first ones."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_extract(micro_extract_config(image_folder, a, codec="pca2+8+16"))
    run_extract(micro_extract_config(image_folder, b, codec="pca2+8+16"))
    m = json.loads((a / MANIFEST).read_text())
    assert m["codec"] == "pca2+8+16" and m["basis"]["shape"] == [27, 32]     # centre + 2 + 8 + 16 directions
    ca, cb = open_cache(a), open_cache(b)
    first = ca.read_block(0, 0, 0, ca.shard_images[0])
    assert np.array(first.codes).shape[1:] == (17, 2 + 4 + 4) and np.array(first.scale).shape[1:] == (17, 3)
    for i in range(len(ca)):
        assert torch.equal(ca[i].target, cb[i].target), i


def test_auto_extract_and_resume_reuse_the_calibration(image_folder, tmp_path, capsys):
    out = tmp_path / "c"
    cfg = micro_extract_config(image_folder, out, codec="auto", max_error=0.05)
    run_extract(cfg)
    printed = capsys.readouterr().out
    assert "<- chosen" in printed and "--max-error 0.05" in printed
    m = json.loads((out / MANIFEST).read_text())
    # D = 32: pca32 is the full width in a rotated basis, int8 codes + a float16 scale: the fewest bytes within 5 %
    assert m["codec"] == m["calibration"]["chosen"] == "pca32" and m["calibration"]["max_error"] == 0.05
    assert set(m["calibration"]["errors"]) >= {"fp16", "int8", "int4", "pca32"}
    before = {p: (out / p).read_bytes() for p in (BASIS_FILE, CALIBRATION_FILE)}
    mtime = (out / BASIS_FILE).stat().st_mtime_ns
    # an interrupted run: the manifest and the last shard never written; the rerun keeps the calibration
    (out / MANIFEST).unlink()
    shutil.rmtree(out / "shard-00002")
    run_extract(cfg)
    assert (out / BASIS_FILE).stat().st_mtime_ns == mtime
    assert {p: (out / p).read_bytes() for p in before} == before
    assert json.loads((out / MANIFEST).read_text())["shards"] == m["shards"]
    # a basis altered between the runs is refused, not silently refitted
    (out / MANIFEST).unlink()
    raw = bytearray((out / BASIS_FILE).read_bytes())
    raw[-2] ^= 1
    (out / BASIS_FILE).write_bytes(bytes(raw))
    with pytest.raises(UserError, match="not the basis the manifest holds"):
        run_extract(cfg)


def test_codec_flags_are_checked_in_one_line(image_folder, tmp_path, capsys):
    base = ["extract", "--data", str(image_folder), "--out", str(tmp_path / "x"), "--teacher", "random", "--arch", "test_mae_micro_patch16",
            "--img-size", "64", "--workers", "0", "--device", "cpu"]
    for extra, needle in [(["--codec", "auto"], "--max-error"), (["--max-error", "0.1"], "--max-error"),
                          (["--codec", "auto", "--max-error", "2"], "in (0, 1)"), (["--codec", "pcaq"], "unknown codec"),
                          (["--codec", "pca8", "--calibration-views", "1"], "at least 2"),
                          # tiered codes: 8 + 16 + 16 = 40 coefficients of the micro teacher's 32; an odd 4-bit count
                          (["--codec", "pca8+16+16"], "at most 32"), (["--codec", "pca8+3"], "must be even")]:
        assert cli_main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    with pytest.raises(UserError, match="max_error"):   # a rerun with another bound is another configuration
        run_extract(micro_extract_config(image_folder, tmp_path / "y", codec="auto", max_error=0.05, shard_size=24))
        run_extract(micro_extract_config(image_folder, tmp_path / "y", codec="auto", max_error=0.1, shard_size=24))


def test_a_cache_begun_before_the_calibration_flags_still_resumes(image_folder, tmp_path):
    """config.yaml of an extract begun by an older g2sd-cache has no max_error / calibration_views: their defaults
    then, not another configuration."""
    import yaml
    out = tmp_path / "c"
    cfg = micro_extract_config(image_folder, out, shard_size=24)
    run_extract(cfg)
    (out / MANIFEST).unlink()
    old = yaml.safe_load((out / "config.yaml").read_text())
    for k in ("max_error", "calibration_views"):
        old.pop(k)
    (out / "config.yaml").write_text(yaml.safe_dump(old))
    run_extract(cfg)
    assert (out / MANIFEST).is_file()


def test_calibration_records_what_each_low_rank_code_truncates():
    """The calibration table carries each low-rank codec's truncation (exact coefficients, held-out views), the
    part of its error a student could learn: on exactly 12-dimensional tokens pca8 drops a third of the
    dimensions, pca4+8+8 (20 directions, most in 4 and 2 bits) none: its error is rounding noise alone."""
    x = _low_rank(32, 17, 64, 12, noise=1e-4)
    errs = {name: calibrate(x, name, None).record["errors"][name] for name in ("pca8", "pca4+8+8")}
    # an independent truncation: the held-out quarter projected on the top-8 right singular vectors of the rest
    fit, test = x[:24].reshape(-1, 64).double().numpy(), x[24:].reshape(-1, 64).double().numpy()
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    c = test - mean
    ref = np.linalg.norm(c - c @ vt[:8].T @ vt[:8]) / np.linalg.norm(test)
    assert errs["pca8"]["truncation_rel_rmse"] == pytest.approx(ref, rel=1e-4)
    assert errs["pca8"]["truncation_rel_rmse"] > 0.2
    assert errs["pca4+8+8"]["truncation_rel_rmse"] < 1e-3 < errs["pca4+8+8"]["rel_rmse"]
    assert "int8" not in errs and "truncation_rel_rmse" not in calibrate(x, "int8", None).record["errors"]["int8"]
    text = format_calibration(calibrate(x, "pca4+8+8", None).record)
    assert "truncation" in text.splitlines()[1] and "pca4+8+8" in text
