"""Promise 2, nothing silently wrong is read: flipped bytes, missing chunks and files, NaN/Inf teacher outputs.

Caches come from the micro teacher at 64 px (tests/conftest.py); corruption is always done on a copy
of the shared `micro_cache`."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from tests.common.helpers import MICRO_TEACHER, micro_extract_config
from g2sd_cache import open_cache
from g2sd_cache.common.errors import CacheCorruptError, UserError
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.models.mae import build_teacher
from g2sd_cache.cache.schema import MANIFEST, TMP_MARK, folder_order
from g2sd_cache.data.sources import FolderSource
from g2sd_cache.generic.train import train
from g2sd_cache.verify.cache import verify_cache
from g2sd_cache.cache.zarr_layout import MAX_UINT_64, parse_layout, read_shard_index
from g2sd_cache.data.views import ViewGeometry, sample_view
from tests.common.faults import assert_complete_shards_sound, chunk_span, copy_cache, flip_byte, micro_train_config, one_line, rerecord, shard_file, view_index


# ----------------------------------------------------------------------------------------------
# 2. a flipped byte

@pytest.mark.parametrize("array,where", [("target", "chunk"), ("mask", "chunk"), ("key", "chunk"), ("pixels", "chunk"),
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
    rerecord(c, "shard-00002")          # also gone from the records: zarr alone would read fill values
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
    rerecord(c, "shard-00001")       # digests as recorded too: only the index check can notice
    assert verify_cache(str(c)).problems == [
        "shard-00001: mask/c/0/0/0: inner chunk 1 (view 0, rows 2..3) is missing (empty in the shard index): zarr "
        "would read it back as fill values"]


def test_reader_refuses_a_chunk_missing_from_its_shard_index(micro_cache, tmp_path):
    """Nothing silently wrong is read (reader): an inner chunk absent from its shard index (file sizes as recorded) is an error when
    read, never fill values (an all-False mask would silently make every patch visible)."""
    c = copy_cache(micro_cache, tmp_path / "c")
    _empty_index_entry(shard_file(c, "shard-00001", "mask", view=0), c / "shard-00001" / "mask", 1)
    rerecord(c, "shard-00001")
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
        rerecord(c, "shard-00000")
        problems = verify_cache(str(c)).problems
        assert len(problems) == 1 and problems[0].startswith("shard-00000: view 1 of ") and \
            "has a scale that is not finite and positive" in problems[0], problems

    c = copy_cache(int4_cache, tmp_path / "swapped")
    group = zarr.open_group(c / "shard-00000", mode="r+")
    t = group["target"][...]
    assert t.dtype == np.uint8 and t.shape[2:] == (17, 16)
    t[:, [0, 1]] = t[:, [1, 0]]
    group["target"][...] = t
    rerecord(c, "shard-00000")
    assert verify_cache(str(c)).ok                                  # checksums and scales hold
    report = verify_cache(str(c), deep=24, data=str(image_folder), device="cpu")
    assert len(report.problems) == 4, report.problems              # 2 images x 2 views
    assert all("stored target differs from the live teacher" in p and "(int4)" in p for p in report.problems)


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
