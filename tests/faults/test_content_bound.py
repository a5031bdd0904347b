"""Promise 3, content bound to its place: files swapped, moved or copied in, manifests edited, images replaced.

Caches come from the micro teacher at 64 px (tests/conftest.py); corruption is always done on a copy
of the shared `micro_cache`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.common.helpers import micro_extract_config
from g2sd_cache import open_cache
from g2sd_cache.common.errors import CacheCorruptError, UserError
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.cache.schema import MANIFEST
from g2sd_cache.data.synthetic import jpeg_bytes, synthetic_image
from g2sd_cache.generic.train import train
from g2sd_cache.verify.cache import verify_cache
from tests.common.faults import copy_cache, micro_train_config, one_line, shard_file, tar_with_members, view_index


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
    from g2sd_cache.cache.digests import SourceChangedError, check_image
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
    tar_with_members(path, [("a.jpg", images[0]), ("b.jpg", images[1]), ("a.jpg", images[2]), ("c.jpg", images[3])])
    out = tmp_path / "c"
    run_extract(micro_extract_config(str(path), out))
    m = open_cache(out).manifest
    keys = [str(k) for k in open_cache(str(out)).read_block(0, 0, 0, 3).key]
    assert m.images == 3 and keys == ["a", "b", "c"] and m.source.count == 4
    assert [s["key"] for s in m.skipped] == ["a (second copy)"] and "appears twice" in m.skipped[0]["error"]
    assert verify_cache(str(out), data=str(path)).ok
    with pytest.raises(UserError, match="appears twice"):
        run_extract(micro_extract_config(str(path), tmp_path / "c2", on_error="fail"))


@pytest.fixture(scope="module")
def pca_cache(image_folder, tmp_path_factory) -> Path:
    """A low-rank (pca8) cache of the session images: its codes decode only with its basis.npy."""
    out = tmp_path_factory.mktemp("pca") / "c"
    run_extract(micro_extract_config(image_folder, out, codec="pca8"))
    return out


def _flip_a_basis_bit(c: Path) -> None:
    raw = bytearray((c / "basis.npy").read_bytes())
    raw[-5] ^= 0x01          # the last float's mantissa: same size, still a valid .npy
    (c / "basis.npy").write_bytes(bytes(raw))


def _basis_of_another_cache(c: Path) -> None:
    import numpy as np
    basis = np.load(c / "basis.npy")
    np.save(c / "basis.npy", basis[:, ::-1].copy())   # a sound basis of the same shape, not this cache's


@pytest.mark.parametrize("damage,needle", [
    (lambda c: (c / "basis.npy").unlink(), "basis.npy is missing"),
    (_flip_a_basis_bit, "basis.npy is not the basis the manifest holds"),
    (_basis_of_another_cache, "basis.npy is not the basis the manifest holds"),
    (lambda c: _edit_manifest(c, lambda m: m.pop("basis")), "the manifest records no basis"),
])
def test_a_missing_or_altered_basis_is_refused_by_open_cache_and_flagged_by_verify(pca_cache, image_folder, tmp_path,
                                                                                damage, needle):
    assert verify_cache(str(pca_cache)).problems == []
    c = copy_cache(pca_cache, tmp_path / "c")
    damage(c)
    with pytest.raises(CacheCorruptError) as e:
        open_cache(str(c))
    msg = one_line(e.value)
    assert needle in msg and "re-extract" in msg, msg
    problems = verify_cache(str(c)).problems
    assert any(p.startswith("basis.npy: ") and needle in p for p in problems), problems
    with pytest.raises(UserError, match="basis"):
        train(micro_train_config(image_folder, c, tmp_path / "run"))
