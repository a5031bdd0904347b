"""The low-rank codec (pcaR, cache/lowrank.py): its basis is the PCA of the calibration tokens, deterministic and
stored exactly; its round trip stays within the truncation + rounding bound; its bytes are R + 2 per token."""
import numpy as np
import pytest
import torch

from g2sd_cache.cache import codecs, lowrank
from g2sd_cache.common.errors import UserError


def _low_rank(n: int, t: int, d: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    """[n, t, d] float32 tokens of exactly `rank` dimensions about a random centre, plus iid noise."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    coef = torch.randn(n * t, rank, generator=g, dtype=torch.float64) * torch.linspace(3, 1, rank, dtype=torch.float64)
    x = coef @ q.T + torch.randn(d, generator=g, dtype=torch.float64)
    return (x + noise * torch.randn(n * t, d, generator=g, dtype=torch.float64)).float().reshape(n, t, d)


def test_registry_names_and_bytes_per_view():
    assert [n for n, c in codecs.CODECS.items() if c.rank is not None and c.tiers is None] == ["pca32", "pca64", "pca128"]
    c = codecs.get_codec("pca64")
    # ViT-B targets: 197 tokens x (64 int8 codes + a float16 scale)
    assert c.bytes_per_view(197, 512) == 13_002
    assert codecs.get_codec("pca128").bytes_per_view(197, 512) == 25_610
    assert codecs.get_codec("pca48").rank == 48 and codecs.get_codec("pca48").code_width(512) == 48
    assert codecs.get_codec("pca64").code_width(32) == 32          # capped at the target width
    for bad in ("pca0", "pca", "pcax", "pca12345", "pca-3"):
        with pytest.raises(UserError, match="unknown codec"):
            codecs.get_codec(bad)


def test_basis_is_the_pca_of_the_tokens_and_deterministic():
    x = _low_rank(6, 17, 24, 5, noise=0.05)
    b = lowrank.fit_basis(x, 8)
    assert b.dtype == torch.float32 and b.shape == (9, 24)
    assert torch.equal(b, lowrank.fit_basis(x.clone(), 8))                  # same sample, same bits
    rows = x.reshape(-1, 24).double().numpy()
    np.testing.assert_allclose(b[0].numpy(), rows.mean(0), rtol=0, atol=1e-6)
    _, s, vt = np.linalg.svd(rows - rows.mean(0), full_matrices=False)      # an independent PCA
    for i in range(8):
        assert abs(float(np.dot(b[1 + i].double().numpy(), vt[i]))) == pytest.approx(1.0, abs=1e-5), i
        lead = np.argmax(np.abs(b[1 + i].numpy()))
        assert b[1 + i, lead] > 0                                            # the sign convention
    assert np.all(np.diff(s[:8]) <= 0)
    # nested: a rank-4 basis is the first 5 rows of the rank-8 one
    torch.testing.assert_close(lowrank.fit_basis(x, 4), b[:5], rtol=0, atol=1e-6)
    assert not torch.equal(b, lowrank.fit_basis(_low_rank(6, 17, 24, 5, noise=0.05, seed=1), 8))


def test_basis_file_round_trips_exactly_and_is_checked():
    b = lowrank.fit_basis(_low_rank(4, 9, 16, 3, 0.1), 6)
    raw = lowrank.basis_bytes(b)
    assert torch.equal(lowrank.load_basis(raw), b)
    rec = lowrank.basis_record(raw, b.shape)
    assert rec["shape"] == [7, 16] and lowrank.basis_problem(rec, raw, 6, 16) is None
    assert "missing" in lowrank.basis_problem(rec, None, 6, 16)
    bad = bytearray(raw)
    bad[-1] ^= 1
    assert "not the basis the manifest holds" in lowrank.basis_problem(rec, bytes(bad), 6, 16)
    assert "shape" in lowrank.basis_problem(rec, raw, 5, 16)
    assert "no basis" in lowrank.basis_problem(None, raw, 6, 16)


@pytest.mark.parametrize("rank,true_rank", [(16, 16), (16, 40), (8, 8)])
def test_round_trip_within_truncation_plus_rounding(rank, true_rank):
    x = _low_rank(5, 33, 64, true_rank, noise=1e-3)
    c = codecs.get_codec(f"pca{rank}")
    basis = lowrank.fit_basis(x, rank)
    codes, scale = codecs.encode(c, x, basis=basis)
    assert codes.dtype == torch.int8 and codes.shape == (5, 33, rank) and scale.dtype == torch.float16
    assert scale.shape == (5, 33)
    y = codecs.decode(c, codes, scale, basis=basis)
    # independent decode: codes x scale @ V + centre
    b = basis.double()
    ref = (codes.double() * scale.double()[..., None]) @ b[1:] + b[0]
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-5)
    # per token: ||x - y|| <= ||x minus its projection|| + sqrt(R) * scale / 2 (orthonormal V)
    centred = x.double() - b[0]
    outside = (centred - (centred @ b[1:].T) @ b[1:]).norm(dim=-1)
    bound = outside + rank ** 0.5 * scale.double() / 2
    assert bool(((y.double() - x.double()).norm(dim=-1) <= bound * 1.001 + 1e-5).all())
    rel = float((y - x).norm() / x.norm())
    if true_rank <= rank:
        assert rel < 0.01                                  # only rounding and the tiny noise
    else:
        assert rel > 0.05                                  # 24 of 40 dimensions are truncated


def test_codec_needs_its_basis():
    c = codecs.get_codec("pca8")
    x = _low_rank(2, 5, 16, 4, 0.0)
    with pytest.raises(ValueError, match="basis"):
        codecs.encode(c, x)
    codes, scale = codecs.encode(c, x, basis=lowrank.fit_basis(x, 8))
    with pytest.raises(ValueError, match="basis"):
        codecs.decode(c, codes, scale)
    # codec_error without a basis fits one on x itself: on exactly rank-4 data only rounding remains
    assert codecs.codec_error(c, x)["rel_rmse"] < 5e-3
