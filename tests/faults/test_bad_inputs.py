"""Promise 4, bad inputs are named: unreadable images, corrupt tars, the folder scan.

Caches come from the micro teacher at 64 px (tests/conftest.py); corruption is always done on a copy
of the shared `micro_cache`."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.common.helpers import micro_extract_config
from g2sd_cache import open_cache
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.cache.schema import MANIFEST
from g2sd_cache.data.sources import FolderSource
from g2sd_cache.data.synthetic import jpeg_bytes, make_tar_shards, synthetic_image
from g2sd_cache.verify.cache import verify_cache
from tests.common.faults import one_line, shard_arrays, tar_with_members


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


@pytest.fixture(scope="module")
def faulty_tars(tmp_path_factory) -> Path:
    """Two tars: tar 0 has 3 good samples and one whose .jpg is garbage; tar 1 has 3 good samples and is cut
    off half-way through its last member."""
    root = tmp_path_factory.mktemp("tars")
    images = [jpeg_bytes(synthetic_image(50 + i, (96, 80))) for i in range(6)]
    tar_with_members(root / "train-000000.tar", [(f"s{i:03d}.jpg", images[i]) for i in range(3)]
                      + [("bad0.jpg", b"\xff\xd8\xff garbage, not a JPEG")])
    tar_with_members(root / "train-000001.tar", [(f"s{i:03d}.jpg", images[i]) for i in range(3, 6)])
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
    import g2sd_cache.data.sources as sources
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
    tar_with_members(path, [(f"s{i}.jpg", images[i]) for i in range(3)])
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
    from g2sd_cache.data.views import decode_image
    wide = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    got = np.asarray(decode_image(buf.getvalue()))
    assert got.shape == (48, 64, 3) and np.array_equal(got[..., 0], (wide >> 8).astype(np.uint8))
    assert (got == 255).mean() < 0.01
