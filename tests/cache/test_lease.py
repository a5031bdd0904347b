"""The lease that locks a cache on an object store (cache/lease.py), on fsspec's memory store (no
conditional writes there: check-then-put with a nonce re-read)."""
from __future__ import annotations

import json
import time

import fsspec
import pytest

from g2sd_cache.cache.lease import LeaseLock
from g2sd_cache.common.errors import UserError


def test_a_lease_taken_over_while_we_stalled_stops_the_writer():
    fs = fsspec.filesystem("memory")
    lease = LeaseLock(fs, "/lease-a/.g2sd-cache.lock", "memory://lease-a", "extract", ttl_s=600)
    held = json.loads(fs.cat_file("/lease-a/.g2sd-cache.lock"))
    assert held["owner"] == lease.nonce and held["expires"] > time.time() + 500
    with pytest.raises(UserError, match="another extract is writing into memory://lease-a"):
        LeaseLock(fs, "/lease-a/.g2sd-cache.lock", "memory://lease-a", "extract", ttl_s=600)
    lease.check()                      # still ours
    fs.pipe_file("/lease-a/.g2sd-cache.lock", json.dumps(held | {"owner": "other", "pid": 99, "host": "h2"}).encode())
    lease.renew()
    with pytest.raises(UserError, match="taken by pid 99 on host h2"):
        lease.check()
    lease.release()                    # not ours any more: left alone
    assert json.loads(fs.cat_file("/lease-a/.g2sd-cache.lock"))["owner"] == "other"


def test_release_removes_only_our_lease_and_an_expired_one_is_taken_over():
    fs = fsspec.filesystem("memory")
    first = LeaseLock(fs, "/lease-b/.g2sd-cache.lock", "memory://lease-b", "extract", ttl_s=600)
    first.release()
    assert not fs.exists("/lease-b/.g2sd-cache.lock")
    fs.pipe_file("/lease-b/.g2sd-cache.lock", json.dumps({"owner": "x", "pid": 1, "host": "h", "expires": time.time() - 5}).encode())
    second = LeaseLock(fs, "/lease-b/.g2sd-cache.lock", "memory://lease-b", "extract", ttl_s=600)
    assert json.loads(fs.cat_file("/lease-b/.g2sd-cache.lock"))["owner"] == second.nonce
    second.release()
