"""The epoch plan: disjoint equal rank shares, a deterministic order, and the DataLoader's interleave rule."""
import itertools

import pytest

from g2sd_cache.plan import consumed_per_slot, expected_order, plan_epoch, window_permutation


def _rows(plan):
    return [(seg.unit, r) for windows in plan.slots for w in windows for seg in w.segments
            for r in range(seg.start, seg.stop)]


@pytest.mark.parametrize("world,slots,whole", [(1, 1, False), (2, 3, False), (3, 2, False), (2, 2, True)])
def test_ranks_get_disjoint_equal_shares_covering_all_but_the_remainder(world, slots, whole):
    sizes = [7, 64, 33, 1, 0, 19]
    plans = [plan_epoch(sizes, epoch=3, seed=5, rank=r, world=world, slots=slots, block=8, window=20,
                        whole_units=whole) for r in range(world)]
    rows = [_rows(p) for p in plans]
    flat = list(itertools.chain(*rows))
    assert len(flat) == len(set(flat)), "a view is read by two ranks (or twice)"
    assert {len(r) for r in rows} == {sum(sizes) // world}
    assert all(p.rank_views == sum(sizes) // world for p in plans)
    assert plans[0].dropped == sum(sizes) - world * (sum(sizes) // world)
    assert all(0 <= r < sizes[u] for u, r in flat)


def test_plan_is_a_pure_function_of_its_inputs_and_changes_with_the_epoch():
    kw = dict(seed=1, rank=0, world=1, slots=2, block=4, window=10)
    a = plan_epoch([40, 40], epoch=0, **kw)
    assert a == plan_epoch([40, 40], epoch=0, **kw)
    assert _rows(a) != _rows(plan_epoch([40, 40], epoch=1, **kw))
    w = a.slots[0][0]
    assert (window_permutation(1, 0, 0, w) == window_permutation(1, 0, 0, w)).all()
    assert sorted(window_permutation(1, 0, 0, w)) == list(range(len(w)))


def test_windows_hold_at_most_window_rows_and_tar_units_stay_whole():
    plan = plan_epoch([50, 50], epoch=0, seed=0, rank=0, world=1, slots=3, block=8, window=12)
    assert all(len(w) <= 12 for ws in plan.slots for w in ws)
    tar = plan_epoch([5, 9, 3], epoch=0, seed=0, rank=0, world=1, slots=2, block=2, window=2, whole_units=True)
    assert sorted(len(w) for ws in tar.slots for w in ws) == [3, 5, 9]


def _round_robin(lengths):
    """Reference for the DataLoader rule: take one from each live stream in turn, skip exhausted ones."""
    pos = [0] * len(lengths)
    while any(p < n for p, n in zip(pos, lengths)):
        for s, n in enumerate(lengths):
            if pos[s] < n:
                yield s, pos[s]
                pos[s] += 1


@pytest.mark.parametrize("lengths", [[5, 5, 5], [7, 3, 0, 5], [1], [0, 4], [9, 9, 2, 2]])
def test_resuming_at_any_position_continues_the_uninterrupted_order(lengths):
    full = list(_round_robin(lengths))
    assert list(expected_order(lengths, *consumed_per_slot(lengths, 0))) == full
    for taken in range(len(full) + 1):
        consumed, rotation = consumed_per_slot(lengths, taken)
        assert consumed == [sum(1 for s, _ in full[:taken] if s == k) for k in range(len(lengths))]
        assert sorted(rotation) == list(range(len(lengths)))
        assert list(expected_order(lengths, consumed, rotation)) == full[taken:]


def test_skipping_past_the_end_is_an_error():
    with pytest.raises(ValueError):
        consumed_per_slot([2, 2], 5)
