"""Class mixing: extract deals a class-sorted folder to shards in a seeded random order, so the batches the
trainer cuts from cache blocks hold about as many classes as a global shuffle's (the official G2SD sampler).

The trainer's read order is modelled with numpy in benchmarks/class_mixing.py (blocks of chunk_views rows
shuffled, windows permuted, batches cut in order), independently of generic/train.py / generic/plan.py."""

import numpy as np
import pytest
import yaml
import zarr

from tests.common.helpers import micro_extract_config
from g2sd_cache import open_cache
from g2sd_cache.common.errors import UserError
from g2sd_cache.generic.extract import run_extract
from g2sd_cache.cache.schema import folder_order
from g2sd_cache.data.sources import FolderSource

from g2sd_cache.benchmarks import class_mixing as mixing  # noqa: E402

CLASSES, PER_CLASS = 16, 12
BATCH, BLOCK, WINDOW, SHARD = 16, 8, 32, 64     # the window is a sixth of the dataset, as at ImageNet scale


def mean_classes_per_batch(shard_rows: list[np.ndarray], classes: np.ndarray, epochs: int = 40) -> float:
    return float(np.mean([c for seed in range(epochs) for c in mixing.classes_per_batch(
        mixing.global_order(shard_rows, BLOCK, WINDOW, seed), classes, BATCH)]))


def test_cache_blocks_mix_classes_like_a_global_shuffle(tmp_path):
    folder = mixing.make_class_sorted_folder(tmp_path / "images", CLASSES, PER_CLASS)
    out = tmp_path / "c"
    run_extract(micro_extract_config(folder, out, img_size=32, views=1, shard_size=SHARD, chunk_views=BLOCK,
                                     batch_size=64))
    keys = FolderSource.scan(str(folder)).keys
    classes = np.array([int(k[1:4]) for k in keys])
    assert len(keys) == CLASSES * PER_CLASS and (np.diff(classes) >= 0).all()   # a class-sorted listing
    stored = [zarr.open_group(str(out / s.name), mode="r")["source_index"][0]
              for s in open_cache(out).manifest.shards]
    assert np.array_equal(np.concatenate(stored), folder_order(0, len(keys)))

    expected = mixing.global_shuffle_expectation([PER_CLASS] * CLASSES, BATCH)
    after = mean_classes_per_batch(stored, classes)
    # before: the same trainer order over shards that follow the sorted listing (what extract wrote until now)
    before = mean_classes_per_batch(np.split(np.arange(len(keys)), range(SHARD, len(keys), SHARD)), classes)
    print(f"distinct classes per batch of {BATCH}: listing order {before:.2f}, seeded order {after:.2f}, "
          f"global shuffle {expected:.2f}")
    assert after >= 0.9 * expected
    assert before < 0.6 * expected          # the measurement tells the two layouts apart


def test_global_shuffle_expectation_and_trainer_order_model():
    # 2 classes of 1 image, batch 1: one class; batch 2: both
    assert mixing.global_shuffle_expectation([1, 1], 1) == 1 and mixing.global_shuffle_expectation([1, 1], 2) == 2
    assert mixing.global_shuffle_expectation([2, 2], 2) == pytest.approx(2 * (1 - 1 / 6))
    rows = [np.arange(0, 10), np.arange(10, 16)]
    for order in (mixing.global_order(rows, 4, 5, seed=3), mixing.per_worker_order(rows, 4, 5, 2, seed=3)):
        assert sorted(order.tolist()) == list(range(16))     # every row once
    # per-worker order: one block of 16 rows, so window j holds rows 4j..4j+3; windows 0, 2 go to slot 0 and
    # 1, 3 to slot 1, and the slots give one sample each in turn
    flat = mixing.per_worker_order([np.arange(16)], 16, 4, 2, seed=0)
    assert (flat // 4).tolist() == [0, 1] * 4 + [2, 3] * 4


def test_a_cache_begun_in_listing_order_is_not_resumed_in_the_seeded_order(image_folder, tmp_path):
    """A cache started by a version that dealt images in listing order (its config.yaml has no folder_order)
    must not be completed in the new order: its finished shards would overlap the new ones."""
    out = tmp_path / "c"
    run_extract(micro_extract_config(image_folder, out))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg.pop("folder_order") == "seeded shuffle"
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="folder_order: None -> 'seeded shuffle'"):
        run_extract(micro_extract_config(image_folder, out))
