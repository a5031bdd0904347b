"""`g2sd-cache verify` passes a sound cache and names what is wrong with a damaged one.

Caches come from the micro teacher at 64 px (tests/conftest.py); corruption is always done on a copy
of the shared `micro_cache`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.common.helpers import micro_extract_config
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.cache.schema import MANIFEST, SHARD_RECORD, decode_keys, folder_order
from g2sd_cache.verify.cache import format_summary, verify_cache
from tests.common.faults import copy_cache, rerecord, run_verify_cli, verify_main


# ----------------------------------------------------------------------------------------------
# verify on a sound cache

def test_verify_passes_on_a_sound_cache(micro_cache, image_folder):
    """verify exits 0 on a cache straight from extract, with a one-screen summary, including --data
    (keys, crop boxes, view regeneration) and --deep (stored targets within fp16's tolerance of the live teacher)."""
    report = verify_cache(str(micro_cache), deep=6, data=str(image_folder), device="cpu")
    assert report.ok, report.problems
    s = report.summary
    assert s["pairs"] == s["views"] == 24 and s["chunks"] > 0 and s["regenerated"] == 24
    assert s["pixel_views_checked"] == 24          # stored pixels == the rendered visible patches, every view
    assert s["deep"]["views"] == 6 and s["deep"]["worst_rel_rmse"] < 1e-3   # fp16 loses ~2e-4
    assert s["deep"]["from"] == "stored pixels"
    text = format_summary(report)
    assert len(text.splitlines()) <= 12 and "OK" in text


def test_verify_cli_exit_codes(micro_cache, tmp_path, capsys):
    """The command exits 0 with the summary on a sound cache (also as a real process), 1 with one line per
    problem on a broken one, and 2 with a one-line error, no traceback, for something that is not a cache."""
    rc, out = run_verify_cli(str(micro_cache))
    assert rc == 0 and "OK" in out, out
    broken = copy_cache(micro_cache, tmp_path / "c")
    (broken / "shard-00001" / "mask" / "zarr.json").unlink()
    assert verify_main([str(broken)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["shard-00001: file mask/zarr.json is missing", f"verify: 1 problem(s) in {broken}"]
    (tmp_path / "empty").mkdir()
    assert verify_main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "is not a g2sd-cache cache" in err and len(err.strip().splitlines()) == 1, err
    assert verify_main([str(micro_cache), "--deep", "2"]) == 0       # a pixel cache replays from its pixels
    assert "replayed from stored pixels" in capsys.readouterr().out


def test_verify_deep_catches_a_wrong_target(micro_cache, image_folder, tmp_path):
    """--deep fails a view whose stored target is not what the teacher computes for its stored crop and mask
    (here: one image's targets swapped with another's, with valid checksums), and names shard and key."""
    c = copy_cache(micro_cache, tmp_path / "c")
    group = zarr.open_group(c / "shard-00000", mode="r+")
    t = group["target"][...]
    t[:, [0, 1]] = t[:, [1, 0]]
    group["target"][...] = t
    rerecord(c, "shard-00000")
    report = verify_cache(str(c), deep=24, data=str(image_folder), device="cpu")
    assert len(report.problems) == 4, report.problems            # 2 images x 2 views
    assert all(p.startswith("shard-00000: view ") and "stored target differs from the live teacher" in p
               for p in report.problems)


@pytest.mark.parametrize("codec", ["bf16", "int8", "fp8", "int4"])
def test_verify_deep_passes_for_every_codec(image_folder, tmp_path, codec):
    """verify's per-codec tolerances hold for what each codec really loses: a fresh cache in bf16, int8, fp8 or
    int4 passes --deep (and the chunk and scale checks), with a margin of at least 2x."""
    out = tmp_path / "c"
    run_extract(micro_extract_config(image_folder, out, codec=codec))
    report = verify_cache(str(out), deep=8, data=str(image_folder), device="cpu")
    assert report.ok, report.problems
    deep = report.summary["deep"]
    assert deep["compute_allowance"] == 0 and deep["precision"] == "fp32" and deep["worst_rel_rmse"] * 2 < deep["tolerance"], deep


def test_verify_reports_nonfinite_targets(micro_cache, tmp_path):
    """verify reports stored targets that are NaN or Inf even when their checksums hold (a writer bug)."""
    c = copy_cache(micro_cache, tmp_path / "c")
    group = zarr.open_group(c / "shard-00002", mode="r+")
    t = group["target"][...]
    t[1, 3, 5, 7] = np.inf
    group["target"][...] = t
    rerecord(c, "shard-00002")
    assert verify_cache(str(c)).problems == [
        "shard-00002: target/c/1/0/0/0: inner chunk 1 (view 1, rows 2..3) holds NaN or Inf targets"]


def test_verify_catches_manifest_and_listing_faults(micro_cache, tmp_path):
    """verify reports a shard duplicated under another name (listed or not), a listed shard whose folder is
    gone, a leftover temporary folder, a file whose size differs from the record, and miscounted views."""
    c = copy_cache(micro_cache, tmp_path / "c")
    shutil.copytree(c / "shard-00000", c / "shard-00003")                 # unlisted extra shard
    report = verify_cache(str(c))
    assert report.problems == ["shard-00003: folder on disk is not listed in the manifest (a shard from another run?)"]

    m = json.loads((c / MANIFEST).read_text())                           # now list it: images twice
    m["shards"].append(dict(m["shards"][0], name="shard-00003"))
    (c / MANIFEST).write_text(json.dumps(m))
    (c / "shard-00003" / SHARD_RECORD).write_text(
        json.dumps(dict(json.loads((c / "shard-00000" / SHARD_RECORD).read_text()), index=3)))
    problems = verify_cache(str(c)).problems
    first = decode_keys(zarr.open_group(c / "shard-00000", mode="r")["key"][0, :1])[0]   # row 0 of shard 0
    index = int(folder_order(0, 12)[0])
    assert any(f"shard-00003: image {index} ({first}) is also in shard-00000" in p for p in problems), problems
    assert any(p.startswith("manifest.json: shards hold 16 images") for p in problems), problems

    shutil.rmtree(c / "shard-00003")
    shutil.rmtree(c / "shard-00002")
    (c / ".shard-00002.tmp-host-123").mkdir()
    with open(c / "shard-00001" / "crop" / "zarr.json", "a") as f:
        f.write(" ")
    problems = verify_cache(str(c)).problems
    for want in ("shard-00002: leftover temporary folder .shard-00002.tmp-host-123",
                 "shard-00002: listed in the manifest but its folder is missing",
                 "shard-00003: listed in the manifest but its folder is missing",
                 "shard-00001: file crop/zarr.json has"):
        assert any(p.startswith(want) for p in problems), (want, problems)


def _swap_rows(cache: Path, shard: str, a: int, b: int) -> None:
    """Swap two images (every view) of a shard in source_index and key, consistently, and re-record sizes."""
    g = zarr.open_group(cache / shard, mode="r+")
    for name in ("source_index", "key"):
        x = g[name][...]
        x[:, [a, b]] = x[:, [b, a]]
        g[name][...] = x
    rerecord(cache, shard)


def test_verify_checks_folder_shards_follow_the_seeded_order(micro_cache, image_folder, tmp_path):
    """A folder shard's rows are its run [start, stop) of the listing shuffled with the extract seed, in that
    order."""
    c = copy_cache(micro_cache, tmp_path / "c")
    _swap_rows(c, "shard-00001", 0, 1)
    assert verify_cache(str(c)).problems == [
        "shard-00001: rows are not in the order of the listing shuffled with seed 0"]


def test_verify_reports_a_damaged_manifest(micro_cache, tmp_path, capsys):
    """verify reports a truncated manifest.json, or one that lacks a field, as one problem line (exit 1)."""
    c = copy_cache(micro_cache, tmp_path / "c")
    text = (c / MANIFEST).read_text()
    (c / MANIFEST).write_text(text[: len(text) // 2])
    assert verify_main([str(c)]) == 1
    assert capsys.readouterr().out.startswith("manifest.json: does not parse")
    data = json.loads(text)
    del data["shards"]
    (c / MANIFEST).write_text(json.dumps(data))
    assert verify_cache(str(c)).problems == ["manifest.json: lacks shards; the cache cannot be checked further"]


def test_verify_catches_bad_masks_and_crops(micro_cache, image_folder, tmp_path):
    """verify reports a mask that does not keep the manifest's visible count and, with --data, a crop box
    outside its image and a stored view that the sampler does not regenerate (checksums all valid)."""
    c = copy_cache(micro_cache, tmp_path / "c")
    g = zarr.open_group(c / "shard-00001", mode="r+")
    mask = g["mask"][...]
    mask[1, 2, :] = False                                   # view 1 of row 2: every patch visible
    g["mask"][...] = mask
    crop = g["crop"][...]
    crop[0, 0] = [0, 0, 10_000, 50]                         # taller than any image
    crop[0, 1, 3] -= 1                                      # a valid box, but not the sampled one
    g["crop"][...] = crop
    rerecord(c, "shard-00001")
    rows = decode_keys(g["key"][0])                         # the shard's images, row by row
    assert verify_cache(str(c)).problems == [
        f"shard-00001: 1 mask(s) do not keep 4 of 16 patches visible, e.g. view 1 of row 2 ({rows[2]}) keeps 16"]
    problems = verify_cache(str(c), data=str(image_folder)).problems
    assert sum("does not lie inside" in p and f"view 0 of {rows[0]}" in p for p in problems) == 1, problems
    assert any(f"view 0 of {rows[1]}: stored crop is not the view" in p for p in problems), problems
    assert any(f"view 1 of {rows[2]}: stored mask is not the view" in p for p in problems), problems
