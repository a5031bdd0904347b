"""The fault-injection suite (issue 6): each test breaks one thing and checks the promise in its docstring.

Caches come from the micro teacher at 64 px (tests/conftest.py), so every extract takes about a second;
corruption is always done on a copy of the shared `micro_cache`. Promise 8 (resume, multi-rank
exactly-once) is covered by the trainer's tests.
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

from conftest import MICRO_STUDENT, MICRO_TEACHER, micro_extract_config
from g2sd_cache import open_cache
from g2sd_cache.errors import CacheCorruptError, UserError
from g2sd_cache.extract import run_extract
from g2sd_cache.models import STUDENT_PRESETS, ViTShape, build_teacher
from g2sd_cache.schema import MANIFEST, SHARD_RECORD, TMP_MARK, Manifest
from g2sd_cache.sources import FolderSource
from g2sd_cache.synthetic import jpeg_bytes, make_image_folder, make_tar_shards, synthetic_image
from g2sd_cache.train import TrainConfig, train
from g2sd_cache.verify import main as verify_main, verify_cache
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


def run_verify_cli(*argv: str) -> tuple[int, str]:
    """`g2sd-cache verify ...` through its own argparse entry point, in a subprocess (exit code, stdout+stderr)."""
    proc = subprocess.run([sys.executable, "-m", "g2sd_cache.verify", *argv], capture_output=True, text=True,
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
    assert s["deep"]["views"] == 6 and s["deep"]["worst_rel_rmse"] < 1e-3   # fp16 loses ~2e-4
    text = report.format_summary()
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
    assert verify_main([str(micro_cache), "--deep", "2"]) == 2
    assert "pass --data" in capsys.readouterr().err


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
    """After a deliberate rewrite, update the recorded file sizes (so only content checks can notice)."""
    files = {p.relative_to(cache / shard).as_posix(): p.stat().st_size
             for p in sorted((cache / shard).rglob("*")) if p.is_file() and p.name != SHARD_RECORD}
    rec = json.loads((cache / shard / SHARD_RECORD).read_text())
    rec["files"] = files
    (cache / shard / SHARD_RECORD).write_text(json.dumps(rec))
    m = json.loads((cache / MANIFEST).read_text())
    for e in m["shards"]:
        if e["name"] == shard:
            e["files"] = files
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
    assert any("shard-00003: image 0 (class000/img000000.jpg) is also in shard-00000" in p for p in problems), problems
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
    assert verify_cache(str(c)).problems == [
        "shard-00001: 1 mask(s) do not keep 4 of 16 patches visible, e.g. view 1 of row 2 (class001/img000007.jpg) "
        "keeps 16"]
    problems = verify_cache(str(c), data=str(image_folder)).problems
    assert sum("does not lie inside" in p and "view 0 of class001/img000001.jpg" in p for p in problems) == 1, problems
    assert any("view 0 of class001/img000004.jpg: stored crop is not the view" in p for p in problems), problems
    assert any("view 1 of class001/img000007.jpg: stored mask is not the view" in p for p in problems), problems


# ----------------------------------------------------------------------------------------------
# 1. kill -9 during extract

@pytest.mark.slow
def test_kill9_during_extract_then_rerun_equals_uninterrupted(tmp_path):
    """Promise 1: `kill -9` of extract at a random moment (twice: at a random point of a fresh run, then in the
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
    """Promise 2 (verify and reader): one byte flipped inside an inner chunk or a shard index: verify names the
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
    """Promise 2 (train): with a flipped byte in the targets of view 0, rows 2..3 of shard-00001, `train`
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
    """Promise 3: a shard file (the zarr file holding a run of inner chunks) deleted: reading a view in it raises
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
    """Promise 3: a whole shard folder deleted: reading it raises CacheCorruptError, verify reports it."""
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
    """Promise 3 (verify): an inner chunk marked absent in its shard's index (valid index checksum, file sizes
    as recorded) is reported: zarr alone would read it back as fill values."""
    c = copy_cache(micro_cache, tmp_path / "c")
    path = shard_file(c, "shard-00001", "mask", view=0)
    _empty_index_entry(path, c / "shard-00001" / "mask", 1)
    assert verify_cache(str(c)).problems == [
        "shard-00001: mask/c/0/0/0: inner chunk 1 (view 0, rows 2..3) is missing (empty in the shard index): zarr "
        "would read it back as fill values"]


def test_reader_refuses_a_chunk_missing_from_its_shard_index(micro_cache, tmp_path):
    """Promise 3 (reader): an inner chunk absent from its shard index (file sizes as recorded) is an error when
    read, never fill values (an all-False mask would silently make every patch visible)."""
    c = copy_cache(micro_cache, tmp_path / "c")
    _empty_index_entry(shard_file(c, "shard-00001", "mask", view=0), c / "shard-00001" / "mask", 1)
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


def test_disk_full_during_extract_fails_cleanly_and_rerun_completes(micro_cache, image_folder, tmp_path, monkeypatch):
    """Promise 4: the disk fills up (ENOSPC half-way through a file of the second shard): extract raises an
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
    """Promise 4: the disk fills up while manifest.json is written: extract raises, no manifest.json exists
    (the cache is not readable as finished), and a rerun with space (a new process) writes it, leaves no
    temporary file behind and verifies clean."""
    import pathlib
    out = tmp_path / "c"
    original = pathlib.Path.write_text

    def write_text(self, text, *a, **k):
        if self.name.startswith(MANIFEST + TMP_MARK):
            original(self, text[: len(text) // 2], *a, **k)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return original(self, text, *a, **k)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
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
    """Promise 5 (skip): a truncated JPEG, a zero-byte file and a non-image with an image suffix are skipped,
    counted and listed (with the reason) in the manifest; every good image is cached, and verify passes with
    --data (the counts add up: cached + skipped = listed)."""
    out = tmp_path / "c"
    summary = run_extract(micro_extract_config(faulty_folder, out, on_error="skip"))
    assert summary["skipped_images"] == 3
    m = Manifest.from_json((out / MANIFEST).read_text())
    assert sorted(s["key"] for s in m.skipped) == sorted(BAD_KEYS)
    assert all(s["error"] for s in m.skipped)
    assert m.images == 12 and m.source["count"] == 15
    report = verify_cache(str(out), data=str(faulty_folder))
    assert report.ok, report.problems
    cache = open_cache(str(out))
    assert sorted({cache[i].key for i in range(len(cache))}) == sorted(FolderSource.scan(str(image_folder)).keys)


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_image_stops_extract_under_fail(image_folder, tmp_path, bad):
    """Promise 5 (fail): each bad input alone stops extract with a one-line UserError naming its path."""
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
    """Promise 5 (tars, skip): a member that is not an image and a tar cut off inside a member: the good
    samples are cached, the bad ones skipped and listed, verify passes with --data."""
    spec = str(faulty_tars / "train-{000000..000001}.tar")
    out = tmp_path / "c"
    run_extract(micro_extract_config(spec, out, on_error="skip"))
    m = Manifest.from_json((out / MANIFEST).read_text())
    assert m.images == 5, m.skipped
    keys = [s["key"] for s in m.skipped]
    assert "bad0" in keys
    assert any("train-000001.tar" in k and "unexpected end" in s["error"] for k, s in zip(keys, m.skipped)), m.skipped
    report = verify_cache(str(out), data=spec)
    assert report.ok, report.problems


@pytest.mark.parametrize("which", ["member", "truncated"])
def test_corrupt_tar_member_stops_extract_under_fail(faulty_tars, tmp_path, which):
    """Promise 5 (tars, fail): a non-image member / a truncated tar stops extract with a one-line UserError."""
    root = tmp_path / "t"
    root.mkdir()
    src = faulty_tars / ("train-000000.tar" if which == "member" else "train-000001.tar")
    shutil.copy(src, root / src.name)
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(str(root / src.name), tmp_path / "c", on_error="fail"))
    msg = one_line(e.value)
    assert ("bad0" in msg) if which == "member" else ("train-000001.tar" in msg and "unexpected end" in msg)


def test_corrupt_tar_header_is_not_silent(tmp_path):
    """Promise 5 (tars): a member whose tar header is corrupt makes the samples after it unreadable: they must be
    listed as skipped (or stop extract under fail), never silently dropped from the cache."""
    [path] = make_tar_shards(tmp_path / "tars", 4, 4, seed=5)
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        second = tar.getmembers()[1]
    data[second.offset + 150] ^= 0xFF                         # inside the header's checksum field
    path.write_bytes(bytes(data))
    out = tmp_path / "c"
    run_extract(micro_extract_config(str(path), out, on_error="skip"))
    m = Manifest.from_json((out / MANIFEST).read_text())
    assert m.images == 4 or m.skipped, f"{4 - m.images} of 4 samples dropped silently: {m.images} cached, none skipped"


# ----------------------------------------------------------------------------------------------
# 6. configuration faults

def test_train_refuses_a_different_source_listing(micro_cache, image_folder, tmp_path):
    """Promise 6: train refuses, in one line, a cache whose source listing differs from --data (an image added)."""
    data = tmp_path / "img"
    shutil.copytree(image_folder, data)
    (data / "class000" / "extra.jpg").write_bytes(jpeg_bytes(synthetic_image(999, (100, 90))))
    with pytest.raises(UserError) as e:
        train(micro_train_config(data, micro_cache, tmp_path / "run"))
    assert "--data" in one_line(e.value) and "not the dataset the cache was extracted from" in str(e.value)


def test_train_refuses_another_teacher_in_replay_mode(micro_cache, image_folder, tmp_path):
    """Promise 6: in replay mode train refuses, in one line, a teacher whose weights differ from the cache's."""
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, micro_cache, tmp_path / "run", teacher="random:1"))
    assert "not the teacher that made the cache" in one_line(e.value)


def test_train_refuses_a_student_with_another_patch_size(micro_cache, image_folder, tmp_path, monkeypatch):
    """Promise 6: train refuses, in one line, a student whose patch size differs from the cache's views."""
    monkeypatch.setitem(STUDENT_PRESETS, "test_vit_micro_patch8", ViTShape(8, 48, 2, 2, 32, 1, 1))
    with pytest.raises(UserError) as e:
        train(micro_train_config(image_folder, micro_cache, tmp_path / "run", student="test_vit_micro_patch8"))
    assert "patch size 8" in one_line(e.value)


@pytest.mark.parametrize("change", [{"teacher": "random:1"}, {"target_layer": 3}, {"mask_ratio": 0.5},
                                    {"img_size": 32}, {"arch": "mae_vit_base_patch16"}])
def test_extract_refuses_rerun_with_another_configuration(micro_cache, image_folder, tmp_path, change):
    """Promise 6: rerunning extract into an existing cache with another teacher, target layer, mask ratio, image
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
    """Promise 7 (NaN): a checkpoint with NaN in the positional embedding of one patch poisons exactly the views
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
    """Promise 7 (Inf): Inf in a decoder weight makes every output non-finite: extract stops at the first view
    (first image, view 0) with a one-line UserError, and writes no shard at all."""
    ckpt = _poisoned_checkpoint(tmp_path / "inf.pth", "decoder_blocks.0.mlp.fc1.weight", (3, 5), float("inf"))
    out = tmp_path / "c"
    with pytest.raises(UserError) as e:
        run_extract(micro_extract_config(image_folder, out, teacher=str(ckpt)))
    first = FolderSource.scan(str(image_folder)).keys[0]
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
    """Promise 9: a DataLoader with 2 fork-started workers reads a cache that the parent has already opened and
    read (zarr's IO thread running), returns the same targets as the parent, and finishes within a timeout
    (a deadlock fails the test instead of hanging the suite)."""
    try:
        proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(micro_cache)], capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("forked DataLoader workers did not finish within 180 s: deadlock after fork")
    assert proc.returncode == 0 and proc.stdout.startswith("OK 24"), proc.stderr[-3000:]
