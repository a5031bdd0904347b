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


def _steps(run, ranks: int) -> dict[int, list[tuple[int, int]]]:
    """step -> the (image index, view) pairs it trained on, every rank's in rank order (stand-ins left out)."""
    from tests.generic.test_train import samples
    out: dict[int, list[tuple[int, int]]] = {}
    for rank in range(ranks):
        for s in samples(run, rank):
            out.setdefault(s["step"], []).extend((i, v) for i, v, ok in zip(s["index"], s["view"], s["valid"]) if ok)
    return out


@pytest.mark.slow
def test_elastic_resume_from_s3_on_another_world_size_continues_at_the_local_runs_sample(s3_bucket, micro_cache,
                                                                                          tmp_path):
    """2 gloo ranks (one node, one --local-cache) train from S3 and stop mid-epoch; 1 rank on another "node" (its own
    --local-cache) resumes from S3: every step trains on the samples, and gives the loss, of an uninterrupted
    1-rank run on the local disk at the same global batch of 4."""
    url = f"{s3_bucket}/c"
    _upload(micro_cache, url)
    kw = dict(steps=6, batch_size=4, shuffle_window=5, log_samples=True)
    full = tmp_path / "full"
    one = _train(full, str(micro_cache), **kw)
    run = tmp_path / "elastic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "g2sd_cache.cli.main", "train", "--cache", url,
           "--local-cache", str(tmp_path / "node-a"), "--out", str(run), "--student", MICRO_STUDENT,
           "--batch-size", "2", "--steps", "6", "--stop-after", "2", "--device", "cpu", "--log-every", "1",
           "--warmup-steps", "1", "--blr", "1e-3", "--shuffle-window", "5", "--workers", "0", "--log-samples"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    resumed = _train(run, url, local_cache=str(tmp_path / "node-b"), resume=True, **(kw | {"batch_size": 2,
                                                                                           "accum_iter": 2}))
    assert resumed == pytest.approx(one, rel=1e-4)          # steps 1-2 on 2 ranks, 3-6 on 1, as one rank ran them
    got, want = _steps(run, 2), _steps(full, 1)
    assert sorted(got) == sorted(want) == list(range(6))
    for step in range(6):                                   # the same samples, step by step
        assert sorted(got[step]) == sorted(want[step]), step
    assert [p for p in (tmp_path / "node-b").rglob("*") if p.is_file() and ".lock" not in p.name]   # read via S3
