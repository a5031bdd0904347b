"""Value codecs: round-trip error bounds, bit-exact storage, zero tokens.

Measured bounds (relative RMS error ||dec(enc(x)) - x|| / ||x|| on LayerNorm-ed, roughly Gaussian
targets of width 512; on the micro teacher's real targets of width 32 the errors are a bit smaller):
  fp16 ~2.1e-4, bf16 ~1.7e-3, int8 ~0.75 % (per-token absmax/127), fp8 e4m3 ~2.6 % (per-token absmax/448),
  int4 ~12.5 % (stochastic rounding, fp16 scale = absmax/7.5 per group of 32 channels).
fp8 e4m3 keeps 3 mantissa bits, so its relative rounding error is ~2^-4 per value whatever the scale: it
cannot meet the issue's "int8/fp8 <= 1 %" target; we bound it at 3 % here (measured 2.6 %).
"""
import numpy as np
import pytest
import torch

from g2sd_cache.cache import codecs
from g2sd_cache.cache.codecs import (CODECS, codec_error, decode, dither_seeds, encode, from_storage, get_codec,
                                to_storage)
from g2sd_cache.common.errors import UserError

BOUNDS = {"fp16": 1e-3, "bf16": 5e-3, "int8": 0.01, "fp8": 0.03, "int4": 0.16}
# and the errors are not trivially small: the codec really rounds
FLOORS = {"fp16": 5e-5, "bf16": 5e-4, "int8": 3e-3, "fp8": 0.015, "int4": 0.08}
INT4 = CODECS["int4"]
# codecs of the values themselves; the low-rank ones (pcaR), which need a fitted basis, are in test_lowrank.py
VALUE_CODECS = [n for n, c in CODECS.items() if c.rank is None]


def enc(c, x, first_seed=0):
    """encode with one seed per view where the codec needs them (views: x's dims before [T, D])."""
    seeds = None
    if c.dithered:
        seeds = torch.arange(first_seed, first_seed + int(np.prod(x.shape[:-2])), dtype=torch.int64)
        seeds = seeds.reshape(x.shape[:-2])
    return encode(c, x, seeds)


def _ln_targets(n=8, tokens=197, width=512, seed=0):
    """Gaussian values LayerNorm-ed per token, like G2SD's targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tokens, width, generator=g) * (1 + 3 * torch.rand(n, tokens, 1, generator=g))
    return torch.nn.functional.layer_norm(x, (width,), eps=1e-6)


@pytest.mark.parametrize("name", VALUE_CODECS)
def test_round_trip_error_bounds(name):
    c = get_codec(name)
    x = _ln_targets()
    err = codec_error(c, x)
    assert FLOORS[name] < err["rel_rmse"] < BOUNDS[name], err
    assert err["cosine"] > 1 - BOUNDS[name] ** 2, err
    # codec_error is what it says: recompute by hand
    y = decode(c, *enc(c, x))
    assert y.dtype == torch.float32 and y.shape == x.shape
    manual = float(torch.linalg.vector_norm(y - x) / torch.linalg.vector_norm(x))
    assert manual == pytest.approx(err["rel_rmse"], rel=1e-4)
    # every single token within a bound too, not only on average (scaled codecs use each token's range)
    per_token = (y - x).norm(dim=-1) / x.norm(dim=-1)
    assert float(per_token.max()) < 2 * BOUNDS[name]


def test_bounds_hold_on_real_micro_teacher_targets():
    from g2sd_cache.models.mae import build_teacher
    teacher, _ = build_teacher("random:1", "test_mae_micro_patch16", 64)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(16, 3, 64, 64, generator=g)
    mask = torch.ones(16, 16, dtype=torch.bool)
    for i in range(16):
        mask[i, torch.randperm(16, generator=g)[:4]] = False
    y = teacher.targets(imgs, mask, 4)
    for name in VALUE_CODECS:
        assert codec_error(CODECS[name], y)["rel_rmse"] < BOUNDS[name], name


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_scaled_codecs_use_per_token_absmax(name):
    c = get_codec(name)
    x = _ln_targets(2, 5, 64)
    codes, scale = encode(c, x)
    assert codes.dtype == c.torch_dtype and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    absmax = x.abs().amax(-1)
    assert torch.allclose(scale, absmax / c.qmax)
    # the largest value of every token maps to the largest code, exactly
    assert torch.all(codes.float().abs().amax(-1) == c.qmax)
    # decode is code * scale
    assert torch.equal(decode(c, codes, scale), codes.float() * scale.unsqueeze(-1))


def test_plain_casts_have_no_scale():
    x = _ln_targets(1, 3, 16)
    for name in ("fp16", "bf16"):
        codes, scale = encode(get_codec(name), x)
        assert scale is None and codes.dtype == get_codec(name).torch_dtype
        assert torch.equal(decode(get_codec(name), codes, None), codes.float())


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
@pytest.mark.parametrize("name", VALUE_CODECS)
def test_storage_round_trip_is_bitwise(name):
    c = get_codec(name)
    x = _ln_targets(3, 7, 32, seed=4)
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-8, -1e-8])
    codes, _ = enc(c, x)
    stored = to_storage(c, codes)
    assert isinstance(stored, np.ndarray)
    assert stored.dtype == np.dtype(c.storage_dtype) and stored.shape == codes.shape
    assert stored.itemsize == (2 if name in ("fp16", "bf16") else 1)
    assert c.bytes_per_value() == {"fp16": 2, "bf16": 2, "int4": 0.5}.get(name, 1)
    back = from_storage(c, stored)
    assert back.dtype == c.torch_dtype
    bits = torch.uint16 if codes.element_size() == 2 else torch.uint8
    assert torch.equal(back.view(bits), codes.view(bits))
    # also from a non-contiguous numpy view (zarr may hand one back) and from a copy read off "disk"
    again = from_storage(c, np.frombuffer(stored.tobytes(), dtype=stored.dtype).reshape(stored.shape))
    assert torch.equal(again.view(bits), codes.view(bits))
    nc = np.stack([stored, stored], axis=-1)[..., 0]
    assert torch.equal(from_storage(c, nc).view(bits), codes.view(bits))


def test_every_code_bit_pattern_survives_storage():
    """bf16 and fp8 codes go to disk as raw bits: all 2^8 / a sweep of 2^16 patterns come back unchanged."""
    fp8 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    assert torch.equal(from_storage(CODECS["fp8"], to_storage(CODECS["fp8"], fp8)).view(torch.uint8),
                       fp8.view(torch.uint8))
    bf = torch.arange(0, 65536, 7, dtype=torch.int32).to(torch.uint16).view(torch.bfloat16)
    assert torch.equal(from_storage(CODECS["bf16"], to_storage(CODECS["bf16"], bf)).view(torch.uint16),
                       bf.view(torch.uint16))
    i8 = torch.arange(-128, 128, dtype=torch.int8)
    assert torch.equal(from_storage(CODECS["int8"], to_storage(CODECS["int8"], i8)), i8)


@pytest.mark.parametrize("name", VALUE_CODECS)
def test_zero_tokens_round_trip_without_nan(name):
    c = get_codec(name)
    x = _ln_targets(2, 6, 32)
    x[0, 2] = 0
    x[1] = 0
    codes, scale = enc(c, x)
    if scale is not None:
        assert torch.isfinite(scale).all() and (scale > 0).all()
    y = decode(c, codes, scale)
    assert torch.isfinite(y).all()
    # int4 has no zero level (16 levels at +-0.5, +-1.5, ... steps): a zero group gets float16's smallest
    # scale, 2^-24, and decodes to +-2^-25
    tiny = 2.0 ** -25 if c.dithered else 0.0
    assert float(y[0, 2].abs().max()) <= tiny and float(y[1].abs().max()) <= tiny
    err = codec_error(c, torch.zeros(3, 8))
    assert np.isfinite(err["cosine"]) and (c.dithered or err["rel_rmse"] == 0.0)
    assert all(np.isfinite(v) for v in codec_error(c, x).values())
    # storage of zero codes
    back = from_storage(c, to_storage(c, codes))
    assert torch.equal(decode(c, back, scale), y)


def test_tiny_and_large_tokens_keep_relative_precision():
    """Per-token scales: a token of magnitude 1e-6 and one of 1e3 are quantised equally well."""
    x = _ln_targets(1, 3, 256)
    x[0, 1] *= 1e-6
    x[0, 2] *= 1e3
    for name in ("int8", "fp8", "int4"):
        c = get_codec(name)
        y = decode(c, *enc(c, x))
        rel = (y - x).norm(dim=-1) / x.norm(dim=-1)
        assert float(rel.max()) < BOUNDS[name], (name, rel)


def test_unknown_codec_is_a_user_error():
    with pytest.raises(UserError, match="fp16, bf16, int8, fp8, int4"):
        get_codec("fp4")
    assert list(codecs.CODECS) == ["fp16", "bf16", "int8", "fp8", "int4", "pca32", "pca64", "pca128", "pca32+128+256",
                                   "pca16+64+128"]


# ----------------------------------------------------------------------------------------------
# int4: two 4-bit codes per byte, float16 scale per 32 channels, stochastic rounding seeded per view


def test_int4_is_unbiased():
    """The mean decode error over many draws (seeds) of the same input is <= 1/10 of one rounding step,
    element by element, while a single draw really rounds (errors up to a step, varying with the seed)."""
    x = _ln_targets(1, 4, 80, seed=3)[0]                  # [T=4, D=80]: 3 groups, the last of 16 channels
    draws = 4000
    xs = x.expand(draws, 4, 80)
    codes, scale = encode(INT4, xs, torch.arange(draws, dtype=torch.int64))
    y = decode(INT4, codes, scale, 80)
    step = codecs.group_scale(INT4, scale[0], 80)         # one rounding step, per element
    assert torch.equal(scale, scale[:1].expand_as(scale))  # the scale does not depend on the seed
    err = (y - x) / step
    assert float(err.abs().max()) < 1.0                    # every draw within one step
    assert float(err.std(dim=0).mean()) > 0.2              # ... and random (~0.41 step for uniform fractions)
    assert float(err.mean(dim=0).abs().max()) <= 0.1       # unbiased: E[decode] = x
    # round-to-nearest would be biased by up to half a step on these same values
    nearest = (torch.round(x / step + 7.5 - 0.5) + 0.5 - 7.5) * step
    assert float(((nearest - x) / step).abs().max()) > 0.3


def test_int4_bytes_per_view():
    """<= 57,000 B of targets per 197 x 512 view: 50,432 B of codes + 6,304 B of float16 scales."""
    assert INT4.bytes_per_view(197, 512) == 197 * 256 + 197 * 16 * 2 == 56_736 <= 57_000
    assert INT4.bytes_per_view(197, 512) / CODECS["fp16"].bytes_per_view(197, 512) < 0.282
    codes, scale = enc(INT4, _ln_targets(2, 197, 512))
    assert codes.dtype == torch.uint8 and codes.shape == (2, 197, 256)
    assert scale.dtype == torch.float16 and scale.shape == (2, 197, 16)
    per_view = (to_storage(INT4, codes).nbytes + scale.numpy().nbytes) / 2
    assert per_view == INT4.bytes_per_view(197, 512)
    assert INT4.code_width(33) == 17 and INT4.scale_shape(197, 33) == (197, 2)


@pytest.mark.parametrize("D", [32, 33, 80, 1])
def test_int4_round_trip_layout(D):
    """Nibble layout (channel 2j low, 2j+1 high), scale = absmax(group) / 7.5 rounded up to float16, every
    code within the group's range; odd D decodes with its width."""
    x = _ln_targets(2, 3, D, seed=D) if D > 1 else torch.tensor([[[0.5]], [[-2.0]]])
    codes, scale = enc(INT4, x)
    G = -(-D // 32)
    padded = torch.nn.functional.pad(x, (0, G * 32 - D)).unflatten(-1, (G, 32))
    exact = padded.abs().amax(-1) / 7.5
    assert bool((scale.float() >= exact).all()) and bool((scale.float() <= exact * (1 + 2.0 ** -10)).all())
    n = torch.stack([codes & 15, codes >> 4], -1).flatten(-2)
    y = decode(INT4, codes, scale, D)
    assert y.shape == x.shape
    assert torch.equal(y, (n[..., :D].float() - 7.5) * codecs.group_scale(INT4, scale, D))
    assert float(((y - x) / codecs.group_scale(INT4, scale, D)).abs().max()) < 1
    if D % 2:
        assert bool((n[..., D:] == 0).all())               # the pad nibble
    else:
        assert torch.equal(decode(INT4, codes, scale), y)  # even D: width defaults to two per byte
    back = from_storage(INT4, to_storage(INT4, codes))
    assert torch.equal(back, codes)


def test_int4_codes_are_a_pure_function_of_values_and_seeds():
    """Same view, same seed -> same bytes, whatever the batch it is encoded in (rerun, resume, other
    batch size, CPU or GPU); another seed -> other codes."""
    x = _ln_targets(6, 5, 64, seed=9)
    seeds = dither_seeds(7, np.arange(100, 106), np.array([0, 1, 0, 1, 0, 1]))
    whole = encode(INT4, x, seeds)
    parts = [encode(INT4, x[i:j], seeds[i:j]) for i, j in ((0, 1), (1, 4), (4, 6))]
    assert torch.equal(whole[0], torch.cat([p[0] for p in parts]))
    assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))
    assert torch.equal(encode(INT4, x, seeds)[0], whole[0])
    assert not torch.equal(encode(INT4, x, seeds + 1)[0], whole[0])


def test_dither_seeds_are_a_pure_function_of_seed_index_and_view():
    a = dither_seeds(0, [5, 6, 5], [0, 0, 1])
    assert a.dtype == torch.int64 and a.shape == (3,) and bool((a >= 0).all())
    assert len(set(a.tolist())) == 3
    assert torch.equal(dither_seeds(0, [5], [1]), a[2:])              # order and batch do not matter
    assert not torch.equal(dither_seeds(1, [5, 6, 5], [0, 0, 1]), a)   # the cache seed does
    with pytest.raises(ValueError, match="view indices"):
        dither_seeds(0, [1, 2], [0])


def test_int4_needs_one_seed_per_view():
    x = _ln_targets(2, 3, 32)
    with pytest.raises(ValueError, match="needs seeds"):
        encode(INT4, x)
    with pytest.raises(ValueError, match="seeds must be int64 of shape"):
        encode(INT4, x, torch.arange(3))
    with pytest.raises(ValueError, match="float16 scales"):
        encode(INT4, x * 1e6, torch.arange(2))


def test_int4_groups_confine_an_outlier_channel():
    """Why per-group scales: a channel at 20x the token's RMS sets the step of its own 32 channels only.
    With one scale per token it would set the step of all of them (error > 100 %)."""
    x = _ln_targets(4, 16, 512, seed=5)
    spiked = x.clone()
    spiked[..., 7] = 20.0
    rest = slice(32, None)                                   # the groups without the outlier
    clean = decode(INT4, *enc(INT4, x))[..., rest] - x[..., rest]
    with_outlier = decode(INT4, *enc(INT4, spiked))[..., rest] - spiked[..., rest]
    assert torch.equal(clean, with_outlier)
    assert float(with_outlier.norm() / spiked[..., rest].norm()) < BOUNDS["int4"]
    # the same 16 levels and dither with one scale per token (absmax / 7.5): the spike's step everywhere
    s = spiked.abs().amax(-1, keepdim=True) / 7.5
    u = torch.rand(spiked.shape, generator=torch.Generator().manual_seed(0))
    per_token = (torch.floor(spiked / s + 7.5 + u).clamp(0, 15) - 7.5) * s
    assert float((per_token - spiked)[..., rest].norm() / spiked[..., rest].norm()) > 1.0


def test_int4_needs_an_even_target_width_in_a_cache():
    """The cache stores [T, D/2] bytes per view; an odd teacher width is refused in one line (the codec and the
    kernel handle odd D given the width, but a stored view would not say it)."""
    from g2sd_cache.cache.schema import array_specs
    specs = array_specs(INT4, 197, 512, 196)
    assert specs["target"].per_view_shape == (197, 256) and specs["target"].dtype == "uint8"
    assert specs["scale"].per_view_shape == (197, 16) and specs["scale"].dtype == "float16"
    assert array_specs(CODECS["int8"], 197, 512, 196)["scale"].per_view_shape == (197,)
    with pytest.raises(UserError, match="needs a target width divisible by 2; this teacher's is 33") as e:
        array_specs(INT4, 197, 33, 196)
    assert "\n" not in str(e.value)


def test_int4_cache_end_to_end(image_folder, tmp_path):
    """extract --codec int4 writes packed codes and float16 group scales, a rerun writes the same bytes, the
    reader decodes [T, D] float32 targets, and inspect reports int4's bytes per view."""
    import zarr
    from tests.common.helpers import micro_extract_config
    from g2sd_cache.cache.reader import open_cache
    from g2sd_cache.generic.extract import run_extract
    from g2sd_cache.cache.inspect import format_report, inspect_report

    a, b = tmp_path / "a", tmp_path / "b"
    run_extract(micro_extract_config(image_folder, a, codec="int4"))
    run_extract(micro_extract_config(image_folder, b, codec="int4"))
    cache = open_cache(str(a))
    T, D = cache.manifest.tokens, cache.manifest.target_dim
    assert cache[0].target.shape == (T, D) and cache[0].target.dtype == torch.float32
    for shard in sorted(p.name for p in a.glob("shard-*")):
        for name, dtype, shape in (("target", np.uint8, (T, D // 2)), ("scale", np.float16, (T, -(-D // 32)))):
            x = np.asarray(zarr.open_array(a / shard / name, mode="r")[...])
            y = np.asarray(zarr.open_array(b / shard / name, mode="r")[...])
            assert x.dtype == dtype and x.shape[2:] == shape and np.array_equal(x, y), (shard, name)
    # the trainer's pixel path hands the loss packed codes and float16 group scales, as stored
    from g2sd_cache.generic.plan import PAD, EpochOrder
    from g2sd_cache.generic.stream import StreamSpec, read_cached
    m = cache.manifest
    order = EpochOrder(0, unit=np.array([0, 0, 1], dtype=np.int64), row=np.array([1, 0, 0], dtype=np.int64))
    spec = StreamSpec(source=None, cache=cache, geometry=m.geometry, seed=m.seed, view=1, order=order)
    (batch,) = list(read_cached(spec, pin=False)(iter([np.array([0, 1, 2, PAD])])))
    assert batch.codes.dtype == torch.uint8 and batch.codes.shape == (4, T, D // 2)
    assert batch.scale.dtype == torch.float16 and batch.scale.shape == (4, T, -(-D // 32))
    got = decode(INT4, batch.codes, batch.scale)
    n0 = cache.shard_images[0]
    for k, i in enumerate((n0 + 1, n0, 2 * n0 + cache.shard_images[1])):   # view 1 of rows (0, 1), (0, 0), (1, 0)
        assert cache.locate(i)[1] == 1 and torch.equal(got[k], cache[i].target), k
    assert not bool(batch.valid[3]) and not bool(got[3].any())

    report = inspect_report(str(a))
    assert report["target_bytes_per_view"] == INT4.bytes_per_view(T, D) == T * D // 2 + 2 * T * -(-D // 32)
    assert "int4" in report["extract_error"] and 0.05 < report["extract_error"]["int4"]["rel_rmse"] < BOUNDS["int4"]
    assert any(line.startswith("int4") for line in format_report(report).splitlines())
