"""The cache reader: `open_cache` API, block reads, bytes per view, and corruption (never fill values)."""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import g2sd_cache
from g2sd_cache import open_cache
from g2sd_cache.common.errors import CacheCorruptError, UserError
from g2sd_cache.cache.schema import FORMAT_VERSION, MANIFEST, folder_order

T, D, L = 17, 32, 16  # micro teacher at 64 px



@pytest.fixture
def cache_copy(micro_cache, tmp_path) -> Path:
    """A private copy of conftest's micro cache (12 images x 2 views, 3 shards of 4 images), to damage."""
    dst = tmp_path / "c"
    shutil.copytree(micro_cache, dst)
    return dst


def test_open_cache_api(micro_cache):
    assert g2sd_cache.open_cache is open_cache
    cache = open_cache(str(micro_cache))
    assert len(cache) == 24 and cache.views_per_image == 2
    keys = set()
    for i in range(len(cache)):
        r = cache[i]
        assert isinstance(r, g2sd_cache.ViewRecord)
        assert isinstance(r.key, str) and r.key.endswith(".jpg")
        assert isinstance(r.source_index, int) and isinstance(r.view, int) and r.view in (0, 1)
        assert isinstance(r.crop, tuple) and len(r.crop) == 4 and all(type(c) is int for c in r.crop)
        top, left, h, w = r.crop
        assert top >= 0 and left >= 0 and h > 0 and w > 0
        assert type(r.flip) is bool
        assert r.mask.dtype == torch.bool and r.mask.shape == (L,) and int((~r.mask).sum()) == 4
        assert r.target.dtype == torch.float32 and r.target.shape == (T, D)
        assert torch.isfinite(r.target).all()
        # LayerNorm-ed tokens, up to fp16 rounding
        assert float(r.target.mean(-1).abs().max()) < 1e-2
        keys.add((r.key, r.view))
    assert len(keys) == 24
    with pytest.raises(IndexError):
        cache[24]
    with pytest.raises(IndexError):
        cache[-1]
    # Path objects work as well as strings
    assert open_cache(micro_cache)[3].key == cache[3].key


def test_locate_and_read_block_agree_with_getitem(micro_cache):
    cache = open_cache(micro_cache)
    assert [cache.locate(i) for i in (0, 3, 4, 7, 8, 23)] == [(0, 0, 0), (0, 0, 3), (0, 1, 0), (0, 1, 3),
                                                              (1, 0, 0), (2, 1, 3)]
    b = cache.read_block(1, 1, 1, 4)
    assert len(b) == 3 and (b.shard, b.view, b.start, b.stop) == (1, 1, 1, 4)
    assert b.codes.shape == (3, T, D) and b.codes.dtype == np.float16 and b.scale is None
    assert b.mask.shape == (3, L) and b.crop.shape == (3, 4) and b.flip.shape == (3,)
    assert b.source_index.tolist() == folder_order(0, 12)[5:8].tolist()  # shard 1: positions 4..8 of the order
    # wrong indices are the caller's IndexError, never clipped and never reported as corruption
    for args in [(1, 2, 0, 1), (1, 0, 0, 5), (1, 0, 3, 2), (1, -1, 0, 1), (3, 0, 0, 1)]:
        with pytest.raises(IndexError):
            cache.read_block(*args)
    assert len(cache.read_block(1, 0, 4, 4)) == 0
    targets = cache.decode(b.codes, b.scale)
    assert targets.dtype == torch.float32 and targets.shape == (3, T, D)
    for j in range(3):
        r = cache[8 + 4 + 1 + j]  # shard 1 starts at view 8; view 1 of its images starts 4 later
        assert (r.key, r.source_index, r.view) == (str(b.key[j]), int(b.source_index[j]), 1)
        assert torch.equal(r.target, targets[j])
        assert torch.equal(r.mask, torch.from_numpy(b.mask[j]))
        assert r.crop == tuple(b.crop[j].tolist()) and r.flip == bool(b.flip[j])


def test_iter_blocks_in_global_view_order(micro_cache):
    cache = open_cache(micro_cache)
    blocks = list(cache.iter_blocks())
    assert all(len(b) == cache.manifest.chunk_views == 2 for b in blocks)  # default: one inner chunk
    flat = [(str(k), b.view) for b in blocks for k in b.key]
    assert flat == [(cache[i].key, cache[i].view) for i in range(len(cache))]
    # larger blocks, and one view only (an epoch's reads): every image once, view 1 only
    blocks = list(cache.iter_blocks(block_images=3, views=[1]))
    assert [len(b) for b in blocks] == [3, 1, 3, 1, 3, 1]
    assert all(b.view == 1 for b in blocks)
    idx = [int(s) for b in blocks for s in b.source_index]
    assert idx == folder_order(0, 12).tolist()   # the seeded order in which extract dealt the images
    stacked = torch.cat([cache.decode(b.codes, b.scale) for b in blocks])
    singles = torch.stack([cache[i].target for i in range(len(cache)) if cache.locate(i)[1] == 1])
    assert torch.equal(stacked, singles)


def test_cache_survives_pickling(micro_cache):
    cache = open_cache(micro_cache)
    first = cache[9]
    clone = pickle.loads(pickle.dumps(cache))
    assert not clone._files and not clone._groups
    again = clone[9]
    assert again.key == first.key and torch.equal(again.target, first.target)


def test_bytes_per_view(micro_cache):
    """fp16 targets cost T x D x 2 bytes per view; everything else is a small overhead. The same per-view
    overhead at ViT-B's geometry keeps a view within 2 % of 197 x 512 x 2 B (the issue's target)."""
    m = json.loads((micro_cache / MANIFEST).read_text())
    views = m["views"]
    assert views == 24
    target = sum(size for s in m["shards"] for f, size in s["files"].items() if f.startswith("target/c/"))
    payload = views * T * D * 2
    # each inner chunk adds a crc32c (4 B); each shard file an index of 16 B per chunk + crc32c
    assert payload <= target <= payload * 1.03
    meta = sum(size for s in m["shards"] for f, size in s["files"].items() if f.endswith("zarr.json"))
    # the visible patches as rendered: n_keep x p x p x 3 uint8 per view (+ the same chunk overheads)
    pixels = sum(size for s in m["shards"] for f, size in s["files"].items() if f.startswith("pixels/c/"))
    pixel_payload = views * (L // 4) * 16 * 16 * 3
    assert pixel_payload <= pixels <= pixel_payload * 1.03
    other = sum(size for s in m["shards"] for f, size in s["files"].items()
                if not f.startswith(("target/", "pixels/")) and not f.endswith("zarr.json"))
    per_view_other = other / views
    per_shard_meta = meta / len(m["shards"])
    assert per_view_other < L + 120, per_view_other       # mask, crop, flip, index, key + chunk overheads
    assert per_shard_meta < 14_000, per_shard_meta           # eight zarr.json files
    # what that means at 224 px for a ViT-B teacher (L = 196, T x D = 197 x 512) with 2048-view shards
    vitb = 197 * 512 * 2
    per_view = vitb * target / payload + (per_view_other - L + 196) + per_shard_meta / 2048
    assert per_view < 1.02 * vitb, per_view / vitb
    # the manifest's sizes are the files' sizes
    for s in m["shards"]:
        for f, size in s["files"].items():
            assert (micro_cache / s["name"] / f).stat().st_size == size


@pytest.mark.parametrize("codec,bytes_per_value", [("int8", 1), ("fp8", 1), ("bf16", 2)])
def test_bytes_per_view_of_other_codecs(codec, bytes_per_value, image_folder, tmp_path):
    from tests.common.helpers import micro_extract_config

    from g2sd_cache.generic.extract import run_extract
    run_extract(micro_extract_config(image_folder, tmp_path / "c", codec=codec, views=1, shard_size=12,
                                     chunk_views=4))
    m = json.loads((tmp_path / "c" / MANIFEST).read_text())
    files = m["shards"][0]["files"]
    target = sum(v for f, v in files.items() if f.startswith("target/c/"))
    scale = sum(v for f, v in files.items() if f.startswith("scale/c/"))
    assert 12 * T * D * bytes_per_value <= target <= 12 * T * D * bytes_per_value * 1.03
    if bytes_per_value == 1:
        assert 12 * T * 4 <= scale <= 12 * T * 4 * 1.1  # one float32 scale per token
    else:
        assert scale == 0
    cache = open_cache(tmp_path / "c")
    assert cache[0].target.dtype == torch.float32 and cache[0].target.shape == (T, D)


# ----------------------------------------------------------------------------------------------
# not a cache / incomplete / other version

def test_open_cache_refuses_what_is_not_a_finished_cache(tmp_path, cache_copy):
    with pytest.raises(UserError, match="not a g2sd-cache cache"):
        open_cache(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a g2sd-cache cache"):
        open_cache(tmp_path / "plain")
    m = json.loads((cache_copy / MANIFEST).read_text())
    m["format_version"] = 99
    (cache_copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UserError, match="format version 99"):
        open_cache(cache_copy)
    # a damaged manifest is a one-line user error, not a JSON traceback
    no_shards = {k: v for k, v in m.items() if k != "shards"} | {"format_version": FORMAT_VERSION}
    for text in ["{", "[1, 2]", json.dumps(no_shards)]:
        (cache_copy / MANIFEST).write_text(text)
        with pytest.raises(UserError) as e:
            open_cache(cache_copy)
        assert "manifest" in str(e.value) and "\n" not in str(e.value)
    # a cache of the first format (no stored pixels, no pixels field) is refused in one line, never misread
    (cache_copy / MANIFEST).write_text(json.dumps({k: v for k, v in m.items() if k != "pixels"} | {"format_version": 1}))
    with pytest.raises(UserError, match="format version 1.*re-extract"):
        open_cache(cache_copy)
    (cache_copy / MANIFEST).unlink()
    with pytest.raises(UserError, match="incomplete"):
        open_cache(cache_copy)


# ----------------------------------------------------------------------------------------------
# corruption: a missing or damaged file is an error, never fill values

def _views_of_shard(cache, shard, view=None):
    return [i for i in range(len(cache)) if cache.locate(i)[0] == shard and (view is None or cache.locate(i)[1] == view)]


def test_missing_chunk_file_raises_on_a_fresh_open(cache_copy):
    chunk = cache_copy / "shard-00001" / "target" / "c" / "1" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    cache = open_cache(cache_copy)
    assert cache[0].target.abs().sum() > 0  # other shards are fine
    for i in _views_of_shard(cache, 1):
        with pytest.raises(CacheCorruptError, match="shard-00001") as e:
            cache[i]
        assert "target/c/1/0/0/0" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CacheCorruptError):
        list(cache.iter_blocks())


def test_chunk_file_deleted_after_the_shard_was_opened_never_reads_as_zeros(cache_copy):
    """The manifest's file check runs once per process. A file deleted after this process mapped it still
    reads back its true contents (the map keeps the inode alive); a file deleted before it was opened
    raises. Never fill values."""
    cache = open_cache(cache_copy)
    i = _views_of_shard(cache, 2, view=1)[0]
    first = cache[i]
    assert first.target.abs().sum() > 0
    (cache_copy / "shard-00002" / "target" / "c" / "1" / "0" / "0" / "0").unlink()
    again = cache[i]
    assert torch.equal(again.target, first.target) and torch.equal(again.mask, first.mask)
    with pytest.raises(CacheCorruptError, match="shard-00002"):
        open_cache(cache_copy)[i]
    # the per-view arrays of a view not yet opened in this process
    j = _views_of_shard(cache, 2, view=0)[0]
    (cache_copy / "shard-00002" / "mask" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(CacheCorruptError, match="shard-00002"):
        cache[j]


def test_missing_shard_folder_or_metadata_raises(cache_copy):
    shutil.rmtree(cache_copy / "shard-00002")
    (cache_copy / "shard-00001" / "crop" / "zarr.json").unlink()
    cache = open_cache(cache_copy)
    assert cache[0].key
    with pytest.raises(CacheCorruptError, match="shard-00002"):
        cache[_views_of_shard(cache, 2)[0]]
    with pytest.raises(CacheCorruptError, match="shard-00001"):
        cache[_views_of_shard(cache, 1)[0]]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_chunk_raises(cache_copy, micro_cache):
    chunk = cache_copy / "shard-00001" / "target" / "c" / "0" / "0" / "0" / "0"
    size = chunk.stat().st_size
    _flip_byte(chunk, size // 2)
    assert chunk.stat().st_size == size  # the size check cannot see it: the crc32c must
    cache = open_cache(cache_copy)
    good = open_cache(micro_cache)
    raised = 0
    for i in _views_of_shard(cache, 1, view=0):
        try:
            r = cache[i]
        except CacheCorruptError as e:
            assert "shard-00001" in str(e) and "\n" not in str(e)
            raised += 1
        else:  # a view in the other inner chunk of the shard file is intact and reads back exactly
            assert torch.equal(r.target, good[i].target)
    assert raised == 2  # the damaged inner chunk holds 2 images
    with pytest.raises(CacheCorruptError):
        cache.read_block(1, 0, 0, 4)


@pytest.mark.parametrize("where", ["start", "index"])
def test_flipped_byte_elsewhere_in_a_shard_file_raises(cache_copy, where):
    chunk = cache_copy / "shard-00000" / "mask" / "c" / "1" / "0" / "0"
    size = chunk.stat().st_size
    _flip_byte(chunk, 1 if where == "start" else size - 10)  # first inner chunk / the shard index
    cache = open_cache(cache_copy)
    with pytest.raises(CacheCorruptError, match="shard-00000"):
        cache.read_block(0, 1, 0, 4)


def test_truncated_chunk_file_raises(cache_copy):
    chunk = cache_copy / "shard-00000" / "target" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-100])
    cache = open_cache(cache_copy)
    with pytest.raises(CacheCorruptError, match="bytes"):
        cache[0]


def test_a_cache_on_an_fsspec_url_reads_the_same_as_on_disk(micro_cache):
    """Remote caches (any fsspec URL) go through zarr instead of memory maps; the records are the same."""
    import os

    import fsspec
    fs = fsspec.filesystem("memory")
    for folder, _, files in os.walk(micro_cache):
        for f in files:
            path = os.path.join(folder, f)
            fs.pipe(f"/remote-cache/{os.path.relpath(path, micro_cache)}", open(path, "rb").read())
    remote, local = open_cache("memory://remote-cache"), open_cache(micro_cache)
    assert not remote._local and len(remote) == len(local)
    for i in (0, 7, len(local) - 1):
        a, b = remote[i], local[i]
        assert (a.key, a.crop, a.flip) == (b.key, b.crop, b.flip)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.target, b.target)
    fs.rm("/remote-cache/shard-00001/target/c/0/0/0/0")
    with pytest.raises(CacheCorruptError, match="shard-00001"):
        open_cache("memory://remote-cache").read_block(1, 0, 0, 2)
