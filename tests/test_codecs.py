"""Value codecs: round-trip error bounds, bit-exact storage, zero tokens.

Measured bounds (relative RMS error ||dec(enc(x)) - x|| / ||x|| on LayerNorm-ed, roughly Gaussian
targets of width 512; on the micro teacher's real targets of width 32 the errors are a bit smaller):
  fp16 ~2.1e-4, bf16 ~1.7e-3, int8 ~0.75 % (per-token absmax/127), fp8 e4m3 ~2.6 % (per-token absmax/448).
fp8 e4m3 keeps 3 mantissa bits, so its relative rounding error is ~2^-4 per value whatever the scale: it
cannot meet the issue's "int8/fp8 <= 1 %" target; we bound it at 3 % here (measured 2.6 %).
"""
import numpy as np
import pytest
import torch

from g2sd_cache import codecs
from g2sd_cache.codecs import CODECS, codec_error, decode, encode, from_storage, get_codec, to_storage
from g2sd_cache.errors import UserError

BOUNDS = {"fp16": 1e-3, "bf16": 5e-3, "int8": 0.01, "fp8": 0.03}
# and the errors are not trivially small: the codec really rounds
FLOORS = {"fp16": 5e-5, "bf16": 5e-4, "int8": 3e-3, "fp8": 0.015}


def _ln_targets(n=8, tokens=197, width=512, seed=0):
    """Gaussian values LayerNorm-ed per token, like G2SD's targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tokens, width, generator=g) * (1 + 3 * torch.rand(n, tokens, 1, generator=g))
    return torch.nn.functional.layer_norm(x, (width,), eps=1e-6)


@pytest.mark.parametrize("name", list(CODECS))
def test_round_trip_error_bounds(name):
    c = get_codec(name)
    x = _ln_targets()
    err = codec_error(c, x)
    assert FLOORS[name] < err["rel_rmse"] < BOUNDS[name], err
    assert err["cosine"] > 1 - BOUNDS[name] ** 2, err
    # codec_error is what it says: recompute by hand
    y = decode(c, *encode(c, x))
    assert y.dtype == torch.float32 and y.shape == x.shape
    manual = float(torch.linalg.vector_norm(y - x) / torch.linalg.vector_norm(x))
    assert manual == pytest.approx(err["rel_rmse"], rel=1e-4)
    # every single token within a bound too, not only on average (scaled codecs use each token's range)
    per_token = (y - x).norm(dim=-1) / x.norm(dim=-1)
    assert float(per_token.max()) < 2 * BOUNDS[name]


def test_bounds_hold_on_real_micro_teacher_targets():
    from g2sd_cache.models import build_teacher
    teacher, _ = build_teacher("random:1", "test_mae_micro_patch16", 64)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(16, 3, 64, 64, generator=g)
    mask = torch.ones(16, 16, dtype=torch.bool)
    for i in range(16):
        mask[i, torch.randperm(16, generator=g)[:4]] = False
    y = teacher.targets(imgs, mask, 4)
    for name, c in CODECS.items():
        assert codec_error(c, y)["rel_rmse"] < BOUNDS[name], name


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
@pytest.mark.parametrize("name", list(CODECS))
def test_storage_round_trip_is_bitwise(name):
    c = get_codec(name)
    x = _ln_targets(3, 7, 32, seed=4)
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-8, -1e-8])
    codes, _ = encode(c, x)
    stored = to_storage(c, codes)
    assert isinstance(stored, np.ndarray)
    assert stored.dtype == np.dtype(c.storage_dtype) and stored.shape == codes.shape
    assert stored.itemsize == c.bytes_per_value() == (2 if name in ("fp16", "bf16") else 1)
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


@pytest.mark.parametrize("name", list(CODECS))
def test_zero_tokens_round_trip_without_nan(name):
    c = get_codec(name)
    x = _ln_targets(2, 6, 32)
    x[0, 2] = 0
    x[1] = 0
    codes, scale = encode(c, x)
    if scale is not None:
        assert torch.isfinite(scale).all() and (scale > 0).all()
    y = decode(c, codes, scale)
    assert torch.isfinite(y).all()
    assert torch.equal(y[0, 2], torch.zeros(32)) and torch.equal(y[1], torch.zeros(6, 32))
    err = codec_error(c, torch.zeros(3, 8))
    assert err["rel_rmse"] == 0.0 and np.isfinite(err["cosine"])
    assert all(np.isfinite(v) for v in codec_error(c, x).values())
    # storage of zero codes
    back = from_storage(c, to_storage(c, codes))
    assert torch.equal(decode(c, back, scale), y)


def test_tiny_and_large_tokens_keep_relative_precision():
    """Per-token scales: a token of magnitude 1e-6 and one of 1e3 are quantised equally well."""
    x = _ln_targets(1, 3, 256)
    x[0, 1] *= 1e-6
    x[0, 2] *= 1e3
    for name in ("int8", "fp8"):
        c = get_codec(name)
        y = decode(c, *encode(c, x))
        rel = (y - x).norm(dim=-1) / x.norm(dim=-1)
        assert float(rel.max()) < BOUNDS[name], (name, rel)


def test_unknown_codec_is_a_user_error():
    with pytest.raises(UserError, match="fp16, bf16, int8, fp8"):
        get_codec("fp4")
    assert list(codecs.CODECS) == ["fp16", "bf16", "int8", "fp8"]
