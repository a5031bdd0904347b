"""The records a manifest is made from: every finished shard's shard.json, digested, or one line naming the one
that is missing (nothing is written)."""
import hashlib

import pytest

from g2sd_cache.cache.destination import LocalDestination, finished_records
from g2sd_cache.common.errors import UserError


def test_finished_records_reads_each_record_with_its_digest_and_names_a_missing_one(tmp_path):
    for i, body in ((0, b'{"index": 0}'), (2, b'{"index": 2}')):
        (tmp_path / f"shard-{i:05d}").mkdir()
        (tmp_path / f"shard-{i:05d}" / "shard.json").write_bytes(body)
    out = LocalDestination(str(tmp_path), "targets")
    texts, digests = finished_records(out, [0, 2])
    assert texts == ['{"index": 0}', '{"index": 2}']
    assert digests == [hashlib.blake2b(b'{"index": 0}', digest_size=16).hexdigest(),
                       hashlib.blake2b(b'{"index": 2}', digest_size=16).hexdigest()]
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match="shard shard-00001 is missing after extraction"):
        finished_records(out, [0, 1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == before
