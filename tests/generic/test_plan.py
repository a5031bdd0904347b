"""The epoch plan: a global order that is a pure function of (seed, epoch), cut into global batches whose
rank slices cover every sample once, whatever the world size; resume at any sample position."""
import itertools

import numpy as np
import pytest

from g2sd_cache.generic.plan import PAD, epoch_order, rank_positions, steps_in_epoch

SIZES = [7, 64, 33, 1, 0, 19]


def _pairs(order):
    return list(zip(order.unit.tolist(), order.row.tolist()))


@pytest.mark.parametrize("whole", [False, True])
def test_the_epoch_order_is_a_permutation_of_every_row_and_a_pure_function(whole):
    kw = dict(seed=5, block=8, window=20, whole_units=whole)
    a = epoch_order(SIZES, epoch=3, **kw)
    assert sorted(_pairs(a)) == [(u, r) for u, n in enumerate(SIZES) for r in range(n)]
    assert _pairs(a) == _pairs(epoch_order(SIZES, epoch=3, **kw))
    assert _pairs(a) != _pairs(epoch_order(SIZES, epoch=4, **kw))
    assert _pairs(a) != _pairs(epoch_order(SIZES, epoch=3, **(kw | {"seed": 6})))


def test_windows_shuffle_within_reach_and_tar_units_stay_whole_and_contiguous():
    order = epoch_order([50, 50], epoch=0, seed=0, block=8, window=12)
    # each window of 12 consecutive samples draws from at most a few blocks of 8 rows (reads stay local)
    for a in range(0, 100, 12):
        blocks = {(u, r // 8) for u, r in _pairs(order)[a:a + 12]}
        assert len(blocks) <= 3
    tar = epoch_order([5, 9, 3], epoch=0, seed=0, block=2, window=2, whole_units=True)
    runs = [u for u, _ in itertools.groupby(tar.unit.tolist())]
    assert sorted(runs) == [0, 1, 2]                    # each tar's rows are one contiguous run
    assert list(tar.row[tar.unit == 1]) != list(range(9))   # ... shuffled inside


@pytest.mark.parametrize("n,global_batch,world", [(12, 4, 1), (12, 4, 2), (12, 4, 4), (13, 6, 3), (5, 8, 2), (1, 2, 2)])
def test_rank_slices_cover_every_sample_once_with_padding_only_at_the_end(n, global_batch, world):
    per_rank = [rank_positions(n, start=0, global_batch=global_batch, rank=r, world=world) for r in range(world)]
    steps = steps_in_epoch(n, global_batch)
    assert all(p.shape == (steps, global_batch // world) for p in per_rank)   # the same steps on every rank
    flat = np.concatenate([p.reshape(-1) for p in per_rank])
    real = sorted(flat[flat != PAD].tolist())
    assert real == list(range(n))
    assert (flat == PAD).sum() == steps * global_batch - n
    # step k of every rank is global batch k: ranks take contiguous slices of it, in rank order
    for k in range(steps):
        joined = np.concatenate([p[k] for p in per_rank])
        expect = np.arange(k * global_batch, (k + 1) * global_batch)
        assert joined.tolist() == np.where(expect < n, expect, PAD).tolist()


def test_the_global_batches_do_not_depend_on_the_world_size_and_resume_at_any_position():
    n, gb = 23, 6
    one = rank_positions(n, start=0, global_batch=gb, rank=0, world=1)
    for world in (2, 3, 6):
        slices = [rank_positions(n, start=0, global_batch=gb, rank=r, world=world) for r in range(world)]
        assert np.array_equal(np.concatenate(slices, axis=1), one)
    # resuming at sample 12 (after two steps) continues with the third global batch
    assert np.array_equal(rank_positions(n, start=12, global_batch=gb, rank=0, world=1), one[2:])
    # with another global batch, at the same sample
    other = rank_positions(n, start=12, global_batch=4, rank=0, world=1).reshape(-1)
    assert other[other != PAD].tolist() == list(range(12, n))


def test_a_global_batch_that_is_not_a_multiple_of_the_world_size_is_refused():
    with pytest.raises(ValueError, match="multiple"):
        rank_positions(10, start=0, global_batch=5, rank=0, world=2)


def test_the_window_permutation_changes_with_the_epoch_on_its_own():
    """One block and one window: the block shuffle cannot move anything, so any change between epochs comes
    from the window permutation; it must depend on the epoch (and the seed), or the order repeats."""
    orders = [_pairs(epoch_order([40], seed=1, epoch=e, block=40, window=40)) for e in range(4)]
    assert all(sorted(o) == [(0, r) for r in range(40)] for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    assert _pairs(epoch_order([40], seed=2, epoch=0, block=40, window=40)) != orders[0]


def test_the_epoch_order_matches_an_independent_reference():
    """The documented recipe written out here: blocks shuffled by Philox(seed, epoch, 0x626C6B), then each
    window j's rows permuted by Philox(seed, epoch, j, 0x77696E)."""
    sizes, seed, block, window = [10, 7], 3, 4, 6
    for epoch in (0, 1, 5):
        blocks = [(u, s, min(n, s + block)) for u, n in enumerate(sizes) for s in range(0, n, block)]
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, epoch, 0x626C6B])))
        rows = [(u, r) for i in rng.permutation(len(blocks)) for u, a, z in [blocks[i]] for r in range(a, z)]
        want = []
        for j, a in enumerate(range(0, len(rows), window)):
            chunk = rows[a:a + window]
            wrng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, epoch, j, 0x77696E])))
            want += [chunk[k] for k in wrng.permutation(len(chunk))]
        assert _pairs(epoch_order(sizes, seed=seed, epoch=epoch, block=block, window=window)) == want


# -- shuffle spans (--shuffle-span): blocks shuffled within spans of whole units, windows cut inside spans --------

def _open_units(order) -> list[set[int]]:
    """The order's stretches of overlapping unit lifetimes (a unit lives from its first row to its last): the sets
    of units that must be readable together."""
    units = order.unit.tolist()
    life = {u: [units.index(u), len(units) - 1 - units[::-1].index(u)] for u in set(units)}
    groups, end = [], -1
    for u in sorted(life, key=lambda u: life[u][0]):
        if life[u][0] > end:
            groups.append(set())
        groups[-1].add(u)
        end = max(end, life[u][1])
    return groups


@pytest.mark.parametrize("span", [1, 40, 64, 100, 10**6])
def test_a_shuffle_span_keeps_every_row_once_and_reads_one_spans_units_at_a_time(span):
    sizes = [30, 7, 0, 25, 18, 40, 12, 33]
    kw = dict(seed=4, block=4, window=10, span=span)
    a = epoch_order(sizes, epoch=2, **kw)
    assert sorted(_pairs(a)) == [(u, r) for u, n in enumerate(sizes) for r in range(n)]
    assert _pairs(a) == _pairs(epoch_order(sizes, epoch=2, **kw))
    assert _pairs(a) != _pairs(epoch_order(sizes, epoch=3, **kw))
    # the units that must be readable at once hold less than a span plus one unit (a span closes once full)
    groups = _open_units(a)
    assert all(sum(sizes[u] for u in g) < span + max(sizes) for g in groups)
    if span <= 40:
        assert len(groups) >= 3
    # without spans the whole epoch is one such stretch: the bound is what spans add
    assert len(_open_units(epoch_order(sizes, epoch=2, seed=4, block=4, window=10))) == 1


def test_a_shuffle_span_matches_an_independent_reference():
    """The documented span recipe written out here: units permuted by Philox(seed, epoch, 0x756E74); spans close
    once they hold >= span rows; span k's blocks permuted by Philox(seed, epoch, k, 0x626C6B); windows of
    `window` rows cut inside each span, numbered j over the epoch, each permuted by Philox(seed, epoch, j,
    0x77696E)."""
    sizes, seed, block, window, span = [10, 7, 0, 9, 5], 3, 4, 6, 12
    gen = lambda *key: np.random.Generator(np.random.Philox(np.random.SeedSequence(list(key))))  # noqa: E731
    for epoch in (0, 1, 5):
        groups, rows = [[]], 0
        for u in gen(seed, epoch, 0x756E74).permutation(len(sizes)):
            if rows >= span:
                groups, rows = groups + [[]], 0
            groups[-1].append(int(u))
            rows += sizes[u]
        want, j = [], 0
        for k, members in enumerate(groups):
            blocks = [(u, s, min(sizes[u], s + block)) for u in members for s in range(0, sizes[u], block)]
            flat = [(u, r) for i in gen(seed, epoch, k, 0x626C6B).permutation(len(blocks))
                    for u, a, z in [blocks[i]] for r in range(a, z)]
            for a in range(0, len(flat), window):
                chunk = flat[a:a + window]
                want += [chunk[i] for i in gen(seed, epoch, j, 0x77696E).permutation(len(chunk))]
                j += 1
        assert _pairs(epoch_order(sizes, seed=seed, epoch=epoch, block=block, window=window, span=span)) == want
    # span 0 is the whole-epoch recipe, unchanged (test_the_epoch_order_matches_an_independent_reference)
    assert _pairs(epoch_order(sizes, seed=1, epoch=0, block=4, window=6, span=0)) == \
        _pairs(epoch_order(sizes, seed=1, epoch=0, block=4, window=6))
