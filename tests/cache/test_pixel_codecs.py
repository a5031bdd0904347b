"""--pixels jpeg: one JPEG per view, decoded before the teacher sees it, so the cache returns exactly the teacher's pixels."""
import math

import numpy as np
import pytest
import torch

from tests.common.faults import chunk_span, copy_cache, flip_byte, shard_file
from tests.common.helpers import micro_extract_config
from tests.generic.test_train import run_train
from g2sd_cache.cache.pixel_codecs import decode_jpegs, encode_jpeg, grid, tile, untile
from g2sd_cache.cache.reader import open_cache
from g2sd_cache.common.errors import CacheCorruptError, UserError
from g2sd_cache.data.views import normalize_patches
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.models.mae import MAETeacher
from g2sd_cache.verify.cache import verify_cache


@pytest.fixture(scope="module")
def jpeg_cache(image_folder, tmp_path_factory, request):
    """A jpeg cache of `image_folder`, and every input patch batch extract gave the teacher (normalised)."""
    seen: list[torch.Tensor] = []
    original = MAETeacher.targets_visible

    def spy(self, patches, mask, target_layer):
        seen.append(patches.clone())
        return original(self, patches, mask, target_layer)

    mp = pytest.MonkeyPatch()
    mp.setattr(MAETeacher, "targets_visible", spy)
    out = tmp_path_factory.mktemp("cache-jpeg") / "c"
    try:
        run_extract(micro_extract_config(image_folder, out, pixels="jpeg", pixel_quality=80))
    finally:
        mp.undo()
    return out, torch.cat(seen)


def test_tiles_are_a_square_grid_and_untile_inverts_tile():
    assert grid(49) == (7, 7) and grid(4) == (2, 2) and grid(5) == (2, 3)
    patches = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    image = tile(patches)
    assert image.shape == (32, 48, 3)
    assert np.array_equal(image[16:32, 0:16], patches[3]) and not image[16:32, 32:48].any()   # row-major, rest black
    back = untile(torch.from_numpy(image).permute(2, 0, 1), 5, 16)
    assert torch.equal(back, torch.from_numpy(patches))


def test_a_jpeg_is_close_to_its_patches_and_decodes_the_same_every_time():
    rng = np.random.default_rng(1)
    smooth = np.cumsum(rng.integers(-3, 4, (4, 16, 16, 3)), axis=2).clip(-60, 60) + 128
    patches = smooth.astype(np.uint8)
    blob = encode_jpeg(patches, 90)
    assert blob[:2] == b"\xff\xd8" and len(blob) < patches.nbytes
    a, b = decode_jpegs([blob, blob], 4, 16)
    assert torch.equal(a, b)
    err = (a.int() - torch.from_numpy(patches).int()).abs().float().mean().item()
    assert 0 < err < 3.0      # lossy, but close: mean absolute error under 3 of 255


def test_the_cache_returns_exactly_the_pixels_the_teacher_was_given(jpeg_cache, micro_cache):
    """Bit equality between what extract fed the teacher and what the reader returns, view by view; and the
    JPEG really is lossy (the exact-pixel cache of the same views differs), so the equality says something."""
    out, seen = jpeg_cache
    cache, exact = open_cache(str(out)), open_cache(str(micro_cache))
    assert cache.manifest.pixels == "jpeg" and cache.manifest.pixel_encoding == {
        "quality": 80, "subsampling": "4:4:4", "decoder": "cpu"}
    given = {t.numpy().tobytes() for t in seen}
    assert len(given) == len(cache) == 24
    lossy = 0
    for i in range(len(cache)):
        rec = cache[i]
        assert normalize_patches(rec.pixels[None])[0].numpy().tobytes() in given, f"view {i}"
        lossy += not torch.equal(rec.pixels, exact[i].pixels)
    assert lossy == len(cache)
    # the block read of the training path decodes the same pixels
    rows = np.array([2, 0, 3])
    out_px = np.zeros((3, *cache.pixel_shape), dtype=np.uint8)
    cache.take(1, 1, rows, {"pixels": out_px}, np.arange(3))
    for j, r in enumerate(rows):
        assert np.array_equal(out_px[j], cache.read_block(1, 1, r, r + 1).pixels[0])


def test_a_jpeg_cache_is_smaller_than_exact_pixels(jpeg_cache, micro_cache):
    sizes = {}
    for name, path in (("jpeg", jpeg_cache[0]), ("visible", micro_cache)):
        m = open_cache(str(path)).manifest
        sizes[name] = sum(n for s in m.shards for rel, n in s.files.items() if rel.startswith(("jpeg/", "pixels/")))
    assert sizes["jpeg"] < 0.8 * sizes["visible"], sizes


def test_a_jpeg_cache_trains_without_data_and_equals_replay_through_the_live_teacher(jpeg_cache, tmp_path):
    """No --data: the student reads the decoded JPEGs; the live teacher on those same pixels gives the stored
    targets within fp16 rounding (if the teacher had seen the exact pixels, the error would be the JPEG's, ~1e-2)."""
    out = str(jpeg_cache[0])
    cached = run_train(tmp_path / "cached", None, cache=out, steps=6)
    replay = run_train(tmp_path / "replay", None, cache=out, teacher="random", steps=6)
    assert [m["step"] for m in cached] == list(range(1, 7))
    for a, b in zip(cached, replay):
        assert math.isfinite(a["loss"])
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-5)
        assert b["replay_rel_rmse"] < 1e-3


def test_verify_and_the_reader_name_a_flipped_byte_in_a_stored_jpeg(jpeg_cache, tmp_path):
    bad = copy_cache(jpeg_cache[0], tmp_path / "bad")
    path = shard_file(bad, "shard-00001", "jpeg", view=0)
    off, nbytes = chunk_span(path, bad / "shard-00001" / "jpeg", 1)
    flip_byte(path, off + nbytes // 2)
    report = verify_cache(str(bad))
    assert not report.ok
    assert any("shard-00001" in p and "jpeg/c/0/0: inner chunk 1" in p and "crc32c" in p for p in report.problems), \
        report.problems
    cache = open_cache(str(bad))
    with pytest.raises(CacheCorruptError, match="shard-00001.*jpeg/c/0/0: inner chunk 1 fails its crc32c"):
        cache.read_block(1, 0, 2, 4)
    assert cache.read_block(1, 0, 0, 2).pixels.shape[0] == 2      # the other chunk of that file still reads


def test_verify_with_data_re_encodes_the_views_and_finds_the_stored_jpegs(jpeg_cache, image_folder):
    report = verify_cache(str(jpeg_cache[0]), data=str(image_folder), pixel_views=None)
    assert report.ok, report.problems
    assert report.summary["pixel_views_checked"] == 24
    deep = verify_cache(str(jpeg_cache[0]), deep=6)      # the live teacher on the decoded JPEGs: the stored targets
    assert deep.ok, deep.problems


def test_a_bad_pixel_quality_or_mode_is_one_line(image_folder, tmp_path):
    with pytest.raises(UserError, match="--pixel-quality 0: must be between 1 and 100"):
        run_extract(micro_extract_config(image_folder, tmp_path / "q", pixels="jpeg", pixel_quality=0))
    with pytest.raises(UserError, match="--pixels png: choose visible, lossless, jpeg, none"):
        run_extract(micro_extract_config(image_folder, tmp_path / "p", pixels="png"))
