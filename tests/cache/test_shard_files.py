"""cache/shard_files.py's `chunk_groups`: a read's rows split by inner chunk, for all of a batch's arrays at once."""
import numpy as np

from g2sd_cache.cache.shard_files import chunk_groups


def _lists(groups):
    return [(g.chunk, g.rows.tolist(), g.at.tolist()) for g in groups]


def test_rows_of_one_chunk_are_one_group_in_chunk_coordinates():
    assert _lists(chunk_groups(np.array([21, 17, 30]), np.array([2, 0, 1]), 16)) == [(1, [5, 1, 14], [2, 0, 1])]


def test_rows_across_chunks_go_by_ascending_chunk_keeping_their_order():
    rows, at = np.array([5, 1, 17, 3, 16, 40]), np.array([9, 8, 7, 6, 5, 4])
    assert _lists(chunk_groups(rows, at, 16)) == [(0, [5, 1, 3], [9, 8, 6]), (1, [1, 0], [7, 5]), (2, [8], [4])]


def test_no_rows_no_groups():
    assert chunk_groups(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 16) == []
