"""common/grouping.py: positions grouped by key, ascending keys, each group in the items' order."""
import numpy as np

from g2sd_cache.common.grouping import group_positions


def _lists(groups):
    return [(k, p.tolist()) for k, p in groups]


def test_one_key_is_every_position_in_order():
    assert _lists(group_positions(np.array([4, 4, 4]))) == [(4, [0, 1, 2])]


def test_several_keys_come_in_ascending_order_each_keeping_its_items_order():
    keys = np.array([2, 0, 2, 1, 0, 2])
    assert _lists(group_positions(keys)) == [(0, [1, 4]), (1, [3]), (2, [0, 2, 5])]


def test_no_items_no_groups():
    assert group_positions(np.array([], dtype=np.int64)) == []


def test_keys_are_python_ints():
    (k, _), = group_positions(np.array([7], dtype=np.int64))
    assert type(k) is int
    assert all(type(k) is int for k, _ in group_positions(np.array([3, 1], dtype=np.int32)))
