"""Promise 10, fork safety: forked DataLoader workers read a cache their parent opened.

Caches come from the micro teacher at 64 px (tests/conftest.py); corruption is always done on a copy
of the shared `micro_cache`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest






# ----------------------------------------------------------------------------------------------
# 9. fork safety

FORK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch.utils.data import DataLoader, Dataset
    from g2sd_cache.cache.reader import open_cache

    cache = open_cache(sys.argv[1])
    parent = [cache[i].target for i in range(len(cache))]     # the parent opened every shard (zarr IO thread up)

    class Views(Dataset):
        def __len__(self):
            return len(cache)

        def __getitem__(self, i):
            r = cache[i]
            return i, r.target, r.mask

    loader = DataLoader(Views(), batch_size=5, num_workers=2, multiprocessing_context="fork")
    seen = 0
    for idx, target, mask in loader:
        for j, t in zip(idx.tolist(), target):
            assert torch.equal(t, parent[j]), j
            seen += 1
    blocks = list(cache.iter_blocks())                          # the parent still reads after the workers
    assert seen == len(cache), seen
    print("OK", seen, len(blocks))
""")


@pytest.mark.slow
def test_forked_dataloader_workers_read_a_cache_the_parent_opened(micro_cache):
    """Fork safety: a DataLoader with 2 fork-started workers reads a cache that the parent has already opened and
    read (zarr's IO thread running), returns the same targets as the parent, and finishes within a timeout
    (a deadlock fails the test instead of hanging the suite)."""
    try:
        proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(micro_cache)], capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("forked DataLoader workers did not finish within 180 s: deadlock after fork")
    assert proc.returncode == 0 and proc.stdout.startswith("OK 24"), proc.stderr[-3000:]
