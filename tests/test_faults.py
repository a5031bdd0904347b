"""The fault-injection suite: each test breaks one thing and checks the README promise its docstring names.

Caches come from the micro teacher at 64 px (tests/conftest.py), so every extract takes about a second;
corruption is always done on a copy of the shared `micro_cache`. "Exactly-once, resumable training" is
covered by tests/test_train.py.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from helpers import MICRO_STUDENT, MICRO_TEACHER, micro_extract_config
from g2sd_cache import open_cache
from g2sd_cache.errors import CacheCorruptError, UserError
from g2sd_cache.digests import local_reader, record_digest, shard_digests
from g2sd_cache.extract import run_extract
from g2sd_cache.models import STUDENT_PRESETS, ViTShape, build_teacher
from g2sd_cache.schema import MANIFEST, SHARD_RECORD, TMP_MARK, Manifest, decode_keys, encode_keys, folder_order
from g2sd_cache.sources import FolderSource
from g2sd_cache.synthetic import jpeg_bytes, make_image_folder, make_tar_shards, synthetic_image
from g2sd_cache.train import TrainConfig, train
from g2sd_cache.cli import main as cli_main
from g2sd_cache.verify import format_summary, verify_cache
from g2sd_cache.zarr_layout import MAX_UINT_64, parse_layout, read_shard_index
from g2sd_cache.views import ViewGeometry, sample_view

ARRAYS = ("target", "mask", "crop", "flip", "source_index", "key")


# ----------------------------------------------------------------------------------------------
# helpers

def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_file(cache: Path, shard: str, array: str, view: int = 0) -> Path:
    """The zarr shard file holding view `view` of `array` in cache shard `shard`."""
    meta = json.loads((cache / shard / array / "zarr.json").read_text())
    rest = len(meta["shape"]) - 2
    return cache / shard / array / "/".join(["c", str(view), "0", *["0"] * rest])


def chunk_span(path: Path, array_dir: Path, j: int) -> tuple[int, int]:
    """(offset, nbytes) of inner chunk j in a shard file, from its sharding index."""
    layout = parse_layout(json.loads((array_dir / "zarr.json").read_text()))
    index = read_shard_index(path.read_bytes(), int(np.prod(layout.chunks_per_shard)))
    off, nbytes = index[j].tolist()
    return off, nbytes


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def shard_arrays(cache: Path, shard: str) -> dict[str, np.ndarray]:
    names = [*ARRAYS, *(["scale"] if (cache / shard / "scale").is_dir() else [])]
    return {name: np.asarray(zarr.open_array(cache / shard / name, mode="r")[...]) for name in names}


def assert_caches_equal(a: Path, b: Path) -> None:
    """Same shards, same files, every array equal bit for bit, same records, same manifest (but its date)."""
    shards_a = sorted(p.name for p in a.glob("shard-*"))
    assert shards_a == sorted(p.name for p in b.glob("shard-*"))
    for shard in shards_a:
        assert json.loads((a / shard / SHARD_RECORD).read_text()) == json.loads((b / shard / SHARD_RECORD).read_text())
        x, y = shard_arrays(a, shard), shard_arrays(b, shard)
        assert sorted(x) == sorted(y)
        for name in x:
            assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), f"{shard}/{name} differs"
    ma, mb = (json.loads((c / MANIFEST).read_text()) for c in (a, b))
    ma.pop("created"), mb.pop("created")
    assert ma == mb


def assert_complete_shards_sound(out: Path) -> None:
    """Every folder under a final shard name is complete: its record exists and its files are as recorded."""
    for folder in out.glob("shard-*"):
        record = folder / SHARD_RECORD
        assert record.is_file(), f"{folder.name} exists under its final name but has no {SHARD_RECORD}"
        for rel, size in json.loads(record.read_text())["files"].items():
            assert (folder / rel).stat().st_size == size, f"{folder.name}/{rel} is not as recorded"


def view_index(cache, shard: int, view: int, row: int) -> int:
    """Global index of (shard, view, row) in the reader's documented order: shard by shard, view-major."""
    i = sum(cache.shard_images[:shard]) * cache.views_per_image + view * cache.shard_images[shard] + row
    assert cache.locate(i) == (shard, view, row)
    return i


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


def micro_train_config(data, cache, out, **overrides) -> TrainConfig:
    base = dict(data=str(data), out=str(out), cache=str(cache), student=MICRO_STUDENT, workers=0, device="cpu",
                steps=3, batch_size=4, log_every=1, save_every=1000, warmup_steps=1)
    base.update(overrides)
    return TrainConfig(**base)


def verify_main(argv: list[str]) -> int:
    """`g2sd-cache verify ARGV...` in this process: its exit status."""
    return cli_main(["verify", *argv])


def run_verify_cli(*argv: str) -> tuple[int, str]:
    """`g2sd-cache verify ...` through the command line, in a subprocess (exit code, stdout+stderr)."""
    proc = subprocess.run([sys.executable, "-m", "g2sd_cache.cli", "verify", *argv], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


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
    _rerecord(c, "shard-00000")
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
    assert not deep["bf16_allowance"] and deep["worst_rel_rmse"] * 2 < deep["tolerance"], deep


def test_verify_reports_nonfinite_targets(micro_cache, tmp_path):
    """verify reports stored targets that are NaN or Inf even when their checksums hold (a writer bug)."""
    c = copy_cache(micro_cache, tmp_path / "c")
    group = zarr.open_group(c / "shard-00002", mode="r+")
    t = group["target"][...]
    t[1, 3, 5, 7] = np.inf
    group["target"][...] = t
    _rerecord(c, "shard-00002")
    assert verify_cache(str(c)).problems == [
        "shard-00002: target/c/1/0/0/0: inner chunk 1 (view 1, rows 2..3) holds NaN or Inf targets"]


def _rerecord(cache: Path, shard: str) -> None:
    """After a deliberate rewrite, update the recorded file sizes and digests, and the manifest's digest of the
    record (so only content checks can notice)."""
    folder = cache / shard
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SHARD_RECORD}
    rec = json.loads((folder / SHARD_RECORD).read_text())
    rec["files"] = files
    rec["digests"] = shard_digests(files, lambda rel: (folder / rel).read_bytes(),
                                   lambda rel: local_reader(str(folder / rel)))
    raw = json.dumps(rec)
    (folder / SHARD_RECORD).write_text(raw)
    m = json.loads((cache / MANIFEST).read_text())
    for e in m["shards"]:
        if e["name"] == shard:
            e["files"], e["record"] = files, record_digest(raw.encode())
    (cache / MANIFEST).write_text(json.dumps(m))


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
    _rerecord(cache, shard)


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
    _rerecord(c, "shard-00001")
    rows = decode_keys(g["key"][0])                         # the shard's images, row by row
    assert verify_cache(str(c)).problems == [
        f"shard-00001: 1 mask(s) do not keep 4 of 16 patches visible, e.g. view 1 of row 2 ({rows[2]}) keeps 16"]
    problems = verify_cache(str(c), data=str(image_folder)).problems
    assert sum("does not lie inside" in p and f"view 0 of {rows[0]}" in p for p in problems) == 1, problems
    assert any(f"view 0 of {rows[1]}: stored crop is not the view" in p for p in problems), problems
    assert any(f"view 1 of {rows[2]}: stored mask is not the view" in p for p in problems), problems


# ----------------------------------------------------------------------------------------------
# 1. kill -9 during extract

@pytest.mark.slow
def test_kill9_during_extract_then_rerun_equals_uninterrupted(tmp_path):
    """Nothing half-written looks complete: `kill -9` of extract at a random moment (twice: at a random point of a fresh run, then in the
    resumed run soon after it writes its first shard), then a rerun of the same command: the cache equals an
    uninterrupted run's array by array, every folder under a final shard name is complete after each kill,
    and verify passes."""
    images = make_image_folder(tmp_path / "img", 24, seed=3, classes=2)
    cfg = dict(views=2, shard_size=4, chunk_views=2, batch_size=4)       # 2 images per shard: 12 shards
    ref = tmp_path / "ref"
    run_extract(micro_extract_config(images, ref, **cfg))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "g2sd_cache.cli", "extract", "--data", str(images), "--out", str(out),
            "--teacher", "random", "--arch", MICRO_TEACHER, "--img-size", "64", "--views", "2", "--shard-size", "4",
            "--chunk-views", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    log = []
    # kill 0: at a random moment of the run (extraction spans ~3 s after the first shard here);
    # kill 1: in the resumed run, shortly after it starts writing shards of its own
    for attempt, max_delay in enumerate([3.0, 1.0]):
        before = set(os.listdir(out)) if out.is_dir() else set()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 120:
            if out.is_dir() and any(n.startswith((".shard-", "shard-")) for n in set(os.listdir(out)) - before):
                break
            time.sleep(0.005)
        delay = rng.uniform(0, max_delay)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        state = sorted(os.listdir(out)) if out.is_dir() else []
        log.append(f"kill {attempt}: {delay:.3f} s after its first shard, finished before the kill: {finished}, "
                   f"left: {state}")
        if out.is_dir():
            assert_complete_shards_sound(out)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    print("\n".join(log))
    assert done.returncode == 0, (done.stderr[-2000:], log, f"seed {seed}")
    assert not list(out.glob(f"*{TMP_MARK}*")), log
    assert_caches_equal(out, ref)
    report = verify_cache(str(out), data=str(images))
    assert report.ok, (report.problems, log, f"seed {seed}")


# ----------------------------------------------------------------------------------------------
# 2. a flipped byte

@pytest.mark.parametrize("array,where", [("target", "chunk"), ("mask", "chunk"), ("key", "chunk"),
                                         ("source_index", "index"), ("target", "index")])
def test_flipped_byte_is_named_by_verify_and_reader(micro_cache, tmp_path, array, where):
    """Nothing silently wrong is read (verify and reader): one byte flipped inside an inner chunk or a shard index: verify names the
    shard, the array file and the chunk; reading an affected view raises CacheCorruptError naming the shard."""
    c = copy_cache(micro_cache, tmp_path / "c")
    path = shard_file(c, "shard-00001", array, view=1)
    off, nbytes = chunk_span(path, c / "shard-00001" / array, 1)
    flip_byte(path, off + nbytes // 2 if where == "chunk" else path.stat().st_size - 10)
    problems = verify_cache(str(c)).problems
    rel = path.relative_to(c / "shard-00001").as_posix()
    want = (f"shard-00001: {rel}: inner chunk 1 (view 1, rows 2..3) fails its crc32c" if where == "chunk"
            else f"shard-00001: {rel}: the shard index fails its crc32c")
    assert problems == [want]
    cache = open_cache(str(c))
    with pytest.raises(CacheCorruptError, match="shard-00001"):
        cache[view_index(cache, 1, 1, 2)]
    cache[view_index(cache, 1, 0, 2)]                                  # view 0 of the shard is intact
    if where == "chunk":
        cache[view_index(cache, 1, 1, 0)]                              # and rows 0..1 of view 1


def test_flipped_byte_stops_train_or_is_skipped_and_counted(micro_cache, image_folder, tmp_path):
    """Nothing silently wrong is read (train): with a flipped byte in the targets of view 0, rows 2..3 of shard-00001, `train`
    stops with a one-line UserError naming the shard; with on_error='skip' it completes the epoch and counts
    exactly those 2 views as skipped_views in metrics.jsonl."""
    c = copy_cache(micro_cache, tmp_path / "c")
    path = shard_file(c, "shard-00001", "target", view=0)
    off, nbytes = chunk_span(path, c / "shard-00001" / "target", 1)
    flip_byte(path, off + 7)
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, c, tmp_path / "run-fail"))
    assert "shard-00001" in one_line(e.value) and "--on-error skip" in str(e.value)
    run = tmp_path / "run-skip"
    summary = train(micro_train_config(image_folder, c, run, on_error="skip"))   # 12 views of view 0: 3 steps
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_views"] for r in records) == 2, records


# ----------------------------------------------------------------------------------------------
# 3. a deleted chunk

def test_deleted_shard_file_is_an_error_never_fill_values(micro_cache, tmp_path):
    """Nothing silently wrong is read: a shard file (the zarr file holding a run of inner chunks) deleted: reading a view in it raises
    CacheCorruptError naming the shard instead of returning fill values; other shards still read; verify reports
    the file."""
    c = copy_cache(micro_cache, tmp_path / "c")
    path = shard_file(c, "shard-00002", "target", view=0)
    path.unlink()
    cache = open_cache(str(c))
    with pytest.raises(CacheCorruptError, match=r"shard-00002.*target/c/0/0/0/0 is missing"):
        cache[view_index(cache, 2, 0, 0)]
    assert torch.equal(cache[0].target, open_cache(str(micro_cache))[0].target)
    assert verify_cache(str(c)).problems == ["shard-00002: file target/c/0/0/0/0 is missing"]
    _rerecord(c, "shard-00002")          # also gone from the records: zarr alone would read fill values
    assert verify_cache(str(c)).problems == [
        "shard-00002: target/c/0/0/0/0 is missing (a whole shard file of array target); reading it would give fill "
        "values"]


def test_whole_shard_folder_deleted(micro_cache, tmp_path):
    """Nothing silently wrong is read: a whole shard folder deleted: reading it raises CacheCorruptError, verify reports it."""
    c = copy_cache(micro_cache, tmp_path / "c")
    shutil.rmtree(c / "shard-00000")
    with pytest.raises(CacheCorruptError, match="shard-00000"):
        open_cache(str(c))[0]
    assert verify_cache(str(c)).problems == ["shard-00000: listed in the manifest but its folder is missing or empty"]


def _empty_index_entry(path: Path, array_dir: Path, j: int) -> None:
    """Mark inner chunk j absent in a shard file's index (with a valid index checksum), as a writer that
    skipped the chunk would leave it."""
    import google_crc32c
    layout = parse_layout(json.loads((array_dir / "zarr.json").read_text()))
    n = int(np.prod(layout.chunks_per_shard))
    data = bytearray(path.read_bytes())
    index = read_shard_index(bytes(data), n).copy()
    index[j] = MAX_UINT_64
    body = index.astype("<u8").tobytes()
    data[-(16 * n + 4):] = body + google_crc32c.value(body).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_verify_reports_a_chunk_missing_from_its_shard_index(micro_cache, tmp_path):
    """Nothing silently wrong is read (verify): an inner chunk marked absent in its shard's index (valid index checksum, file sizes
    as recorded) is reported: zarr alone would read it back as fill values."""
    c = copy_cache(micro_cache, tmp_path / "c")
    path = shard_file(c, "shard-00001", "mask", view=0)
    _empty_index_entry(path, c / "shard-00001" / "mask", 1)
    _rerecord(c, "shard-00001")       # digests as recorded too: only the index check can notice
    assert verify_cache(str(c)).problems == [
        "shard-00001: mask/c/0/0/0: inner chunk 1 (view 0, rows 2..3) is missing (empty in the shard index): zarr "
        "would read it back as fill values"]


def test_reader_refuses_a_chunk_missing_from_its_shard_index(micro_cache, tmp_path):
    """Nothing silently wrong is read (reader): an inner chunk absent from its shard index (file sizes as recorded) is an error when
    read, never fill values (an all-False mask would silently make every patch visible)."""
    c = copy_cache(micro_cache, tmp_path / "c")
    _empty_index_entry(shard_file(c, "shard-00001", "mask", view=0), c / "shard-00001" / "mask", 1)
    _rerecord(c, "shard-00001")
    cache = open_cache(str(c))
    with pytest.raises(CacheCorruptError, match="shard-00001"):
        rec = cache[view_index(cache, 1, 0, 2)]
        pytest.fail(f"read fill values instead of failing: mask keeps {int((~rec.mask).sum())} of 16 visible")


@pytest.fixture(scope="module")
def int4_cache(image_folder, tmp_path_factory) -> Path:
    """The micro cache in int4: packed codes [K, n, 17, 16] uint8, float16 scales [K, n, 17, 1]."""
    out = tmp_path_factory.mktemp("int4") / "c"
    run_extract(micro_extract_config(image_folder, out, codec="int4"))
    return out


def test_corrupted_int4_cache_is_caught_by_verify(int4_cache, image_folder, tmp_path):
    """An int4 cache is checked like the others: a flipped byte in its packed codes or its float16 scales fails
    a crc32c (named), a zero or infinite scale written with valid checksums is reported, and one image's codes
    swapped with another's (checksums valid) fails --deep's int4 tolerance."""
    assert verify_cache(str(int4_cache), deep=4, data=str(image_folder), device="cpu").ok
    for array in ("target", "scale"):
        c = copy_cache(int4_cache, tmp_path / f"flip-{array}")
        path = shard_file(c, "shard-00001", array, view=1)
        off, nbytes = chunk_span(path, c / "shard-00001" / array, 1)
        flip_byte(path, off + nbytes // 2)
        rel = path.relative_to(c / "shard-00001").as_posix()
        assert verify_cache(str(c)).problems == [
            f"shard-00001: {rel}: inner chunk 1 (view 1, rows 2..3) fails its crc32c"]
        cache = open_cache(str(c))
        with pytest.raises(CacheCorruptError, match="shard-00001"):
            cache[view_index(cache, 1, 1, 2)]

    for bad in (0.0, np.inf):
        c = copy_cache(int4_cache, tmp_path / f"scale-{bad}")
        group = zarr.open_group(c / "shard-00000", mode="r+")
        scale = group["scale"][...]
        assert scale.dtype == np.float16 and scale.shape[2:] == (17, 1)
        scale[1, 2, 5, 0] = bad
        group["scale"][...] = scale
        _rerecord(c, "shard-00000")
        problems = verify_cache(str(c)).problems
        assert len(problems) == 1 and problems[0].startswith("shard-00000: view 1 of ") and \
            "has a scale that is not finite and positive" in problems[0], problems

    c = copy_cache(int4_cache, tmp_path / "swapped")
    group = zarr.open_group(c / "shard-00000", mode="r+")
    t = group["target"][...]
    assert t.dtype == np.uint8 and t.shape[2:] == (17, 16)
    t[:, [0, 1]] = t[:, [1, 0]]
    group["target"][...] = t
    _rerecord(c, "shard-00000")
    assert verify_cache(str(c)).ok                                  # checksums and scales hold
    report = verify_cache(str(c), deep=24, data=str(image_folder), device="cpu")
    assert len(report.problems) == 4, report.problems              # 2 images x 2 views
    assert all("stored target differs from the live teacher" in p and "(int4)" in p for p in report.problems)


# ----------------------------------------------------------------------------------------------
# 4. disk full

def _enospc_on(monkeypatch, *match: str) -> list[str]:
    """Make zarr's file writes whose path contains all of `match` fail half-way with ENOSPC; returns paths hit."""
    import zarr.storage._local as local
    original, hit = local._put, []

    def put(path, value, exclusive=False):
        if all(m in str(path) for m in match):
            hit.append(str(path))
            path.parent.mkdir(parents=True, exist_ok=True)
            with local._atomic_write(path, "wb") as f:
                f.write(bytes(value.as_buffer_like())[: max(1, len(value) // 2)])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, value, exclusive)
    monkeypatch.setattr(local, "_put", put)
    return hit


class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails like a full disk (ENOSPC)."""

    def __init__(self, path: Path, room: int):
        self.file, self.room = open(path, "wb"), room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            self.file.write(bytes(b)[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.file.write(b)

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()
        super().close()


def _enospc_in_atomic_writes(monkeypatch, prefix: str, room: int = 100) -> None:
    """Make fsutil's atomic writes of temporaries named `prefix...` fail with ENOSPC after `room` bytes."""
    import g2sd_cache.fsutil as fsutil
    original = fsutil._open_temp
    monkeypatch.setattr(fsutil, "_open_temp", lambda path: _FullDisk(path, room) if path.name.startswith(prefix)
                        else original(path))


def test_disk_full_during_extract_fails_cleanly_and_rerun_completes(micro_cache, image_folder, tmp_path, monkeypatch):
    """Nothing half-written looks complete: the disk fills up (ENOSPC half-way through a file of the second shard): extract raises an
    error that says so, writes no manifest and leaves no folder under a final shard name that is not complete;
    a rerun with space completes, removes the temporaries, verifies, and equals an uninterrupted run."""
    out = tmp_path / "c"
    hit = _enospc_on(monkeypatch, f".shard-00001{TMP_MARK}", "/target/c/")
    with pytest.raises((OSError, UserError)) as e:
        run_extract(micro_extract_config(image_folder, out))
    assert hit and "no space left" in str(e.value).lower()
    assert not (out / MANIFEST).exists()
    assert not (out / "shard-00001").exists()
    assert_complete_shards_sound(out)
    monkeypatch.undo()
    run_extract(micro_extract_config(image_folder, out))
    assert not list(out.glob(f"*{TMP_MARK}*"))
    assert verify_cache(str(out), data=str(image_folder)).ok
    assert_caches_equal(out, micro_cache)


def test_disk_full_while_writing_the_manifest(micro_cache, image_folder, tmp_path, monkeypatch):
    """Nothing half-written looks complete: the disk fills up while manifest.json is written: extract raises, no manifest.json exists
    (the cache is not readable as finished), and a rerun with space (a new process) writes it, leaves no
    temporary file behind and verifies clean."""
    out = tmp_path / "c"
    _enospc_in_atomic_writes(monkeypatch, MANIFEST + TMP_MARK)
    with pytest.raises((OSError, UserError), match="No space left"):
        run_extract(micro_extract_config(image_folder, out))
    assert not (out / MANIFEST).exists()
    with pytest.raises(UserError, match="incomplete"):
        open_cache(str(out))
    monkeypatch.undo()
    # The rerun is another process (another pid), and a kill -9 mid-write leaves the temporary whatever
    # handlers run: leave this process's half-written temporary under another pid's name.
    for tmp in out.glob(f"{MANIFEST}{TMP_MARK}*"):
        tmp.unlink()
    (out / f"{MANIFEST}{TMP_MARK}1").write_text('{"format_version": 1, "tea')
    run_extract(micro_extract_config(image_folder, out))
    assert_caches_equal(out, micro_cache)
    report = verify_cache(str(out))
    assert report.ok, report.problems


# ----------------------------------------------------------------------------------------------
# 5. input faults

@pytest.fixture(scope="module")
def faulty_folder(image_folder, tmp_path_factory) -> Path:
    """`image_folder` plus a truncated JPEG, a zero-byte .jpg and a text file named .png (image indices shift,
    so the good images' views differ from `micro_cache`'s)."""
    root = tmp_path_factory.mktemp("faulty") / "img"
    shutil.copytree(image_folder, root)
    good = (root / "class000" / "img000000.jpg").read_bytes()
    (root / "class000" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "class001" / "empty.jpg").write_bytes(b"")
    (root / "class002" / "notes.png").write_text("this is not an image\n")
    return root


BAD_KEYS = ["class000/truncated.jpg", "class001/empty.jpg", "class002/notes.png"]


def test_bad_images_are_skipped_and_listed(faulty_folder, image_folder, micro_cache, tmp_path):
    """Bad inputs are named (skip): a truncated JPEG, a zero-byte file and a non-image with an image suffix are skipped,
    counted and listed (with the reason) in the manifest; every good image is cached, and verify passes with
    --data (the counts add up: cached + skipped = listed)."""
    out = tmp_path / "c"
    summary = run_extract(micro_extract_config(faulty_folder, out, on_error="skip"))
    assert summary["skipped_images"] == 3
    m = open_cache(out).manifest
    assert sorted(s["key"] for s in m.skipped) == sorted(BAD_KEYS)
    assert all(s["error"] for s in m.skipped)
    assert m.images == 12 and m.source.count == 15
    report = verify_cache(str(out), data=str(faulty_folder))
    assert report.ok, report.problems
    cache = open_cache(str(out))
    assert sorted({cache[i].key for i in range(len(cache))}) == sorted(FolderSource.scan(str(image_folder)).keys)


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_image_stops_extract_under_fail(image_folder, tmp_path, bad):
    """Bad inputs are named (fail): each bad input alone stops extract with a one-line UserError naming its path."""
    root = tmp_path / "img"
    shutil.copytree(image_folder, root)
    good = (root / "class000" / "img000000.jpg").read_bytes()
    content = {"class000/truncated.jpg": good[: len(good) // 2], "class001/empty.jpg": b"",
               "class002/notes.png": b"this is not an image\n"}[bad]
    (root / bad).write_bytes(content)
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(root, tmp_path / "c", on_error="fail"))
    assert bad in one_line(e.value) and "--on-error skip" in str(e.value)
    assert not (tmp_path / "c" / MANIFEST).exists()


def _tar_with_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def faulty_tars(tmp_path_factory) -> Path:
    """Two tars: tar 0 has 3 good samples and one whose .jpg is garbage; tar 1 has 3 good samples and is cut
    off half-way through its last member."""
    root = tmp_path_factory.mktemp("tars")
    images = [jpeg_bytes(synthetic_image(50 + i, (96, 80))) for i in range(6)]
    _tar_with_members(root / "train-000000.tar", [(f"s{i:03d}.jpg", images[i]) for i in range(3)]
                      + [("bad0.jpg", b"\xff\xd8\xff garbage, not a JPEG")])
    _tar_with_members(root / "train-000001.tar", [(f"s{i:03d}.jpg", images[i]) for i in range(3, 6)])
    path = root / "train-000001.tar"
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])
    return root


def test_corrupt_tar_members_are_skipped_and_listed(faulty_tars, tmp_path):
    """Bad inputs are named (tars, skip): a member that is not an image and a tar cut off inside a member: the good
    samples are cached, the bad ones skipped and listed, verify passes with --data."""
    spec = str(faulty_tars / "train-{000000..000001}.tar")
    out = tmp_path / "c"
    run_extract(micro_extract_config(spec, out, on_error="skip"))
    m = open_cache(out).manifest
    assert m.images == 5, m.skipped
    keys = [s["key"] for s in m.skipped]
    assert "bad0" in keys
    assert any("train-000001.tar" in k and "unexpected end" in s["error"] for k, s in zip(keys, m.skipped)), m.skipped
    report = verify_cache(str(out), data=spec)
    assert report.ok, report.problems


@pytest.mark.parametrize("which", ["member", "truncated"])
def test_corrupt_tar_member_stops_extract_under_fail(faulty_tars, tmp_path, which):
    """Bad inputs are named (tars, fail): a non-image member / a truncated tar stops extract with a one-line UserError."""
    root = tmp_path / "t"
    root.mkdir()
    src = faulty_tars / ("train-000000.tar" if which == "member" else "train-000001.tar")
    shutil.copy(src, root / src.name)
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(str(root / src.name), tmp_path / "c", on_error="fail"))
    msg = one_line(e.value)
    assert ("bad0" in msg) if which == "member" else ("train-000001.tar" in msg and "unexpected end" in msg)


def test_corrupt_tar_header_is_not_silent(tmp_path):
    """Bad inputs are named (tars): a member whose tar header is corrupt makes the samples after it unreadable: they must be
    listed as skipped (or stop extract under fail), never silently dropped from the cache."""
    [path] = make_tar_shards(tmp_path / "tars", 4, 4, seed=5)
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        second = tar.getmembers()[1]
    data[second.offset + 150] ^= 0xFF                         # inside the header's checksum field
    path.write_bytes(bytes(data))
    out = tmp_path / "c"
    run_extract(micro_extract_config(str(path), out, on_error="skip"))
    m = open_cache(out).manifest
    assert m.images == 4 or m.skipped, f"{4 - m.images} of 4 samples dropped silently: {m.images} cached, none skipped"


# ----------------------------------------------------------------------------------------------
# 6. configuration faults

def test_train_refuses_a_different_source_listing(micro_cache, image_folder, tmp_path):
    """Mismatches are refused: train refuses, in one line, a cache whose source listing differs from --data (an image added)."""
    data = tmp_path / "img"
    shutil.copytree(image_folder, data)
    (data / "class000" / "extra.jpg").write_bytes(jpeg_bytes(synthetic_image(999, (100, 90))))
    with pytest.raises(UserError) as e:
        train(micro_train_config(data, micro_cache, tmp_path / "run"))
    assert "--data" in one_line(e.value) and "not the dataset the cache was extracted from" in str(e.value)


def test_train_refuses_another_teacher_in_replay_mode(micro_cache, image_folder, tmp_path):
    """Mismatches are refused: in replay mode train refuses, in one line, a teacher whose weights differ from the cache's."""
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, micro_cache, tmp_path / "run", teacher="random:1"))
    assert "not the teacher that made the cache" in one_line(e.value)


def test_train_refuses_a_student_with_another_patch_size(micro_cache, image_folder, tmp_path, monkeypatch):
    """Mismatches are refused: train refuses, in one line, a student whose patch size differs from the cache's views."""
    monkeypatch.setitem(STUDENT_PRESETS, "test_vit_micro_patch8", ViTShape(8, 48, 2, 2, 32, 1, 1))
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, micro_cache, tmp_path / "run", student="test_vit_micro_patch8"))
    assert "patch size 8" in one_line(e.value)


@pytest.mark.parametrize("change", [{"teacher": "random:1"}, {"target_layer": 3}, {"mask_ratio": 0.5},
                                    {"img_size": 32}, {"arch": "mae_vit_base_patch16"}])
def test_extract_refuses_rerun_with_another_configuration(micro_cache, image_folder, tmp_path, change):
    """Mismatches are refused: rerunning extract into an existing cache with another teacher, target layer, mask ratio, image
    size or architecture is refused in one line naming the setting, and the cache is left untouched."""
    c = copy_cache(micro_cache, tmp_path / "c")
    before = (c / MANIFEST).read_bytes()
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(image_folder, c, **change))
    key = next(iter(change))
    assert key in one_line(e.value) and "--overwrite" in str(e.value)
    assert (c / MANIFEST).read_bytes() == before
    assert verify_cache(str(c)).ok


# ----------------------------------------------------------------------------------------------
# 7. NaN / Inf in teacher outputs

def _poisoned_checkpoint(path: Path, name: str, index: tuple, value: float) -> Path:
    teacher, _ = build_teacher("random", MICRO_TEACHER, 64)
    sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    sd[name][index] = value
    torch.save({"model": sd}, path)
    return path


def _first_view_with_patch_visible(folder: Path, patch: int, views: int, per_shard: int):
    """(shard, key, view) of the first view, in extract's order, that keeps `patch` visible."""
    source = FolderSource.scan(str(folder))
    g = ViewGeometry(img_size=64, patch_size=16)
    for index, key in enumerate(source.keys):
        with Image.open(folder / key) as im:
            size = im.size
        for v in range(views):
            if not sample_view(0, index, v, size, g).mask[patch]:
                return index // per_shard, key, v
    return None


def _wait_for_writer(out: Path, timeout: float = 10.0) -> None:
    """Extract's background writer may still be finishing an earlier shard when the error surfaces: wait until
    the folder has been quiet (no temporaries, no change) for half a second."""
    t0, last, quiet = time.monotonic(), None, 0.0
    while time.monotonic() - t0 < timeout and quiet < 0.5:
        now = sorted(os.listdir(out)) if out.is_dir() else []
        stable = now == last and not any(TMP_MARK in n for n in now)
        quiet, last = (quiet + 0.05 if stable else 0.0), now
        time.sleep(0.05)


def test_nan_teacher_output_stops_extract_naming_the_view(image_folder, tmp_path):
    """Bad inputs are named (NaN): a checkpoint with NaN in the positional embedding of one patch poisons exactly the views
    that keep that patch visible: extract stops with a one-line UserError naming the first such image and view,
    no shard folder holding it is written, and no manifest."""
    found = None
    for patch in range(16):       # a patch first visible in a later shard, so that earlier shards get written
        hit = _first_view_with_patch_visible(image_folder, patch, views=2, per_shard=4)
        if hit and (found is None or hit[0] > found[1][0]):
            found = (patch, hit)
    patch, (shard, key, view) = found
    assert shard >= 1, "the seeded images should let some patch stay hidden through shard 0"
    ckpt = _poisoned_checkpoint(tmp_path / "nan.pth", "pos_embed", (0, 1 + patch, 0), float("nan"))
    out = tmp_path / "c"
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(image_folder, out, teacher=str(ckpt)))
    msg = one_line(e.value)
    assert f"image {key} view {view}" in msg and "not finite" in msg, msg
    _wait_for_writer(out)
    assert not (out / MANIFEST).exists()
    written = sorted(p.name for p in out.glob("shard-*"))      # earlier shards may be written (all complete)
    assert set(written) <= {f"shard-{s:05d}" for s in range(shard)}, written
    assert_complete_shards_sound(out)


def test_inf_in_teacher_weights_stops_extract_before_any_shard(image_folder, tmp_path):
    """Bad inputs are named (Inf): Inf in a decoder weight makes every output non-finite: extract stops at the first view
    (first image dealt, view 0) with a one-line UserError, and writes no shard at all."""
    ckpt = _poisoned_checkpoint(tmp_path / "inf.pth", "decoder_blocks.0.mlp.fc1.weight", (3, 5), float("inf"))
    out = tmp_path / "c"
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(image_folder, out, teacher=str(ckpt)))
    keys = FolderSource.scan(str(image_folder)).keys
    first = keys[folder_order(0, len(keys))[0]]
    assert f"image {first} view 0" in one_line(e.value)
    _wait_for_writer(out)
    assert not list(out.glob("shard-*")) and not (out / MANIFEST).exists()


# ----------------------------------------------------------------------------------------------
# 9. fork safety

FORK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch.utils.data import DataLoader, Dataset
    from g2sd_cache.cache import open_cache

    cache = open_cache(sys.argv[1])
    parent = [cache[i].target for i in range(len(cache))]     # the parent opened every shard (zarr IO thread up)

    class Views(Dataset):
        def __len__(self):
            return len(cache)

        def __getitem__(self, i):
            r = cache[i]
            return i, r.target, r.mask

    loader = DataLoader(Views(), batch_size=5, num_workers=2, multiprocessing_context="fork")
    seen = 0
    for idx, target, mask in loader:
        for j, t in zip(idx.tolist(), target):
            assert torch.equal(t, parent[j]), j
            seen += 1
    blocks = list(cache.iter_blocks())                          # the parent still reads after the workers
    assert seen == len(cache), seen
    print("OK", seen, len(blocks))
""")


@pytest.mark.slow
def test_forked_dataloader_workers_read_a_cache_the_parent_opened(micro_cache):
    """Fork safety: a DataLoader with 2 fork-started workers reads a cache that the parent has already opened and
    read (zarr's IO thread running), returns the same targets as the parent, and finishes within a timeout
    (a deadlock fails the test instead of hanging the suite)."""
    try:
        proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(micro_cache)], capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("forked DataLoader workers did not finish within 180 s: deadlock after fork")
    assert proc.returncode == 0 and proc.stdout.startswith("OK 24"), proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# 10. trust nothing loaded

def _run_folder_with(tmp_path: Path, state) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state, run / "checkpoint.pt")
    return run


class _RunsCode:
    """A pickle that would touch a file when unpickled with weights_only=False."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_never_run(tmp_path, capsys):
    """Trust nothing loaded: `export RUN` on a checkpoint whose pickle calls os.system refuses it in one line naming
    the object, and the command never runs (weights-only loading)."""
    from g2sd_cache.cli import main as cli_main
    witness = tmp_path / "ran"
    run = _run_folder_with(tmp_path, {"model": _RunsCode(witness)})
    assert cli_main(["export", str(run), "--out", str(tmp_path / "enc.pth")]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err and "could run code" in err and err.count("\n") == 1, err
    assert not witness.exists(), "the checkpoint's pickle ran"
    assert not (tmp_path / "enc.pth").exists()


def test_a_checkpoint_without_the_expected_entries_is_one_line(tmp_path):
    """Trust nothing loaded: a valid torch file lacking a training checkpoint's entries is a one-line error naming
    what is missing (export's and --resume's keys), never a KeyError."""
    from g2sd_cache.checkpoint import load_checkpoint
    from g2sd_cache.export import export_encoder
    run = _run_folder_with(tmp_path, {"model": {"w": torch.zeros(2)}, "step": 3})
    with pytest.raises(UserError) as e:
        export_encoder(str(run), str(tmp_path / "enc.pth"))
    assert "lacks student, target_dim, img_size;" in one_line(e.value)          # what export needs
    from g2sd_cache.checkpoint import RESUME_KEYS
    with pytest.raises(UserError) as e:
        load_checkpoint(run, required=RESUME_KEYS)                               # what --resume needs
    assert "lacks student, target_dim, img_size, optimizer, scaler, epoch, position" in one_line(e.value)
    with pytest.raises(UserError) as e:
        load_checkpoint(run, "train without --resume to start a new run there", required=("model", "rng"))
    assert "lacks rng;" in one_line(e.value) and "train without --resume" in str(e.value)
    torch.save([1, 2], run / "checkpoint.pt")
    with pytest.raises(UserError, match="holds a list"):
        load_checkpoint(run)


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    """Trust nothing loaded: the random generators' states are stored as tensors and plain values, so a checkpoint
    loads weights-only and restores every generator exactly."""
    import random as pyrandom

    from g2sd_cache.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
    torch.manual_seed(1), np.random.seed(2), pyrandom.seed(3)
    np.random.normal()                                      # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path, {"model": {}, "rng": rng_state()})
    want = (torch.rand(3), np.random.normal(size=3), [pyrandom.random() for _ in range(3)])
    set_rng_state(load_checkpoint(tmp_path, required=("rng",))["rng"])
    got = (torch.rand(3), np.random.normal(size=3), [pyrandom.random() for _ in range(3)])
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Runs: the disk fills up while a checkpoint is written: one line naming the space problem, no temporary left
    behind, and the previous checkpoint intact and loadable."""
    from g2sd_cache.checkpoint import load_checkpoint, save_checkpoint
    state = {"model": {"w": torch.arange(5.0)}, "step": 1}
    save_checkpoint(tmp_path, state)
    _enospc_in_atomic_writes(monkeypatch, "checkpoint.pt" + TMP_MARK, room=1000)
    with pytest.raises(UserError) as e:
        save_checkpoint(tmp_path, state | {"model": {"w": torch.zeros(100_000)}, "step": 2})
    assert "no space left" in one_line(e.value) and "previous checkpoint is intact" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(tmp_path, required=("step",))["step"] == 1


def test_atomic_writes_fsync_the_file_before_and_the_folder_after_the_rename(tmp_path, monkeypatch):
    """Runs and caches: a file is fsync-ed before it is renamed into place and its folder after, so a power cut
    never leaves a zero-length file under the final name (the same helper writes checkpoints, manifests, shards)."""
    import g2sd_cache.fsutil as fsutil
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fsutil.os, "fsync", lambda fd: (events.append(("fsync", os.path.realpath(
        f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(fsutil.os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b))[1])
    target = tmp_path / "manifest.json"
    fsutil.write_text_atomic(target, "{}")
    assert [e[0] for e in events] == ["fsync", "rename", "fsync"]
    assert TMP_MARK in events[0][1] and events[1][1] == str(target) and events[2][1] == str(tmp_path.resolve())
    events.clear()
    (tmp_path / "shard.tmp").mkdir()
    (tmp_path / "shard.tmp" / "a").write_text("x")
    fsutil.publish_dir(tmp_path / "shard.tmp", tmp_path / "shard")
    assert [e[0] for e in events] == ["fsync", "fsync", "rename", "fsync"] and events[0][1].endswith("/a")


# ----------------------------------------------------------------------------------------------
# 11. own only what is yours

def test_overwrite_refuses_every_folder_that_is_not_a_marked_cache(image_folder, micro_cache, tmp_path):
    """Own only what is yours: `extract --overwrite` into an image folder holding a config.yaml, a training run
    folder, or a folder of other files refuses in one line naming what it is, and deletes nothing."""
    data = tmp_path / "images"
    shutil.copytree(image_folder, data)
    (data / "config.yaml").write_text("mine: 1\n")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "config.yaml", "metrics.jsonl"):
        (run / name).write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    for folder, what in ((data, "a folder of images"), (run, "not ours (it holds checkpoint.pt")):
        before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
        with pytest.raises(UserError) as e:
            run_extract(micro_extract_config(image_folder, folder, overwrite=True))
        assert what in one_line(e.value) and "nothing was changed" in str(e.value)
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    with pytest.raises(UserError, match="notes.txt"):
        run_extract(micro_extract_config(image_folder, other))


def test_overwrite_deletes_a_cache_only_if_it_holds_nothing_else(micro_cache, image_folder, tmp_path):
    """Own only what is yours: --overwrite replaces a marked cache, but refuses one that also holds a file a cache
    does not write (naming it), and leaves that file alone."""
    c = copy_cache(micro_cache, tmp_path / "c")
    (c / "shard-00001" / "my-notes.txt").write_text("x")
    (c / "results.csv").write_text("x")
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(image_folder, c, overwrite=True, seed=1))
    assert "results.csv" in one_line(e.value) and "shard-00001" in str(e.value)
    assert (c / "results.csv").exists() and (c / "shard-00001" / "my-notes.txt").exists()
    (c / "results.csv").unlink()
    (c / "shard-00001" / "my-notes.txt").unlink()
    run_extract(micro_extract_config(image_folder, c, overwrite=True, seed=1))
    assert verify_cache(str(c)).ok and open_cache(str(c)).manifest.seed == 1


def test_a_format_1_cache_is_refused_with_one_line_saying_to_re_extract(micro_cache, image_folder, tmp_path, capsys):
    """Own only what is yours / format 2: a cache of the previous format (no marker, format_version 1) is refused by
    open_cache, verify and a resuming extract, each in one line that says to re-extract."""
    c = copy_cache(micro_cache, tmp_path / "c")
    (c / ".g2sd-cache").unlink()
    m = json.loads((c / MANIFEST).read_text())
    (c / MANIFEST).write_text(json.dumps(m | {"format_version": 1}))
    for attempt in (lambda: open_cache(str(c)), lambda: verify_cache(str(c)),
                    lambda: run_extract(micro_extract_config(image_folder, c))):
        with pytest.raises(UserError) as e:
            attempt()
        assert "format 1" in one_line(e.value).replace("version 1", "format 1") and "extract" in str(e.value)


def test_claim_run_folder_takes_only_new_empty_or_own_run_folders(micro_cache, image_folder, tmp_path):
    """Own only what is yours: a run folder is claimed (marker written) only if new, empty or already one of our
    runs; a cache, a dataset, a file or a folder with other files is refused in one line; --resume needs a run."""
    from g2sd_cache.ownership import RUN_MARKER, claim_run_folder, is_run
    fresh = tmp_path / "runs" / "a"
    claim_run_folder(fresh, resume=False)
    assert is_run(fresh) and (fresh / RUN_MARKER).is_file()
    (fresh / "checkpoint.pt").write_text("x")
    claim_run_folder(fresh, resume=True)                               # ours: resumable
    claim_run_folder(fresh, resume=False)                              # the trainer decides about its checkpoint
    (tmp_path / "empty").mkdir()
    claim_run_folder(tmp_path / "empty", resume=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("x")
    (mine / "metrics.jsonl").write_text("x")
    (tmp_path / "file").write_text("x")
    for path, words in ((micro_cache, "a g2sd-cache cache"), (image_folder, "a folder of images"),
                        (mine, "config.yaml, metrics.jsonl"), (tmp_path / "file", "existing file")):
        before = sorted(p.name for p in Path(path).iterdir()) if Path(path).is_dir() else None
        with pytest.raises(UserError) as e:
            claim_run_folder(path, resume=False)
        assert words in one_line(e.value), e.value
        assert before is None or sorted(p.name for p in Path(path).iterdir()) == before
    with pytest.raises(UserError, match="not a g2sd-cache training run"):
        claim_run_folder(tmp_path / "nowhere", resume=True)


# ----------------------------------------------------------------------------------------------
# 12. one writer at a time

def test_a_second_extract_into_a_locked_cache_says_who_holds_it(image_folder, tmp_path):
    """One writer at a time: while another process holds --out's lock, extract refuses in one line naming that
    process (pid and host) and writes nothing; once the holder dies (kill -9), the lock is gone with it."""
    out = tmp_path / "c"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, json, os, sys, time\n"
         f"fd = os.open({str(out / '.g2sd-cache.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'elsewhere', 'since': 'now'}).encode())\n"
         "print('locked', flush=True)\ntime.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as e:
            run_extract(micro_extract_config(image_folder, out))
        assert f"another extract is writing into {out} (pid {holder.pid} on host elsewhere" in one_line(e.value)
        assert sorted(p.name for p in out.iterdir()) == [".g2sd-cache.lock"]
    finally:
        holder.kill()
        holder.wait()
    run_extract(micro_extract_config(image_folder, out))
    assert verify_cache(str(out)).ok


def test_a_killed_writers_temporaries_are_removed_by_the_next_run(micro_cache, image_folder, tmp_path):
    """One writer at a time: temporaries left by a writer that is gone (a shard folder complete on disk whose
    rename failed, a half-written manifest) are removed by the next extract, which holds the lock; so verify
    passes without anyone deleting them by hand. A live process's temporary is left alone."""
    from g2sd_cache.ownership import remove_stale_temporaries
    c = copy_cache(micro_cache, tmp_path / "c")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = os.uname().nodename
    shutil.copytree(c / "shard-00001", c / f".shard-00001{TMP_MARK}{host}-{dead}")   # complete, never renamed
    (c / f"{MANIFEST}{TMP_MARK}{host}-{dead}").write_text('{"format_version": 2, "tea')
    assert not verify_cache(str(c)).ok
    run_extract(micro_extract_config(image_folder, c))
    assert not list(c.glob(f"*{TMP_MARK}*"))
    assert verify_cache(str(c)).ok
    alive = c / f".shard-00002{TMP_MARK}{host}-{os.getppid()}"
    alive.mkdir()
    assert remove_stale_temporaries(c) == [] and alive.exists()


@pytest.mark.slow
def test_the_same_extract_started_twice_one_runs_one_refuses(image_folder, tmp_path):
    """One writer at a time: the same extract command run twice at once (the first paused while it holds the lock,
    so the runs overlap on any machine): the second exits 2 with one line naming the first (never `Directory not
    empty` on a shard rename, which two writers of the same shards hit); the first completes and the cache verifies."""
    out = tmp_path / "c"
    args = [sys.executable, "-m", "g2sd_cache.cli", "extract", "--data", str(image_folder), "--out", str(out),
            "--teacher", "random", "--arch", MICRO_TEACHER, "--img-size", "32", "--workers", "0", "--device", "cpu",
            "--views", "2", "--shard-size", "4", "--chunk-views", "2"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".g2sd-cache").exists():        # written under the lock, right after taking it
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(args, capture_output=True, text=True, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out_first, err_first = first.communicate(timeout=300)
    assert first.returncode == 0, err_first
    assert second.returncode == 2, second.stderr
    assert second.stderr.startswith("g2sd-cache extract: error: another extract is writing into") and \
        f"pid {first.pid}" in second.stderr and second.stderr.count("\n") == 1, second.stderr
    assert verify_cache(str(out)).ok


# ----------------------------------------------------------------------------------------------
# 13. content bound to its place

def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


@pytest.mark.parametrize("how", ["views", "shards"])
def test_target_files_swapped_fail_plain_verify_and_reading(micro_cache, image_folder, tmp_path, how):
    """Content bound to its place: target shard files swapped between two views of a shard, or between two shards
    (each keeps a valid crc32c): plain verify names both files, reading a view in them raises naming the shard,
    and train stops."""
    c = copy_cache(micro_cache, tmp_path / "c")
    a = shard_file(c, "shard-00001", "target", view=0)
    b = shard_file(c, "shard-00001", "target", view=1) if how == "views" else shard_file(c, "shard-00002", "target")
    _swap(a, b)
    problems = verify_cache(str(c)).problems
    assert len(problems) == 2 and all("is not the one its record describes" in p for p in problems), problems
    cache = open_cache(str(c))
    with pytest.raises(CacheCorruptError, match="shard-00001.*target/c/0/0/0/0 is not the one"):
        cache[view_index(cache, 1, 0, 0)]
    cache[view_index(cache, 0, 0, 0)]                                   # an untouched shard still reads
    with pytest.raises(UserError, match="is not the one its record describes"):
        train(micro_train_config(image_folder, c, tmp_path / "run"))


def test_a_shard_copied_in_from_a_cache_of_another_teacher_fails(micro_cache, image_folder, tmp_path):
    """Content bound to its place: shard-00001 replaced by the same shard of a cache made with another teacher
    (same images, same sizes, valid checksums): plain verify and reading refuse it."""
    other = tmp_path / "other"
    run_extract(micro_extract_config(image_folder, other, teacher="random:7"))
    c = copy_cache(micro_cache, tmp_path / "c")
    shutil.rmtree(c / "shard-00001")
    shutil.copytree(other / "shard-00001", c / "shard-00001")
    assert verify_cache(str(c)).problems == [
        p for p in verify_cache(str(c)).problems if p.startswith("shard-00001: shard.json is not the record")]
    cache = open_cache(str(c))
    with pytest.raises(CacheCorruptError, match="shard-00001: .*|shard.json is not the record"):
        cache[view_index(cache, 1, 0, 0)]


def _edit_manifest(cache: Path, edit) -> None:
    m = json.loads((cache / MANIFEST).read_text())
    edit(m)
    (cache / MANIFEST).write_text(json.dumps(m))


MANIFEST_EDITS = {
    "codec": lambda m: m.update(codec="bf16"),
    "shard images": lambda m: m["shards"][0].update(images=2),
    "entry list": lambda m: m.update(shards=m["shards"][:2], images=8, views=16),
    "shard name": lambda m: m["shards"][0].update(name="../other-cache/shard-00000"),
    "file path": lambda m: m["shards"][0]["files"].update({"../../etc/passwd": 10}),
    "target_dim": lambda m: m.update(target_dim=m["target_dim"] + 1),
    "img_size": lambda m: m["geometry"].update(img_size=2 * m["geometry"]["img_size"]),
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_open_cache_checks_the_manifest_like_verify_with_the_same_line(micro_cache, image_folder, tmp_path, edit):
    """Content bound to its place / train checks what verify checks: a hand-edited manifest (codec, a shard's image
    count, the shard list, a shard name or file path pointing outside the cache, target_dim, img_size) is refused
    by open_cache before any data is read, with one of verify's own problem lines, and train stops with it."""
    c = copy_cache(micro_cache, tmp_path / "c")
    _edit_manifest(c, MANIFEST_EDITS[edit])
    problems = verify_cache(str(c)).problems
    assert problems
    with pytest.raises(CacheCorruptError) as e:
        open_cache(str(c))
    msg = one_line(e.value)
    assert any(p.split(": ", 1)[1] in msg for p in problems), (msg, problems)
    with pytest.raises(UserError):
        train(micro_train_config(image_folder, c, tmp_path / "run"))


def test_a_same_size_replacement_of_a_source_image_is_caught(micro_cache, image_folder, tmp_path):
    """Content bound to its place (sources): an image replaced by another of the same byte size keeps the listing
    fingerprint, but verify --data reports the image by its crc32c, and `check_image` (what training's image path
    calls) refuses its bytes."""
    from g2sd_cache.digests import SourceChangedError, check_image
    data = tmp_path / "images"
    shutil.copytree(image_folder, data)
    key = "class001/img000004.jpg"
    raw = bytearray((data / key).read_bytes())
    raw[len(raw) // 2] ^= 0x01                                          # same size, other bytes
    (data / key).write_bytes(bytes(raw))
    problems = verify_cache(str(micro_cache), data=str(data)).problems
    assert len(problems) == 1 and f"image {key} changed since the cache was extracted" in problems[0], problems
    cache = open_cache(str(micro_cache))
    shard, row = next((s, r) for s in range(len(cache.shard_images)) for r in range(cache.shard_images[s])
                      if str(cache.read_block(s, 0, r, r + 1).key[0]) == key)
    check_image((image_folder / key).read_bytes(), cache.image_crc32c(shard, row), key)
    with pytest.raises(SourceChangedError) as e:
        check_image(bytes(raw), cache.image_crc32c(shard, row), key)
    assert key in one_line(e.value) and "re-extract" in str(e.value)


def test_a_duplicated_key_in_a_tar_is_skipped_and_listed(tmp_path):
    """Content bound to its place (sources): a tar holding key `a` twice caches the first and lists the second as
    skipped (a join by key would pair one picture with the other's targets); under --on-error fail it stops."""
    images = [jpeg_bytes(synthetic_image(70 + i, (96, 80))) for i in range(4)]
    path = tmp_path / "dup.tar"
    _tar_with_members(path, [("a.jpg", images[0]), ("b.jpg", images[1]), ("a.jpg", images[2]), ("c.jpg", images[3])])
    out = tmp_path / "c"
    run_extract(micro_extract_config(str(path), out))
    m = open_cache(out).manifest
    keys = [str(k) for k in open_cache(str(out)).read_block(0, 0, 0, 3).key]
    assert m.images == 3 and keys == ["a", "b", "c"] and m.source.count == 4
    assert [s["key"] for s in m.skipped] == ["a (second copy)"] and "appears twice" in m.skipped[0]["error"]
    assert verify_cache(str(out), data=str(path)).ok
    with pytest.raises(UserError, match="appears twice"):
        run_extract(micro_extract_config(str(path), tmp_path / "c2", on_error="fail"))


# ----------------------------------------------------------------------------------------------
# 14. bad inputs are named: the folder scan and tar members

@pytest.fixture
def tricky_folder(image_folder, tmp_path) -> Path:
    """`image_folder` plus: a folder link loop, a second link to a class folder, a link to an image, a dangling
    link, a link to itself, a FIFO named .jpg and a name that is not UTF-8."""
    root = tmp_path / "tricky"
    shutil.copytree(image_folder, root)
    (root / "class000" / "loop").symlink_to("..")
    (root / "class000" / "again").symlink_to("../class001")
    (root / "class000" / "alias.jpg").symlink_to("img000000.jpg")
    (root / "class001" / "dangling.jpg").symlink_to("/nonexistent/x.jpg")
    (root / "class001" / "self.jpg").symlink_to("self.jpg")
    os.mkfifo(root / "class002" / "pipe.jpg")
    (root / os.fsdecode(b"class002/bad\xffname.jpg")).write_bytes(b"x")
    return root


def test_the_folder_scan_takes_each_real_image_once_and_lists_the_rest(tricky_folder, image_folder, micro_cache,
                                                                        tmp_path, capsys):
    """Bad inputs are named (scan): links are followed but each real folder and file is taken once (a loop adds
    nothing), dangling and looping links, a FIFO and a non-UTF-8 name are left out and listed, never read (no hang,
    no traceback); extract prints a note, lists them in the manifest, and the cache equals the clean folder's."""
    signal.alarm(120)                      # a FIFO that is opened would block forever: fail instead
    try:
        source = FolderSource.scan(str(tricky_folder))
        out = tmp_path / "c"
        run_extract(micro_extract_config(tricky_folder, out))
    finally:
        signal.alarm(0)
    assert source.keys == FolderSource.scan(str(image_folder)).keys
    left_out = {s["key"]: s["error"] for s in source.skipped}
    assert set(left_out) == {"class000/loop", "class000/again", "class000/alias.jpg", "class001/dangling.jpg",
                             "class001/self.jpg", "class002/pipe.jpg", "class002/bad\\xffname.jpg"}, left_out
    assert "FIFO" in left_out["class002/pipe.jpg"] and "UTF-8" in left_out["class002/bad\\xffname.jpg"]
    assert "note: 7 entries of --data" in capsys.readouterr().out
    m = open_cache(out).manifest
    assert m.images == 12 and [s["key"] for s in m.skipped] == [s["key"] for s in source.skipped]
    assert verify_cache(str(out), data=str(tricky_folder)).ok
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        x, y = shard_arrays(out, shard), shard_arrays(micro_cache, shard)
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_an_unreadable_folder_is_reported(image_folder, tmp_path, monkeypatch):
    """Bad inputs are named (scan): a sub-folder that cannot be listed is reported in the skipped list with the
    reason, not silently dropped (os.walk ignores such errors)."""
    import g2sd_cache.sources as sources
    real = os.scandir

    def scandir(path):
        if str(path).endswith("class001"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)
    monkeypatch.setattr(sources.os, "scandir", scandir)
    source = FolderSource.scan(str(image_folder))
    assert source.skipped == ({"key": "class001", "error": "folder cannot be read (Permission denied)"},)
    assert len(source) == 8


def test_a_truncated_tar_is_one_skipped_entry_and_counts_one_input(tmp_path):
    """Bad inputs are named (tars): a tar cut off inside its third member is listed once (not once per attempt to
    go on), and the source count is the samples it held (2 cached + 1 skipped)."""
    images = [jpeg_bytes(synthetic_image(80 + i, (96, 80))) for i in range(3)]
    path = tmp_path / "cut.tar"
    _tar_with_members(path, [(f"s{i}.jpg", images[i]) for i in range(3)])
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(path.read_bytes()[: last.offset_data + last.size // 2])
    out = tmp_path / "c"
    run_extract(micro_extract_config(str(path), out))
    m = open_cache(out).manifest
    assert m.images == 2 and m.source.count == 3 and len(m.skipped) == 1, m.skipped
    assert "s2.jpg" in m.skipped[0]["key"] and "unexpected end of data" in m.skipped[0]["error"]
    assert verify_cache(str(out), data=str(path)).ok


def test_tar_link_members_are_listed_not_dropped(tmp_path):
    """Bad inputs are named (tars): a symbolic-link and a hard-link member are listed as skipped with what they are,
    never dropped without a word."""
    images = [jpeg_bytes(synthetic_image(90 + i, (96, 80))) for i in range(2)]
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("s0.jpg", images[0]), ("s3.jpg", images[1])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if name == "s0.jpg":
                for link, kind in (("s1.jpg", tarfile.SYMTYPE), ("s2.jpg", tarfile.LNKTYPE)):
                    info = tarfile.TarInfo(link)
                    info.type, info.linkname = kind, "s0.jpg"
                    tar.addfile(info)
    out = tmp_path / "c"
    run_extract(micro_extract_config(str(path), out))
    m = open_cache(out).manifest
    assert m.images == 2 and m.source.count == 4
    assert {s["key"]: ("symbolic link" in s["error"], "hard link" in s["error"]) for s in m.skipped} == {
        "s1": (True, False), "s2": (False, True)}


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    """Bad inputs are named / decoded right: a 16-bit grayscale PNG decodes to its values >> 8 (PIL's own
    conversion clips everything above 255 to white)."""
    from g2sd_cache.views import decode_image
    wide = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    got = np.asarray(decode_image(buf.getvalue()))
    assert got.shape == (48, 64, 3) and np.array_equal(got[..., 0], (wide >> 8).astype(np.uint8))
    assert (got == 255).mean() < 0.01


# ----------------------------------------------------------------------------------------------
# 15. runs: the trainer's side of owning folders, trusting sources, and stopping cleanly

def test_train_out_refuses_a_cache_a_dataset_and_a_foreign_folder(micro_cache, image_folder, tmp_path):
    """Own only what is yours: `train --out` never writes into the cache, the image folder or a folder of someone
    else's files (one line each, nothing written); a new folder becomes a marked run folder."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("my: own\n")
    (foreign / "metrics.jsonl").write_text("{}\n")
    for out, what in ((micro_cache, "cache"), (image_folder, "images"), (foreign, "not ours")):
        before = sorted(p.name for p in Path(out).iterdir())
        with pytest.raises(UserError) as e:
            train(micro_train_config(image_folder, micro_cache, out))
        assert str(out) in one_line(e.value) and what in str(e.value), str(e.value)
        assert sorted(p.name for p in Path(out).iterdir()) == before
    assert (foreign / "config.yaml").read_text() == "my: own\n"
    train(micro_train_config(image_folder, micro_cache, tmp_path / "new", steps=1))
    assert (tmp_path / "new" / ".g2sd-run").is_file() and (tmp_path / "new" / "checkpoint.pt").is_file()


def test_training_from_images_refuses_a_source_image_changed_since_extract(micro_cache_no_pixels, image_folder,
                                                                           tmp_path):
    """Content bound to its place (train): the image path checks every image's bytes against the crc32c extract
    recorded, so a same-size replacement stops training (naming the image) or, under --on-error skip, is left out
    and counted."""
    data = tmp_path / "images"
    shutil.copytree(image_folder, data)
    key = "class001/img000004.jpg"
    raw = bytearray((data / key).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (data / key).write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        train(micro_train_config(data, micro_cache_no_pixels, tmp_path / "fail", epochs=1, steps=None))
    assert key in one_line(e.value) and "changed since the cache was extracted" in str(e.value)
    train(micro_train_config(data, micro_cache_no_pixels, tmp_path / "skip", epochs=1, steps=None, on_error="skip"))
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["skipped_views"] for r in records) == 1


@pytest.mark.parametrize("blr", [0.0, -1.0, float("nan"), float("inf")])
def test_a_learning_rate_that_is_not_positive_and_finite_is_refused(micro_cache, image_folder, tmp_path, blr):
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, micro_cache, tmp_path / "r", blr=blr))
    assert "--blr" in one_line(e.value)
    assert not (tmp_path / "r").exists()


def test_weights_that_become_non_finite_stop_the_run_and_are_never_saved(micro_cache, image_folder, tmp_path,
                                                                         monkeypatch):
    """An update that makes the weights NaN/Inf (here the only step's, whose loss was still finite) stops the run
    like a non-finite loss: no checkpoint of those weights is written, so export has nothing to export."""
    from g2sd_cache.distill import Distiller
    step = Distiller.optimizer_step

    def overflowing_step(self, lr):
        step(self, lr)
        with torch.no_grad():
            next(self.student.parameters()).view(-1)[0] = float("inf")
    monkeypatch.setattr(Distiller, "optimizer_step", overflowing_step)
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, micro_cache, tmp_path / "r", steps=1))
    assert "weights became NaN or Inf" in one_line(e.value)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_sigint_saves_a_checkpoint_and_stops(micro_cache, tmp_path):
    """Ctrl-C is a preemption like SIGTERM: the run saves a checkpoint at the next step and exits 0."""
    run = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, "-m", "g2sd_cache.cli", "train", "--cache", str(micro_cache), "--out",
                             str(run), "--student", MICRO_STUDENT, "--steps", "100000", "--batch-size", "2",
                             "--device", "cpu", "--log-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 1 <= ckpt["step"] < 100000 and "stopped at step" in out and "interrupted" in err + out


def test_resume_drops_the_metrics_of_steps_it_redoes_and_records_what_changed(micro_cache, image_folder, tmp_path):
    """After a crash past the last checkpoint, metrics.jsonl holds steps the resumed run redoes: they are dropped,
    so every step appears once. Changing the schedule (--steps, --blr) on resume is accepted with a printed note
    that config.yaml records."""
    run = tmp_path / "r"
    train(micro_train_config(image_folder, micro_cache, run, steps=6, stop_after=2))
    with open(run / "metrics.jsonl", "a") as f:          # what a run killed after logging steps 3 and 4 leaves
        for step in (3, 4):
            f.write(json.dumps({"step": step, "loss": 99.0}) + "\n")
    train(micro_train_config(image_folder, micro_cache, run, steps=7, blr=2e-4, resume=True))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 8)) and all(r["loss"] != 99.0 for r in records)
    config = (run / "config.yaml").read_text()
    assert "steps: 6 -> 7" in config and "blr: 0.00015 -> 0.0002" in config
