"""The training input, stage by stage: the pixel path's reads, stand-ins, step grouping and the background
reader; the image path gives the same samples whatever the number of workers."""
import numpy as np
import pytest
import torch

from g2sd_cache import open_cache
from g2sd_cache.generic.plan import PAD, epoch_order, rank_positions
from g2sd_cache.generic.stream import StepLoader, StreamSpec, _background, group_steps, read_cached, stand_in_mask
from g2sd_cache.data.sources import open_source


def _spec(cache_dir, data=None, epoch=0, keys=False) -> StreamSpec:
    cache = open_cache(cache_dir)
    m = cache.manifest
    order = epoch_order(list(cache.shard_images), seed=0, epoch=epoch, block=m.chunk_views, window=5)
    return StreamSpec(open_source(str(data)) if data else None, cache, m.geometry, m.seed, epoch % m.views_per_image,
                      order, keys=keys)


def test_group_steps_cuts_micro_batches_into_steps_with_a_short_last_one():
    assert list(group_steps(3)(iter(range(7)))) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(group_steps(1)(iter("ab"))) == [["a"], ["b"]]


def test_read_cached_returns_the_planned_views_and_zeroed_stand_ins(micro_cache):
    spec = _spec(micro_cache, keys=True)
    cache = spec.cache
    pos = np.array([3, PAD, 0, 7])
    (batch,) = list(read_cached(spec, pin=False)(iter([pos])))
    assert batch.patches.shape == (4, 4, 16, 16, 3) and batch.patches.dtype == torch.uint8
    assert batch.valid.tolist() == [True, False, True, True] and batch.errors == []
    for i, p in enumerate(pos):
        if p == PAD:
            assert not batch.patches[i].any() and not batch.codes[i].float().any()
            assert batch.mask[i].tolist() == stand_in_mask(spec.geometry).tolist() and batch.index[i] == -1
            assert batch.keys[i] == ""
            continue
        block = cache.read_block(int(spec.order.unit[p]), spec.view, int(spec.order.row[p]), int(spec.order.row[p]) + 1)
        assert np.array_equal(batch.patches[i].numpy(), block.pixels[0])
        assert np.array_equal(batch.codes[i].numpy(), block.codes[0])
        assert np.array_equal(batch.mask[i].numpy(), block.mask[0])
        assert batch.index[i] == block.source_index[0] and batch.keys[i] == str(block.key[0])
    assert batch.view.tolist() == [spec.view] * 4


def test_the_image_path_gives_the_same_batches_with_any_number_of_workers(micro_cache_no_pixels, image_folder):
    spec = _spec(micro_cache_no_pixels, image_folder, epoch=1)
    positions = rank_positions(len(spec.order), start=0, global_batch=5, rank=0, world=1)   # 12 views: 3 steps, padded
    runs = [[b for step in StepLoader(spec, positions, batch_size=5, workers=w, prefetch=2, pin_memory=False)
             for b in step] for w in (0, 2)]
    assert [len(b) for b in runs[0]] == [5, 5, 5]
    assert runs[0][-1].valid.tolist() == [True, True, False, False, False]
    for a, b in zip(*runs):
        assert torch.equal(a.patches, b.patches) and torch.equal(a.codes, b.codes) and torch.equal(a.index, b.index)


def test_the_pixel_path_and_the_image_path_agree(micro_cache, micro_cache_no_pixels, image_folder):
    """The same views: stored pixels are what decoding and rendering the images gives."""
    pix = _spec(micro_cache)
    img = _spec(micro_cache_no_pixels, image_folder)
    positions = rank_positions(len(pix.order), start=0, global_batch=6, rank=0, world=1)
    a = [b for s in StepLoader(pix, positions, batch_size=3, workers=0, prefetch=1, pin_memory=False) for b in s]
    b = [b for s in StepLoader(img, positions, batch_size=3, workers=0, prefetch=1, pin_memory=False) for b in s]
    for x, y in zip(a, b):
        assert torch.equal(x.patches, y.patches) and torch.equal(x.mask, y.mask) and torch.equal(x.codes, y.codes)


def test_the_background_reader_keeps_order_and_re_raises_in_the_consumer():
    assert list(_background(lambda: iter(range(5)), depth=2)) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise ValueError("disk gone")
    got = _background(broken, depth=1)
    assert next(got) == 1
    with pytest.raises(ValueError, match="disk gone"):
        next(got)


def _next_within(it, seconds: float):
    """next(it) on a helper thread: (value or exception, finished in time)."""
    import threading
    out = {}

    def run():
        try:
            out["value"] = next(it)
        except BaseException as e:   # noqa: BLE001 - handed back to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    return out, not t.is_alive()


def test_an_error_while_setting_up_the_reader_reaches_the_consumer_instead_of_a_hang():
    def make():
        raise OSError("cannot build the reader")
    out, finished = _next_within(_background(make, depth=2), 10)
    assert finished, "the consumer is still blocked 10 s after the reader's set-up failed"
    assert isinstance(out.get("error"), OSError) and "cannot build the reader" in str(out["error"])


def test_a_producer_that_dies_without_its_last_item_does_not_block_the_consumer(monkeypatch):
    import queue as queue_module

    class Lossy(queue_module.Queue):
        """Drops everything after the first item, as a producer killed mid-way would."""
        def put(self, item, block=True, timeout=None):
            self.seen = getattr(self, "seen", 0) + 1
            if self.seen == 1:
                super().put(item, block, timeout)

    monkeypatch.setattr("g2sd_cache.generic.stream.queue.Queue", Lossy)
    got = _background(lambda: iter(range(3)), depth=2)
    assert next(got) == 0
    out, finished = _next_within(got, 10)
    assert finished and isinstance(out.get("error"), RuntimeError), out


def test_an_unreadable_row_comes_back_invalid_zeroed_and_named(micro_cache, tmp_path):
    """A flipped byte in the targets of view 0, rows 2..3 of shard-00001: those two rows of a batch come back
    valid=False, zeroed, with the stand-in mask and index -1, each with an error naming the shard; the other
    rows of the batch are read as usual (the loss then ignores the two by their weight, not by luck)."""
    from tests.common.faults import chunk_span, copy_cache, flip_byte, shard_file
    c = copy_cache(micro_cache, tmp_path / "c")
    path = shard_file(c, "shard-00001", "target", view=0)
    off, _ = chunk_span(path, c / "shard-00001" / "target", 1)
    flip_byte(path, off + 7)
    spec = _spec(c, keys=True)
    bad = [p for p in range(len(spec.order)) if spec.order.unit[p] == 1 and spec.order.row[p] in (2, 3)]
    good = [p for p in range(len(spec.order)) if spec.order.unit[p] == 0][:2]
    pos = np.array([good[0], *bad, good[1]])
    (batch,) = list(read_cached(spec, pin=False)(iter([pos])))
    assert batch.valid.tolist() == [True, False, False, True]
    for i in (1, 2):
        assert not batch.patches[i].any() and not batch.codes[i].float().any() and batch.index[i] == -1
        assert batch.mask[i].tolist() == stand_in_mask(spec.geometry).tolist()
    assert len(batch.errors) == 2 and all("shard-00001" in e for e in batch.errors), batch.errors
    assert batch.codes[0].float().abs().sum() > 0 and batch.codes[3].float().abs().sum() > 0
