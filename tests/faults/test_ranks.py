"""Ranks agree or nothing runs: every rank's options are compared at start (one all-gather), so ranks started with
different arguments are refused in one line on every rank (never a hang in a collective, never a cache of two
teachers), and a collective that waits too long fails instead of hanging (--dist-timeout).

Two gloo processes on CPU, started as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.common.helpers import MICRO_STUDENT, MICRO_TEACHER, free_port



def _two_ranks(argv0: list[str], argv1: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """`g2sd-cache ARGV` as rank 0 and rank 1 of a 2-process gloo group; their completed processes."""
    port = free_port()
    procs = []
    for rank, argv in enumerate((argv0, argv1)):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "g2sd_cache.cli.main", *argv], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def _refused_on_every_rank(done: list[subprocess.CompletedProcess], command: str, named: str) -> None:
    for rank, d in enumerate(done):
        line = d.stderr.strip().splitlines()[-1] if d.stderr.strip() else ""
        assert d.returncode == 2, (rank, d.stderr[-2000:])
        assert line.startswith(f"g2sd-cache {command}: error: the ranks of this {command} were started with "
                               f"different arguments: rank 1 has {named}"), (rank, d.stderr[-2000:])
        assert "Traceback" not in d.stderr


@pytest.mark.slow
def test_train_ranks_with_different_steps_are_refused_not_hung(micro_cache, tmp_path):
    """Rank 0 with --steps 4, rank 1 with --steps 8: once both hung in a collective for hours; now both exit 2
    with the same line naming the option, before the run folder is written."""
    out = tmp_path / "run"
    base = ["train", "--cache", str(micro_cache), "--out", str(out), "--student", MICRO_STUDENT, "--batch-size", "2",
            "--workers", "0", "--device", "cpu", "--warmup-steps", "1"]
    done = _two_ranks(base + ["--steps", "4"], base + ["--steps", "8"])
    _refused_on_every_rank(done, "train", "steps 8 (rank 0: 4)")
    assert not out.exists()


@pytest.mark.slow
def test_extract_ranks_with_different_teachers_are_refused(image_folder, tmp_path):
    """Rank 1 with another --teacher (and another --codec): refused on both ranks, no cache of two teachers."""
    out = tmp_path / "c"
    base = ["extract", "--data", str(image_folder), "--out", str(out), "--arch", MICRO_TEACHER, "--img-size", "64",
            "--workers", "0", "--device", "cpu", "--shard-size", "4", "--chunk-views", "2"]
    done = _two_ranks(base + ["--teacher", "random"], base + ["--teacher", "random:1", "--codec", "int8"])
    _refused_on_every_rank(done, "extract", "teacher 'random:1' (rank 0: 'random')")
    assert "codec 'int8' (rank 0: 'fp16')" in done[0].stderr
    assert not out.exists()


def test_a_collective_timeout_that_is_not_positive_is_refused():
    from g2sd_cache.common.dist import init_distributed
    from g2sd_cache.common.errors import UserError
    with pytest.raises(UserError, match="--dist-timeout 0"):
        init_distributed("cpu", timeout_min=0)


@pytest.mark.slow
def test_a_collective_waiting_past_the_timeout_fails_instead_of_hanging(tmp_path):
    """Rank 1 joins the group but never reaches the barrier: rank 0's barrier fails after --dist-timeout (here 3 s),
    where the default of torch.distributed waited 30 minutes and this project's earlier one 72 hours."""
    port = free_port()
    code = ("import sys, time\nfrom g2sd_cache.common.dist import init_distributed\n"
            "env = init_distributed('cpu', timeout_min=0.05)\n"
            "if env.rank == 1:\n    time.sleep(60)\n    sys.exit(0)\n"
            "t = time.monotonic()\n"
            "try:\n    env.barrier()\nexcept Exception:\n    print(f'failed after {time.monotonic() - t:.0f} s')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for r in (0, 1)]
    try:
        out, err = procs[0].communicate(timeout=50)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert out.startswith("failed after"), err[-2000:]
    assert int(out.split()[2]) < 30
