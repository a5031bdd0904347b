"""Two torchrun "nodes" on this machine (one gloo rank each, each its own --local-cache) train from S3 (moto on
127.0.0.1): each node fetches each file it needs once, and the run's losses are one node's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from tests.common.helpers import MICRO_STUDENT, free_port
from tests.remote.test_train_url import _train, _upload



@pytest.mark.slow
def test_two_nodes_fetch_once_each_and_train_one_nodes_losses(s3_bucket, micro_cache, tmp_path):
    url = f"{s3_bucket}/c"
    _upload(micro_cache, url)
    one = _train(tmp_path / "one", str(micro_cache))          # global batch 4, 6 steps = 2 epochs
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "g2sd_cache.cli.main", "train", "--cache", url, "--local-cache", str(tmp_path / f"lc{node}"),
               "--out", str(tmp_path / "two"), "--student", MICRO_STUDENT, "--batch-size", "2", "--steps", "6",
               "--device", "cpu", "--log-every", "1", "--warmup-steps", "1", "--blr", "1e-3", "--shuffle-window", "5",
               "--workers", "0"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(one, rel=1e-4)
    for node, out in enumerate(outs):
        ratios = [float(r) for r in re.findall(r"epoch \d: fetched [\d.]+ MiB \(\d+ B\) from \S+ = ([\d.]+)x", out)]
        assert len(ratios) == 2 and all(0 < r <= 1.0 for r in ratios), out[-2000:]
        held = [p for p in (tmp_path / f"lc{node}").rglob("*") if p.is_file() and ".lock" not in p.name]
        # each file once: what the node holds is what it fetched (nothing was evicted without a limit)
        fetched = sum(int(m) for m in re.findall(r"fetched [\d.]+ MiB \((\d+) B\)", out))
        assert sum(p.stat().st_size for p in held) == fetched > 0
