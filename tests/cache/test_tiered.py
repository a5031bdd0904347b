"""Tiered low-rank codes (pcaA+B+C, cache/tiered.py): the byte layout spelled out with literal values, the bounds
of each tier, the dithered tiers' unbiasedness, and the codec's bytes, seeds and round trip through a basis."""
import numpy as np
import pytest
import torch

from g2sd_cache.cache import codecs, lowrank, tiered
from g2sd_cache.common.errors import UserError


def test_names_parse_and_bad_counts_are_refused():
    assert tiered.parse_tiers("pca8+32+64") == (8, 32, 64)
    assert tiered.parse_tiers("pca16+48") == (16, 48, 0)
    assert tiered.parse_tiers("pca0+0+8") == (0, 0, 8)
    assert tiered.parse_tiers("pca64") is None and tiered.parse_tiers("int4") is None
    c = codecs.get_codec("pca8+32+64")
    assert (c.name, c.rank, c.tiers, c.dithered) == ("pca8+32+64", 104, (8, 32, 64), True)
    assert codecs.get_codec("pca16+48").name == "pca16+48"
    for bad, why in (("pca8+31", "even"), ("pca8+32+6", "multiple of 4"), ("pca0+0+0", "no coefficient")):
        with pytest.raises(UserError, match=why):
            codecs.get_codec(bad)
    with pytest.raises(UserError, match="unknown codec"):
        codecs.get_codec("pca8+32+64+2")


def test_bytes_per_view_literal():
    # ViT-B: 197 tokens x (8 + 32/2 + 64/4 code bytes + 3 float16 scales)
    assert codecs.get_codec("pca8+32+64").bytes_per_view(197, 512) == 197 * 46 == 9_062
    # two tiers, two scales: 197 x (32 + 64 + 4)
    assert codecs.get_codec("pca32+128").bytes_per_view(197, 512) == 19_700
    assert codecs.get_codec("pca8+32+64").scale_shape(197, 512) == (197, 3)
    assert codecs.get_codec("pca8+32+64").code_width(512) == 40
    assert codecs.get_codec("pca8+32+64").basis_rank(512) == 104


def test_layout_literal_bytes_and_values():
    # one token, tiers (2, 2, 4): int8 head [127, -64] scale 1; 4-bit [7.5, -7.5] scale 1; 2-bit [1.5, -1.5, .5, -.5]
    coef = torch.tensor([[127.0, -64.0, 7.5, -7.5, 1.5, -1.5, 0.5, -0.5]])
    u = torch.zeros(1, 6)                       # floor(c / s + half): the lower level, exact for these values
    codes, scale = tiered.quantize(coef, (2, 2, 4), u)
    assert scale.dtype == torch.float16 and scale.tolist() == [[1.0, 1.0, 1.0]]
    # int8 127 = 0x7f, -64 = 0xc0; 4-bit n = 15 (low nibble), 0 (high) -> 0x0f; 2-bit n = 3, 0, 2, 1 at bits 0, 2,
    # 4, 6 -> 3 + 0 + 32 + 64 = 99
    assert codes.dtype == torch.uint8 and codes.tolist() == [[0x7F, 0xC0, 0x0F, 99]]
    torch.testing.assert_close(tiered.dequantize(codes, scale, (2, 2, 4)), coef, rtol=0, atol=0)


def test_each_tier_stays_within_its_step_and_dither_is_unbiased():
    g = torch.Generator().manual_seed(0)
    tiers = (4, 8, 16)
    coef = torch.randn(64, 5, 28, generator=g) * torch.linspace(8, 0.5, 28)
    u = torch.rand(64, 5, 24, generator=g)
    codes, scale = tiered.quantize(coef, tiers, u)
    assert codes.shape == (64, 5, 4 + 4 + 4) and scale.shape == (64, 5, 3)
    y = tiered.dequantize(codes, scale, tiers)
    s = scale.float()
    err = (y - coef).abs()
    absmax = [coef[..., :4].abs().amax(-1), coef[..., 4:12].abs().amax(-1), coef[..., 12:].abs().amax(-1)]
    for k, (lo, hi, step_bound, q) in enumerate(((0, 4, 0.5, 127), (4, 12, 1.0, 7.5), (12, 28, 1.0, 1.5))):
        assert bool((err[..., lo:hi] <= step_bound * s[..., k:k + 1] * (1 + 1e-6)).all()), k
        # the scale is the float16 at or just above absmax / q: never below it, within one float16 ulp
        assert bool((s[..., k] >= absmax[k] / q).all()) and bool((s[..., k] <= absmax[k] / q * (1 + 2 ** -9)).all())
    # unbiased: the mean of many dithered decodes of one token tends to the exact coefficients
    one = coef[:1, :1].expand(4000, 1, 28).contiguous()
    many = tiered.dequantize(*tiered.quantize(one, tiers, torch.rand(4000, 1, 24, generator=g)), tiers)
    sd = float(scale[0, 0, 2]) / np.sqrt(4000)       # the 2-bit tier's step is the largest dithered one
    assert float((many[:, 0, 4:].mean(0) - coef[0, 0, 4:]).abs().max()) < 5 * sd
    # deterministic rounding would be biased: the same token without dither misses by a fixed amount
    fixed = tiered.dequantize(*tiered.quantize(one[:1], tiers, torch.zeros(1, 1, 24)), tiers)
    assert float((fixed[0, 0, 12:] - coef[0, 0, 12:]).abs().max()) > 20 * sd


def test_codec_round_trip_through_a_basis_is_seeded_by_the_view():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    x = ((torch.randn(3, 11, 48, generator=g, dtype=torch.float64) * torch.logspace(0.5, -2, 48, dtype=torch.float64))
         @ q.T + 0.3).float()
    c = codecs.get_codec("pca4+8+16")
    basis = lowrank.fit_basis(x, c.rank)
    seeds = codecs.dither_seeds(7, [0, 1, 2], [0, 0, 0])
    codes, scale = codecs.encode(c, x, seeds, basis)
    assert codes.shape == (3, 11, 4 + 4 + 4) and codes.dtype == torch.uint8 and scale.shape == (3, 11, 3)
    again, _ = codecs.encode(c, x, seeds, basis)
    assert torch.equal(codes, again)                                    # a pure function of (x, seeds)
    other, _ = codecs.encode(c, x, codecs.dither_seeds(8, [0, 1, 2], [0, 0, 0]), basis)
    assert not torch.equal(codes, other)
    # the first view's codes do not depend on which views share its batch
    alone, _ = codecs.encode(c, x[:1], seeds[:1], basis)
    assert torch.equal(alone, codes[:1])
    y = codecs.decode(c, codes, scale, basis=basis)
    # independent decode: coefficients from the tiers, then @ V + centre in float64
    b = basis.double()
    ref = tiered.dequantize(codes, scale, c.tiers).double() @ b[1:] + b[0]
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-5)
    # the error is what lies outside the 28 directions plus the tiers' steps
    centred = x.double() - b[0]
    outside = (centred - (centred @ b[1:].T) @ b[1:]).norm(dim=-1)
    s = scale.double()
    bound = outside + (4 * (s[..., 0] / 2) ** 2 + 8 * s[..., 1] ** 2 + 16 * s[..., 2] ** 2).sqrt()
    assert bool(((y.double() - x.double()).norm(dim=-1) <= bound * 1.001 + 1e-5).all())
    with pytest.raises(ValueError, match="seeds"):
        codecs.encode(c, x, None, basis)
    with pytest.raises(ValueError, match="keeps 28 coefficients of 16-wide"):
        codecs.encode(c, x[..., :16], seeds, basis[:, :16])


def test_at_the_same_bytes_tiers_keep_more_of_a_steep_spectrum_than_int8():
    """On tokens whose variance falls off steeply (as a teacher's do), pca4+16+32 (4 + 8 + 8 = 20 code bytes) keeps
    52 directions where pca20 keeps 20: its error is the smaller one, though its tail rounds in 4 and 2 bits."""
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    # 4 strong directions and a long, slowly falling tail (the shape of the micro teacher's spectrum)
    spectrum = torch.cat([torch.logspace(1.5, 1, 4, dtype=torch.float64), torch.logspace(0, -0.7, 60, dtype=torch.float64)])
    x = ((torch.randn(40, 16, 64, generator=g, dtype=torch.float64) * spectrum) @ q.T).float()
    fit, test = x[:20], x[20:]
    tiers, flat = codecs.get_codec("pca4+16+32"), codecs.get_codec("pca20")
    assert tiers.bytes_per_view(16, 64) - flat.bytes_per_view(16, 64) == 16 * 4     # two more scales per token
    e_tiers = codecs.codec_error(tiers, test, lowrank.fit_basis(fit, 52))["rel_rmse"]
    e_flat = codecs.codec_error(flat, test, lowrank.fit_basis(fit, 20))["rel_rmse"]
    assert e_tiers < 0.85 * e_flat, (e_tiers, e_flat)        # measured: 0.051 against 0.069
