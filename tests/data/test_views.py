"""Views: counter-based regeneration, torchvision's RandomResizedCrop rule, MAE's mask, MAE's pixels."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from g2sd_cache.data import views
from g2sd_cache.data.synthetic import synthetic_image
from g2sd_cache.data.views import ViewGeometry, crop_box, normalize, render_view, sample_view

GEOM = ViewGeometry()  # 224 px, patch 16, mask 0.75



def _same(a: views.View, b: views.View) -> bool:
    return a.crop == b.crop and a.flip == b.flip and np.array_equal(a.mask, b.mask)


def test_view_regenerates_from_key_alone_in_any_order():
    keys = [(s, i, v) for s in (0, 7) for i in range(6) for v in range(3)]
    size = (500, 375)
    forward = {k: sample_view(*k, size, GEOM) for k in keys}
    rng = np.random.default_rng(123)
    shuffled = [keys[j] for j in rng.permutation(len(keys))]
    # interleave unrelated draws (other keys, global RNGs) to show nothing is shared
    np.random.seed(5)
    torch.manual_seed(5)
    for k in shuffled:
        sample_view(99, 12345, 3, (640, 480), GEOM)
        np.random.rand()
        torch.rand(3)
        again = sample_view(*k, size, GEOM)
        assert _same(again, forward[k]), k
    # the same draws whatever the global seeds
    np.random.seed(0)
    torch.manual_seed(0)
    assert _same(sample_view(0, 3, 1, size, GEOM), forward[(0, 3, 1)])


def test_different_keys_give_different_views():
    size = (500, 375)
    base = sample_view(0, 0, 0, size, GEOM)
    for k in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        other = sample_view(*k, size, GEOM)
        assert other.crop != base.crop, k
        assert not np.array_equal(other.mask, base.mask), k
    # masks of many keys are pairwise distinct, flips are roughly balanced
    vs = [sample_view(0, i, v, size, GEOM) for i in range(100) for v in range(2)]
    masks = {m.mask.tobytes() for m in vs}
    assert len(masks) == len(vs)
    flips = sum(v.flip for v in vs)
    assert 70 <= flips <= 130, flips


def test_mask_keeps_exactly_int_L_times_quarter():
    assert GEOM.num_patches == 196 and GEOM.num_visible == 49
    for i in range(20):
        v = sample_view(0, i, 0, (300, 300), GEOM)
        assert v.mask.dtype == np.bool_ and v.mask.shape == (196,)
        assert int((~v.mask).sum()) == 49
    # other ratios follow int(L * (1 - r)), e.g. 0.6 at 64 px (L=16): int(16*0.4) = int(6.4) = 6
    g = ViewGeometry(img_size=64, patch_size=16, mask_ratio=0.6)
    assert g.num_visible == 6
    assert int((~sample_view(1, 2, 3, (100, 80), g).mask).sum()) == 6
    # the visible patches are uniform: every patch is visible in about 1/4 of the views
    counts = np.zeros(196)
    for i in range(400):
        counts += ~sample_view(3, i, 0, (300, 300), GEOM).mask
    assert counts.min() > 60 and counts.max() < 145, (counts.min(), counts.max())


class _Stream:
    """One stream of uniform [0, 1) numbers consumed in call order by both implementations."""

    def __init__(self, values):
        self.values = list(values)
        self.pos = 0

    def next(self) -> float:
        u = self.values[self.pos]
        self.pos += 1
        return u


class _FakeNumpyRng:
    def __init__(self, stream: _Stream):
        self.s = stream

    def uniform(self, lo, hi):
        return lo + self.s.next() * (hi - lo)

    def integers(self, lo, hi):
        return lo + int(self.s.next() * (hi - lo))


class _FakeTorch:
    """Wraps torch for torchvision's get_params: `empty(1).uniform_` and `randint` read our stream."""

    def __init__(self, stream: _Stream):
        self.s = stream

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *size):
        s = self.s

        class _U:
            def uniform_(self, lo, hi):
                lo, hi = float(lo), float(hi)
                return torch.tensor([lo + s.next() * (hi - lo)], dtype=torch.float64)
        return _U()

    def randint(self, lo, hi, size):
        return torch.tensor([lo + int(self.s.next() * (hi - lo))])


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (64, 64), (1000, 50), (50, 1000), (300, 90), (33, 257)])
def test_crop_box_is_torchvisions_rule_on_the_same_draws(size, monkeypatch):
    """Feed one stream of uniforms to torchvision's RandomResizedCrop.get_params and to crop_box.
    torchvision takes log(ratio) in float32, we in float64, so a rounding tie may differ by one pixel."""
    import torchvision.transforms.transforms as tvt
    width, height = size
    img = Image.new("RGB", size)
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    rng = np.random.default_rng(hash(size) % 2**32)
    exact = 0
    trials = 150
    for _ in range(trials):
        values = rng.random(64).tolist()
        s1, s2 = _Stream(values), _Stream(values)
        monkeypatch.setattr(tvt, "torch", _FakeTorch(s1))
        ref = T.RandomResizedCrop.get_params(img, list(scale), list(ratio))
        monkeypatch.setattr(tvt, "torch", torch)
        ours = crop_box(_FakeNumpyRng(s2), width, height, scale, ratio)
        assert all(isinstance(c, int) for c in ours)
        if ours == ref:
            exact += 1
        else:
            assert max(abs(a - b) for a, b in zip(ours, ref)) <= 1, (ours, ref)
    assert exact >= 0.97 * trials, exact


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (640, 480), (224, 224)])
def test_crop_box_limits(size):
    """Every sampled box lies inside the image; its area fraction is within scale and its aspect within
    ratio, up to the rounding of each side to whole pixels (at most 1/2 px per side)."""
    width, height = size
    area = width * height
    sides = set()
    for i in range(500):
        top, left, h, w = sample_view(0, i, 0, size, GEOM).crop
        assert 0 <= top and 0 <= left and 0 < h and 0 < w
        assert top + h <= height and left + w <= width
        assert (w + 0.5) * (h + 0.5) >= 0.2 * area
        assert (w - 0.5) * (h - 0.5) <= 1.0 * area
        assert (w + 0.5) / (h - 0.5) >= 3 / 4
        assert (w - 0.5) / (h + 0.5) <= 4 / 3
        sides.add((h, w))
    assert len(sides) > 300  # not stuck on the fallback


def test_crop_box_central_fallback_for_extreme_aspect():
    # 1000 x 50: no box of >= 20 % area and aspect <= 4/3 fits in 50 rows -> central crop at aspect 4/3
    assert sample_view(0, 0, 0, (1000, 50), GEOM).crop == (0, (1000 - 67) // 2, 50, 67)
    # 50 x 1000: central crop at aspect 3/4: w = 50, h = round(50 / 0.75) = 67
    assert sample_view(0, 0, 0, (50, 1000), GEOM).crop == ((1000 - 67) // 2, 0, 67, 50)
    for i in range(20):
        assert sample_view(4, i, 1, (1000, 50), GEOM).crop == (0, 466, 50, 67)


def test_crop_box_distribution_matches_torchvision():
    """Independent draws: our boxes and torchvision's have the same area-fraction and aspect statistics."""
    width, height = 500, 375
    img = Image.new("RGB", (width, height))
    torch.manual_seed(0)
    ref = np.array([T.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)], float)
    ours = np.array([sample_view(0, i, 0, (width, height), GEOM).crop for i in range(2000)], float)
    fa = lambda b: b[:, 2] * b[:, 3] / (width * height)  # noqa: E731
    la = lambda b: np.log(b[:, 3] / b[:, 2])  # noqa: E731
    assert abs(fa(ours).mean() - fa(ref).mean()) < 0.03
    assert abs(fa(ours).std() - fa(ref).std()) < 0.03
    assert abs(la(ours).mean() - la(ref).mean()) < 0.03
    assert abs(la(ours).std() - la(ref).std()) < 0.03
    # centre of the box: uniform over the free range, mean in the middle of the image
    assert abs((ours[:, 1] + ours[:, 3] / 2).mean() - width / 2) < 10
    assert abs((ours[:, 0] + ours[:, 2] / 2).mean() - height / 2) < 8


def _pil():
    return synthetic_image(11, (333, 251))


def test_render_view_equals_torchvision_resized_crop_bicubic_flip():
    img = _pil()
    for crop, flip in [((10, 20, 200, 150), False), ((0, 0, 251, 333), True), ((37, 101, 90, 120), True)]:
        got = render_view(img, crop, flip, 224)
        ref = TF.resized_crop(img, *crop, [224, 224], InterpolationMode.BICUBIC)
        if flip:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1)
        assert got.dtype == torch.uint8 and got.shape == (3, 224, 224)
        assert torch.equal(got, ref)
    # flip really mirrors the unflipped rendering
    a, b = render_view(img, (5, 6, 100, 120), False, 64), render_view(img, (5, 6, 100, 120), True, 64)
    assert torch.equal(a.flip(-1), b)
    assert not torch.equal(a, b)


def test_normalize_equals_to_tensor_plus_normalize_bitwise():
    img = _pil()
    crop, flip = (12, 30, 180, 200), True
    pixels = render_view(img, crop, flip, 224)
    ours = normalize(pixels.unsqueeze(0))[0]
    # the official recipe on the PIL image: resized_crop, flip, ToTensor, Normalize
    pil = TF.hflip(TF.resized_crop(img, *crop, [224, 224], InterpolationMode.BICUBIC))
    ref = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(T.ToTensor()(pil))   # literal: not our constant
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    # batched: each row equals its own normalisation, and the input is not modified
    batch = torch.stack([pixels, render_view(img, (0, 0, 100, 100), False, 224)])
    before = batch.clone()
    out = normalize(batch)
    assert torch.equal(batch, before)
    assert torch.equal(out[0], ref)


def test_the_normalisation_constants_are_imagenets_in_rgb_order():
    """Pinned to literal values (MAE / G2SD / timm IMAGENET_DEFAULT_*): a swapped channel would change every
    target and every student input while every other test, using the constant as its reference, passes."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    assert views.IMAGENET_MEAN == (0.485, 0.456, 0.406) == tuple(IMAGENET_DEFAULT_MEAN)
    assert views.IMAGENET_STD == (0.229, 0.224, 0.225) == tuple(IMAGENET_DEFAULT_STD)
    # what normalize does with them: a mid-grey pixel, per channel (x / 255 - mean) / std
    grey = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    want = [(128 / 255 - m) / s for m, s in ((0.485, 0.229), (0.456, 0.224), (0.406, 0.225))]
    assert normalize(grey)[0, :, 0, 0].tolist() == pytest.approx(want, rel=1e-6)


def test_decode_image_converts_to_rgb_and_reads_bytes_and_paths(tmp_path):
    gray = Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64) % 251, mode="L")
    path = tmp_path / "g.png"
    gray.save(path)
    a = views.decode_image(str(path))
    b = views.decode_image(path.read_bytes())
    assert a.mode == "RGB" and a.size == (64, 48)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(a)[..., 0], np.asarray(gray))
    # a truncated file fails here, at decode time
    from g2sd_cache.data.synthetic import jpeg_bytes
    data = jpeg_bytes(_pil())
    with pytest.raises(OSError):
        views.decode_image(data[: len(data) // 2])


def test_visible_index_ascending_and_refuses_uneven_rows():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    assert views.visible_index(mask).tolist() == [[1, 3], [0, 1]]
    assert views.visible_index(mask, 2).tolist() == [[1, 3], [0, 1]]
    with pytest.raises(ValueError):
        views.visible_index(torch.tensor([[True, False, True, False], [False, False, False, True]]))


def test_visible_patches_are_the_rendered_pixels_of_the_visible_patches_in_hwc():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, [0, 5, 15]] = False
    mask[1, [2, 3, 9]] = False
    got = views.visible_patches(pixels, mask, 16)
    assert got.shape == (2, 3, 16, 16, 3) and got.dtype == torch.uint8
    for n, ids in enumerate([[0, 5, 15], [2, 3, 9]]):
        for j, patch in enumerate(ids):
            r, c = divmod(patch, 4)
            expected = pixels[n, :, 16 * r:16 * (r + 1), 16 * c:16 * (c + 1)].permute(1, 2, 0)
            assert torch.equal(got[n, j], expected)


def test_normalize_patches_is_normalize_element_for_element():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    flat = views.normalize_patches(views.visible_patches(pixels, mask, 16))
    assert flat.shape == (2, 4, 16 * 16 * 3) and flat.dtype == torch.float32
    assert torch.equal(flat, views.visible_patches(normalize(pixels), mask, 16).flatten(2))
