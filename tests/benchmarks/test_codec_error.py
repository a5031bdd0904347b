"""benchmarks/codec_error.py's low-rank table: per rank, held-out and in-sample error and the truncation alone."""
import pytest

from tests.cache.test_lowrank import _low_rank


def test_lowrank_by_rank_separates_truncation_from_rounding():
    from g2sd_cache.benchmarks.codec_error import lowrank_by_rank
    x = _low_rank(8, 21, 48, 24, noise=1e-4)          # exactly 24 dimensions
    rows = lowrank_by_rank(x, ranks=(8, 32, 64))
    assert [r["rank"] for r in rows] == [8, 32]        # ranks beyond D = 48 are left out
    low, high = rows
    assert low["target_bytes_per_view"] == 21 * 10 and high["target_bytes_per_view"] == 21 * 34
    assert low["heldout_truncation"] > 0.3             # 16 of 24 dimensions cut
    assert low["heldout"] == pytest.approx(low["heldout_truncation"], rel=0.05)   # rounding is minor there
    assert high["heldout_truncation"] < 1e-3 and 1e-3 < high["heldout"] < 0.01     # only int8 rounding remains
    assert high["in_sample"] < 0.01


def test_tiered_rows_keep_more_rank_for_their_bytes_and_leave_out_what_does_not_fit():
    from g2sd_cache.benchmarks.codec_error import lowrank_by_rank
    x = _low_rank(8, 21, 48, 24, noise=1e-4)          # exactly 24 dimensions
    rows = lowrank_by_rank(x, ranks=(8,), tiered=("pca4+8+12", "pca8+32+16"))   # the second keeps 56 > 48
    assert [(r["codec"], r["rank"]) for r in rows] == [("pca8", 8), ("pca4+8+12", 24)]
    tiers = rows[1]
    # 4 + 8/2 + 12/4 code bytes and three float16 scales per token
    assert tiers["target_bytes_per_view"] == 21 * (4 + 4 + 3 + 6)
    assert tiers["heldout_truncation"] < 1e-3                        # all 24 dimensions kept
    assert 1e-3 < tiers["heldout"] < rows[0]["heldout"]               # rounding noise, far below pca8's truncation
