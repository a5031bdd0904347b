"""Writing shards: a shard exists under its final name only when complete, with its record's sizes and
digests; the background writer surfaces a failure on the next call."""
import json

import numpy as np
import pytest
import zarr

from g2sd_cache.common.errors import UserError
from g2sd_cache.cache.schema import SHARD_RECORD, TMP_MARK, ShardRecord, shard_name
from g2sd_cache.cache.writer import ShardData, ShardWriter, write_shard


def _shard(index: int, n: int = 5) -> ShardData:
    rng = np.random.default_rng(index)
    arrays = {"target": rng.standard_normal((2, n, 3, 4)).astype(np.float16),
              "flip": rng.random((2, n)) < 0.5, "source_index": np.arange(2 * n).reshape(2, n)}
    return ShardData(ShardRecord(index=index, images=n, views_per_image=2, start=0, stop=n), arrays)


def test_a_written_shard_holds_its_arrays_and_a_record_of_every_file(tmp_path):
    data = _shard(3)
    written = write_shard(tmp_path, data, chunk_views=2)
    folder = tmp_path / shard_name(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]          # no temporary left behind
    record = json.loads((folder / SHARD_RECORD).read_text())
    on_disk = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and p.name != SHARD_RECORD}
    assert record["files"] == on_disk and written == sum(on_disk.values())
    assert set(record["digests"]) == set(on_disk)
    group = zarr.open_group(str(folder), mode="r")
    for name, values in data.arrays.items():
        assert np.array_equal(group[name][...], values)
        assert group[name].chunks[:2] == (1, 2)                                   # view-major inner chunks
    (tmp_path / "again").mkdir()
    write_shard(tmp_path / "again", _shard(3), chunk_views=2)                    # the same data, the same bytes
    assert json.loads((tmp_path / "again" / shard_name(3) / SHARD_RECORD).read_text()) == record


def test_a_failed_write_leaves_no_shard_and_the_writer_reports_it(tmp_path, monkeypatch):
    import g2sd_cache.cache.writer as writer
    real = writer.publish_dir

    def fail_once(tmp, final):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(writer, "publish_dir", fail_once)
    w = ShardWriter(tmp_path, chunk_views=2)
    w.submit(_shard(0))
    with pytest.raises(UserError, match="no space left on the device while writing the cache in .*rerun"):
        w.close()                                  # out of space is the user's to fix: one line
    assert not (tmp_path / shard_name(0)).exists()
    assert all(TMP_MARK in p.name for p in tmp_path.iterdir())   # only a temporary, which the next run removes
    monkeypatch.setattr(writer, "publish_dir", real)
    w = ShardWriter(tmp_path, chunk_views=2)
    for i in range(3):
        w.submit(_shard(i))
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir() if TMP_MARK not in p.name) == [shard_name(i) for i in range(3)]
    assert w.bytes_written > 0
