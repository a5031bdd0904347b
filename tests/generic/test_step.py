"""The distillation step on its own: one normalisation per optimizer step (every valid sample weighs the
same however the step is cut into micro-batches and ranks), and the cross-rank reductions of the metrics.

Per-sample weights are recovered by least squares: the step's gradient (through the real `Distiller`
micro-steps, DDP included) against the gradients of each sample's own loss.
"""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from g2sd_cache.common.dist import DistEnv
from g2sd_cache.generic.step import Distiller, Setup, TrainConfig
from g2sd_cache.generic.stream import Batch
from g2sd_cache.data.views import ViewGeometry
from tests.common.helpers import free_port

STUDENT = "test_vit_micro_patch16_dec32d1b"
G = ViewGeometry(img_size=64, patch_size=16)      # L = 16 patches, 4 visible
T, D = 17, 32


def _setup() -> Setup:
    return Setup(source=None, cache=None, teacher=None, geometry=G, target_layer=4, target_dim=D, unit_sizes=[1],
                 block=1, whole_units=False, views_per_image=1, notes=[])


def _samples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(G.num_patches, dtype=torch.bool)
        mask[torch.randperm(G.num_patches, generator=g)[:G.num_visible]] = False
        out.append({"patches": torch.randint(0, 256, (G.num_visible, 16, 16, 3), dtype=torch.uint8, generator=g),
                    "mask": mask, "codes": torch.randn(T, D, generator=g).half()})
    return out


def _batch(samples: list[dict], valid: list[bool]) -> Batch:
    n = len(samples)
    return Batch(patches=torch.stack([s["patches"] for s in samples]), mask=torch.stack([s["mask"] for s in samples]),
                 valid=torch.tensor(valid), codes=torch.stack([s["codes"] for s in samples]), scale=None,
                 index=torch.arange(n), view=torch.zeros(n, dtype=torch.int64), keys=[], errors=[])


def _distiller(world: int = 1, rank: int = 0) -> Distiller:
    cfg = TrainConfig(out="unused", cache="unused", student=STUDENT, device="cpu", precision="fp32", seed=0)
    return Distiller(cfg, _setup(), DistEnv(rank, world, 0, torch.device("cpu")))


def _step_gradient(d: Distiller, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of one optimizer step (no update), and the step's loss (this rank's share)."""
    d.optimizer.zero_grad(set_to_none=True)
    d.begin_step(batches)
    losses = [d.micro_step(b, w, sync=i == len(batches) - 1)[0] for i, (b, w) in enumerate(zip(batches, d._weights))]
    grad = torch.cat([p.grad.flatten() for p in d.student.parameters() if p.grad is not None])
    return grad, torch.stack(losses).sum()


def _per_sample_gradients(samples: list[dict]) -> tuple[torch.Tensor, list[float]]:
    """Each sample's own loss gradient (its mean over all tokens), and its loss."""
    d = _distiller()
    cols, losses = [], []
    for s in samples:
        g, loss = _step_gradient(d, [_batch([s], [True])])
        cols.append(g)
        losses.append(float(loss))
    return torch.stack(cols, dim=1), losses


def _weights(step_grad: torch.Tensor, per_sample: torch.Tensor) -> np.ndarray:
    w = torch.linalg.lstsq(per_sample.double(), step_grad.double()[:, None]).solution[:, 0]
    return w.numpy()


# Cases: a step's micro-batches, each a list of valid flags (False = a zero-weight stand-in).
CASES = {
    "accumulation [v v][v X]": [[True, True], [True, False]],
    "partial last micro-batch [v v][v v][v]": [[True, True], [True, True], [True]],
    "all-invalid micro-batch [v v][X X]": [[True, True], [False, False]],
    "equal micro-batches [v v][v v]": [[True, True], [True, True]],
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_valid_sample_weighs_the_same_however_the_step_is_cut(case):
    layout = CASES[case]
    samples = _samples(sum(len(m) for m in layout), seed=1)
    per_sample, losses = _per_sample_gradients(samples)
    batches, k = [], 0
    for flags in layout:
        batches.append(_batch(samples[k:k + len(flags)], flags))
        k += len(flags)
    grad, loss = _step_gradient(_distiller(), batches)
    flags = [f for m in layout for f in m]
    v = sum(flags)
    w = _weights(grad, per_sample)
    expect = np.array([1 / v if f else 0.0 for f in flags])
    assert np.allclose(w, expect, atol=1e-4), (case, w)
    # the logged loss is the same quantity: the mean of the valid samples' own losses
    assert float(loss) == pytest.approx(np.mean([x for x, f in zip(losses, flags) if f]), rel=1e-5)



def _ddp_rank(rank: int, world: int, port: int, layouts, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        samples = _samples(sum(len(m) for r in layouts for m in r), seed=1)
        k = sum(len(m) for r in layouts[:rank] for m in r)
        batches = []
        for flags in layouts[rank]:
            batches.append(_batch(samples[k:k + len(flags)], flags))
            k += len(flags)
        grad, loss = _step_gradient(_distiller(world, rank), batches)
        total = loss.clone()
        dist.all_reduce(total)
        if rank == 0:
            torch.save({"grad": grad, "loss": total}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_with_unequal_valid_counts_weigh_every_sample_the_same(tmp_path):
    """Rank 0 [v v], rank 1 [v X]: the all-reduced gradient weighs the three valid samples 1/3 each."""
    layouts = [[[True, True]], [[True, False]]]
    out = str(tmp_path / "grad.pt")
    mp.start_processes(_ddp_rank, args=(2, free_port(), layouts, out), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=True)
    samples = _samples(4, seed=1)
    per_sample, losses = _per_sample_gradients(samples)
    w = _weights(got["grad"], per_sample)
    assert np.allclose(w, [1 / 3, 1 / 3, 1 / 3, 0.0], atol=1e-4), w
    assert float(got["loss"]) == pytest.approx(np.mean(losses[:3]), rel=1e-5)


def _runlog_rank(rank: int, world: int, port: int, run: str) -> None:
    from pathlib import Path

    from g2sd_cache.generic.step import StepResult
    from g2sd_cache.generic.runlog import RunLog
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        log = RunLog(Path(run), DistEnv(rank, world, 0, torch.device("cpu")), mode="replay", global_batch=4,
                     start_step=0, log_samples=False)
        # rank r: loss share 0.25 (r + 1), one micro-batch with relative error 0.1 (r + 1), max abs error r + 1
        log.add(0, StepResult(loss=torch.tensor(0.25 * (rank + 1)), replay_rel_sum=torch.tensor(0.1 * (rank + 1)),
                              replay_batches=1, replay_max_abs=torch.tensor(float(rank + 1)), skipped=rank), 0.0)
        log.write(1, 0, 1e-3)
        log.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_reduce_sums_means_and_maxima_across_ranks(tmp_path):
    import json
    mp.start_processes(_runlog_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["loss"] == pytest.approx(0.75)                 # the ranks' shares of the global mean, summed
    assert record["replay_rel_rmse"] == pytest.approx(0.15)      # mean over micro-batches of all ranks
    assert record["replay_max_abs_err"] == pytest.approx(2.0)    # MAX, not the sum 3.0
    assert record["skipped_views"] == 1
