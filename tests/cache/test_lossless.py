"""--pixels lossless: the exact visible patches, filtered and compressed per view; decoded bit for bit."""
import json

import numpy as np
import pytest
import torch

from tests.common.faults import chunk_span, copy_cache, flip_byte, shard_file
from tests.common.helpers import micro_extract_config
from tests.generic.test_train import run_train
from g2sd_cache.cache import lossless
from g2sd_cache.cache.inspect import format_report, inspect_report
from g2sd_cache.cache.reader import open_cache
from g2sd_cache.common.errors import CacheCorruptError
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.verify.cache import verify_cache


@pytest.fixture(scope="module")
def lossless_cache(image_folder, tmp_path_factory):
    """`micro_cache`'s views (same folder, seed and teacher), stored with --pixels lossless."""
    out = tmp_path_factory.mktemp("cache-lossless") / "c"
    run_extract(micro_extract_config(image_folder, out, pixels="lossless"))
    return out


def _round_trip(patches: np.ndarray) -> np.ndarray:
    return lossless.decode([lossless.encode(p) for p in patches], patches.shape[1], patches.shape[2]).numpy()


def test_the_filter_is_the_stated_prediction_on_a_worked_example():
    """One 2 x 2 patch, by hand: c = (R - G, G, B - G) mod 256, then r = c - left - up + up-left mod 256."""
    px = np.array([[[10, 20, 30], [12, 25, 20]],
                   [[200, 0, 255], [0, 255, 0]]], dtype=np.uint8)[None]          # [1, 2, 2, 3]
    # c planes: R-G = [[246, 243], [200, 1]], G = [[20, 25], [0, 255]], B-G = [[10, 251], [255, 1]]
    want = np.array([[[246, 253], [210, 60]],            # 246; 243-246; 200-246; 1-200-243+246 (mod 256)
                     [[20, 5], [236, 250]],              # 20; 25-20; 0-20; 255-0-25+20
                     [[10, 241], [245, 17]]], dtype=np.uint8)[None]   # 10; 251-10; 255-10; 1-255-251+10
    got = lossless.filter_patches(px)
    assert got.shape == (1, 3, 2, 2)
    assert np.array_equal(got, want)
    assert torch.equal(lossless.unfilter(torch.from_numpy(want)), torch.from_numpy(px))


def test_round_trip_is_exact_on_photographs():
    import skimage.data as skimage     # in the test extra: these photographs are bundled, nothing is downloaded
    from g2sd_cache.data.views import ViewGeometry, render_view, sample_view, visible_patches
    from PIL import Image
    g, views = ViewGeometry(), []
    for i, name in enumerate(("astronaut", "coffee", "camera")):
        a = np.asarray(getattr(skimage, name)())
        img = Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]).convert("RGB")
        for v in range(2):
            view = sample_view(0, i, v, img.size, g)
            px = render_view(img, view.crop, view.flip, g.img_size)
            views.append(visible_patches(px[None], torch.from_numpy(view.mask)[None], g.patch_size)[0].numpy())
    patches = np.stack(views)                                   # [6, 49, 16, 16, 3]
    blobs = [lossless.encode(p) for p in patches]
    assert np.array_equal(lossless.decode(blobs, 49, 16).numpy(), patches)
    assert np.mean([len(b) for b in blobs]) < 0.75 * patches[0].nbytes    # it compresses photographs


@pytest.mark.parametrize("kind", ["noise", "zeros", "white", "edges", "channel-extremes", "impulses"])
def test_round_trip_is_exact_on_adversarial_content(kind):
    rng = np.random.default_rng(7)
    shape = (3, 49, 16, 16, 3)
    if kind == "noise":
        x = rng.integers(0, 256, shape, dtype=np.uint8)
    elif kind == "zeros":
        x = np.zeros(shape, np.uint8)
    elif kind == "white":
        x = np.full(shape, 255, np.uint8)
    elif kind == "edges":       # 0/255 checkerboard of single pixels: every prediction wraps around mod 256
        yy, xx = np.indices((16, 16))
        x = np.broadcast_to((((yy + xx) % 2) * 255).astype(np.uint8)[None, None, :, :, None], shape).copy()
    elif kind == "channel-extremes":   # R - G and B - G at both ends of the range
        x = np.zeros(shape, np.uint8)
        x[..., 0], x[..., 1], x[..., 2] = 255, 0, 255
        x[:, ::2, ::3, :, 1] = 255
    else:
        x = np.zeros(shape, np.uint8)
        x[:, :, rng.integers(0, 16, 20), rng.integers(0, 16, 20)] = 255
    assert np.array_equal(_round_trip(x), x)


def test_a_frame_of_the_wrong_size_or_cut_short_is_refused():
    x = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    blob = lossless.encode(x)
    dest = np.empty(lossless.residual_shape(4, 16), np.uint8)
    lossless.decompress_into(blob, dest)
    assert np.array_equal(lossless.unfilter(torch.from_numpy(dest)).numpy(), x)
    with pytest.raises(ValueError, match="says it has"):
        lossless.decompress_into(blob[:-10], dest)
    with pytest.raises(ValueError, match="shorter than its header"):
        lossless.decompress_into(blob[:8], dest)
    with pytest.raises(ValueError, match="frame of 1536 bytes decoded, not the 3072 of a view"):
        lossless.decompress_into(lossless.encode(x[:2]), dest)


def test_the_cache_returns_the_exact_pixels_of_the_visible_cache(lossless_cache, micro_cache):
    cache, exact = open_cache(str(lossless_cache)), open_cache(str(micro_cache))
    assert cache.manifest.pixels == "lossless" and cache.lossless and cache.has_pixels
    assert cache.manifest.pixel_encoding == {"filter": "rgb-g_planar_grad2d", "compressor": {
        "id": "blosc", "cname": "lz4hc", "clevel": 9, "shuffle": 0}}
    assert len(cache) == len(exact) == 24
    for i in range(len(cache)):
        a, b = cache[i], exact[i]
        assert torch.equal(a.pixels, b.pixels), f"view {i}"
        assert torch.equal(a.target, b.target), f"view {i}"     # the teacher saw the same pixels
    rows, at = np.array([3, 0, 2]), np.array([1, 2, 0])
    px = np.zeros((3, *cache.pixel_shape), np.uint8)
    res = np.zeros((3, *cache.residual_shape), np.uint8)
    cache.take(1, 1, rows, {"pixels": px, "lossless": res}, at)
    want = exact.read_block(1, 1, 0, 4).pixels[rows]
    assert np.array_equal(px[at], want)
    assert np.array_equal(lossless.unfilter(torch.from_numpy(res)).numpy()[at], want)   # the host's part only
    assert not np.array_equal(res, px.reshape(res.shape))


def test_training_on_a_lossless_cache_equals_the_visible_cache_loss_for_loss(lossless_cache, micro_cache, tmp_path):
    a = run_train(tmp_path / "lossless", None, cache=str(lossless_cache), steps=6)
    b = run_train(tmp_path / "visible", None, cache=str(micro_cache), steps=6)
    assert [m["step"] for m in a] == list(range(1, 7))
    assert [m["loss"] for m in a] == [m["loss"] for m in b]


def test_replay_through_the_live_teacher_sees_the_stored_targets(lossless_cache, tmp_path):
    """Replay feeds the teacher what the student sees (the residuals undone on the device): the live targets equal
    the stored ones within fp16 rounding; a wrong pixel anywhere would show as a large error."""
    replay = run_train(tmp_path / "replay", None, cache=str(lossless_cache), teacher="random", steps=4)
    assert len(replay) == 4 and all(m["replay_rel_rmse"] < 1e-3 for m in replay), replay


def test_verify_and_the_reader_name_a_flipped_byte_in_a_lossless_chunk(lossless_cache, tmp_path):
    bad = copy_cache(lossless_cache, tmp_path / "bad")
    path = shard_file(bad, "shard-00001", "lossless", view=0)
    off, nbytes = chunk_span(path, bad / "shard-00001" / "lossless", 1)
    flip_byte(path, off + nbytes // 2)
    report = verify_cache(str(bad))
    assert not report.ok
    assert any("shard-00001" in p and "lossless/c/0/0: inner chunk 1" in p and "crc32c" in p
               for p in report.problems), report.problems
    cache = open_cache(str(bad))
    with pytest.raises(CacheCorruptError, match="shard-00001.*lossless/c/0/0: inner chunk 1 fails its crc32c"):
        cache.read_block(1, 0, 2, 4)
    assert cache.read_block(1, 0, 0, 2).pixels.shape[0] == 2      # the other chunk of that file still reads


def test_verify_with_data_and_deep_check_the_lossless_pixels(lossless_cache, image_folder):
    report = verify_cache(str(lossless_cache), data=str(image_folder), pixel_views=None)
    assert report.ok, report.problems
    assert report.summary["pixel_views_checked"] == 24
    deep = verify_cache(str(lossless_cache), deep=6)
    assert deep.ok, deep.problems


def test_a_manifest_with_another_filter_is_refused(lossless_cache, tmp_path):
    bad = copy_cache(lossless_cache, tmp_path / "other-filter")
    m = json.loads((bad / "manifest.json").read_text())
    m["pixel_encoding"]["filter"] = "paeth"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheCorruptError, match="decodes 'rgb-g_planar_grad2d' only"):
        open_cache(str(bad))


def test_inspect_shows_the_pixel_mode(lossless_cache):
    r = inspect_report(str(lossless_cache))
    assert r["pixels"] == "lossless" and 0 < r["stored_pixel_bytes_per_view"]
    text = format_report(r)
    assert "--pixels lossless: exact, filter rgb-g_planar_grad2d, lz4hc level 9" in text
