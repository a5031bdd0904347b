"""Step section: online G2SD steps against cached steps, side by side, through the product's own step.

Every step is `Distiller.step` (g2sd_cache/generic/step.py) built as `g2sd-cache train` builds it —
`TrainConfig` -> `prepare` -> `Distiller` — and fed by train's own epoch loader (`StepLoader`):
- online: a teacher in the loop; `--workers` DataLoader processes decode the images, crop, flip and cut
  the visible patches (1 worker on CPU, so image decoding overlaps the step);
- cached: no teacher; visible patches and targets come from the cache (pixels stored, the default) through
  the pixel path: block reads from the memory-mapped shards on a background thread, no image opened.

One round times, in turn: the online step of every (teacher, student) pair, the cached step of every
student, the student step alone and the teacher forward alone (both on one batch already in memory, no
data loading). Rounds alternate direction (ABBA); each ratio is taken within a round, then the median
over rounds, so drift of a noisy machine cancels. Per pair:
- `speedup` = cached samples/s / online samples/s;
- `ideal_speedup` = (t_teacher + t_student) / t_student: what removing the teacher can give at most;
- `efficiency` = speedup / ideal (target >= 0.95);
- `online_overhead_ms` = t_online - t_teacher - t_student and `cached_overhead_ms` = t_cached - t_student:
  what data loading adds to a step (on a 2-core CPU the image worker competes with torch's threads);
- `data_wait_frac`: the fraction of a timed step spent waiting for the next batch.
Loader start-up up to an epoch's first batch is timed apart (`loader_startup_s`), never inside a step.
A loader keeps up to `prefetch` steps ready (read while other cells ran), so each timed loader cell first runs
max(drain, prefetch) untimed steps: a timed step never finds its batch made for free.

Each cell times its steps one by one (synchronised) and keeps going past `steps` until the standard error of
its mean is within `stable_rel` of it (about +-7 % at 95 %), up to `max_steps`: `timed_steps` and `rel_sem`
per cell are in each round's row, `unstable_cells` counts those that hit the cap. A step's timing cannot be
below its own lower bound (an online step runs the teacher and a student step, a cached step a student step);
any cell that is, beyond its measured noise, is listed in `below_lower_bound` with both figures, so an
impossible number is flagged, never silently reported.

Also `student_breakdown_ms` (forward / loss + backward / AdamW of `Distiller`'s own step, synchronised
between parts) and `gflop_per_sample` (benchmarks/sections/flops.py): `student_gflop_per_sample` (the headline student,
forward + backward at mask 0.75) and `teacher_gflop_per_sample` (the headline teacher's target forward).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from g2sd_cache.benchmarks.sections import Bench, section
from g2sd_cache.benchmarks.common import SEED, Profile, log, median, sync
from g2sd_cache.benchmarks.sections.flops import default_student_gflop, student_gflop, teacher_gflop


@dataclasses.dataclass
class Run:
    """What train builds before its first step, for one configuration."""
    cfg: object
    setup: object
    env: object
    sched: object

    @classmethod
    def build(cls, cfg, env, setup=None) -> "Run":
        from g2sd_cache.generic.step import prepare
        from g2sd_cache.generic.train import make_schedule

        cfg.validate()
        setup = setup or prepare(cfg, env)
        return cls(cfg, setup, env, make_schedule(cfg, setup.epoch_size, env.world))

    def loader(self, epoch: int, **overrides):
        """Train's loader of `epoch` from its first sample (overrides: TrainConfig fields, e.g. workers)."""
        from g2sd_cache.generic.train import epoch_loader

        cfg = dataclasses.replace(self.cfg, **overrides)
        return epoch_loader(cfg, self.setup, self.env, self.sched, epoch, 0)


class Feed:
    """Full steps from one epoch loader after another (a new epoch when one runs out); start-up up to an
    epoch's first step is timed apart (`startups`), never inside a timed step."""

    def __init__(self, run: Run):
        self.run, self.epoch, self.it, self.left, self.peeked = run, -1, None, 0, None
        self.full = run.setup.epoch_size // run.sched.global_batch   # the last step may hold stand-ins
        self.startups: list[float] = []

    def ensure(self, n: int) -> None:
        if self.left >= n:
            return
        if self.full < n:
            raise SystemExit(f"an epoch has {self.full} full steps, a cell needs {n}: use more images")
        self.close()
        self.epoch += 1
        t0 = time.perf_counter()
        self.it = iter(self.run.loader(self.epoch))
        self.peeked = next(self.it)
        self.startups.append(time.perf_counter() - t0)
        self.left = self.full

    def next(self) -> list:
        self.left -= 1
        batches, self.peeked = (self.peeked, None) if self.peeked is not None else (next(self.it), None)
        if not all(bool(b.valid.all()) for b in batches):
            raise RuntimeError(f"the benchmark data has unreadable samples: {[b.errors[:2] for b in batches]}")
        return batches

    def close(self) -> None:
        if self.it is not None:
            self.it.close()      # stops the reader thread (and the DataLoader workers) at once
            self.it, self.peeked, self.left = None, None, 0


def _breakdown(distiller, batch, lr: float, repeats: int) -> dict:
    """ms per part of `Distiller.step` on one in-memory batch, synchronised between parts."""
    from g2sd_cache.data.views import normalize_patches

    dev, parts = distiller.env.device, {}
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        with distiller.autocast():       # the forward alone, as the step runs it (graph built, then dropped)
            distiller.model(normalize_patches(batch.device_patches(dev)), batch.mask.to(dev))
        sync(dev)
        t1 = time.perf_counter()
        distiller.micro_step(batch, torch.ones((), device=dev))   # one all-valid micro-batch: share 1
        sync(dev)
        t2 = time.perf_counter()
        distiller.optimizer_step(lr)
        sync(dev)
        t3 = time.perf_counter()
        for key, dt in (("forward", t1 - t0), ("loss + backward", (t2 - t1) - (t1 - t0)), ("adamw", t3 - t2)):
            parts.setdefault(key, []).append(1e3 * dt)
    return {k: median(v) for k, v in parts.items()}


def step_section(ws: dict, prof: Profile, device: torch.device) -> dict:
    from g2sd_cache.common.dist import init_distributed
    from g2sd_cache.generic.step import Distiller, TrainConfig
    from g2sd_cache.data.views import normalize_patches

    env = init_distributed(str(device))
    base = TrainConfig(out=str(ws["tmp"] / "run"), student=prof.students[0], batch_size=prof.batch,
                       workers=prof.workers, prefetch=prof.prefetch, seed=SEED, device=str(device))
    log(f"step: building teachers {', '.join(prof.teachers)} and students {', '.join(prof.students)}")
    cached = Run.build(dataclasses.replace(base, cache=str(ws["cache"])), env)
    online = {t: Run.build(dataclasses.replace(base, data=str(ws["images"]), teacher=f"random:{SEED}", arch=t,
                                               img_size=prof.img_size), env) for t in prof.teachers}
    d_cached = {s: Distiller(dataclasses.replace(cached.cfg, student=s), cached.setup, env) for s in prof.students}
    d_online = {(t, s): Distiller(dataclasses.replace(online[t].cfg, student=s), online[t].setup, env)
                for t in prof.teachers for s in prof.students}
    lr = cached.sched.base_lr
    # The online loader depends on the images and the view geometry only: one serves every teacher.
    feeds = {"online": Feed(online[prof.teachers[0]]), "cached": Feed(cached)}
    ws["runs"] = {"cached": cached, "online": online[prof.teachers[0]]}   # the data section reads through them

    feeds["cached"].ensure(1)
    (b0,) = feeds["cached"].next()     # one real batch, kept in memory, for the "alone" cells
    fixed_patches, fixed_mask = b0.device_patches(device), b0.mask.to(device)

    def loader_cell(feed: Feed, d) -> dict:
        for _ in range(max(prof.drain, prof.prefetch)):
            feed.ensure(1)
            d.step(feed.next(), lr)
        waits = []

        def one():
            tw = time.perf_counter()
            batches = feed.next()
            waits.append(time.perf_counter() - tw)
            d.step(batches, lr)
        cell = time_cell(one, prof, device, before=lambda: feed.ensure(1))   # a new epoch's start-up: untimed
        return cell | {"data_wait_frac": sum(waits) / (cell["s_per_step"] * len(waits))}

    def fixed_cell(fn) -> dict:
        return time_cell(fn, prof, device)

    def teacher_alone(t: str):
        d, setup = d_online[(t, prof.students[0])], online[t].setup

        def run():
            with d.teacher_autocast():
                setup.teacher.targets_visible(normalize_patches(fixed_patches), fixed_mask, setup.target_layer)
        return run

    def run(cell) -> dict:
        kind = cell[0]
        if kind == "online":
            return loader_cell(feeds["online"], d_online[(cell[1], cell[2])])
        if kind == "cached":
            return loader_cell(feeds["cached"], d_cached[cell[1]])
        if kind == "student":
            return fixed_cell(lambda: d_cached[cell[1]].step([b0], lr))
        return fixed_cell(teacher_alone(cell[1]))

    # A round: per student, online steps of each teacher alternating with its cached and alone cells.
    cells = []
    for s in prof.students:
        onl, fillers = [("online", t, s) for t in prof.teachers], [("cached", s), ("student", s)]
        for j in range(max(len(onl), len(fillers))):
            cells += onl[j:j + 1] + fillers[j:j + 1]
    cells += [("teacher", t) for t in prof.teachers]

    results: list[dict] = []
    for r in range(prof.warm_rounds + prof.rounds):
        t0 = time.perf_counter()
        got = {cell: run(cell) for cell in (cells if r % 2 == 0 else cells[::-1])}
        log(f"step: round {r + 1}/{prof.warm_rounds + prof.rounds}{' (warm-up)' if r < prof.warm_rounds else ''} "
            f"took {time.perf_counter() - t0:.1f} s")
        if r >= prof.warm_rounds:
            results.append(got)
    for feed in feeds.values():
        feed.close()

    log("step: parts of a student step, and FLOPs per sample")
    breakdown = {s: _breakdown(d_cached[s], b0, lr, prof.breakdown_repeats) for s in prof.students}
    g = cached.setup.geometry
    gflop = {s: student_gflop(d_cached[s].student, g) for s in prof.students}
    gflop |= {t: teacher_gflop(online[t].setup.teacher, g, online[t].setup.target_layer) for t in prof.teachers}
    from g2sd_cache.models.mae import DEFAULT_STUDENT, TEACHER_PRESETS
    if DEFAULT_STUDENT not in gflop:   # the feed-cores estimate is for train's defaults: this student, ViT-B targets
        gflop[DEFAULT_STUDENT] = default_student_gflop(TEACHER_PRESETS[TrainConfig.arch].decoder_embed_dim, g)

    pairs = [_pair(results, t, s, prof.batch, prof.stable_rel) for s in prof.students for t in prof.teachers]
    main = pairs[0]
    return {
        **{k: main[k] for k in ("online_samples_per_s", "cached_samples_per_s", "speedup", "ideal_speedup",
                                "efficiency", "teacher", "student", "batch_size")},
        "student_gflop_per_sample": gflop[main["student"]], "teacher_gflop_per_sample": gflop[main["teacher"]],
        "gflop_per_sample": gflop, "pairs": pairs, "student_breakdown_ms": breakdown,
        "student_alone_samples_per_s": {s: median([got[("student", s)]["samples_per_s"] for got in results])
                                        for s in prof.students},
        "workers": prof.workers, "prefetch_steps": prof.prefetch, "timed_steps_per_cell": prof.steps,
        "max_timed_steps_per_cell": prof.max_steps, "stable_rel": prof.stable_rel,
        "drain_steps_per_cell": prof.drain, "rounds": prof.rounds, "warm_rounds": prof.warm_rounds,
        "precision": d_cached[prof.students[0]].precision,
        "loader_startup_s": {k: f.startups for k, f in feeds.items()},
        "cache_codec": cached.setup.cache.manifest.codec, "cache_pixels": cached.setup.cache.has_pixels,
        "target_shape": [cached.setup.geometry.num_patches + 1, cached.setup.target_dim],
    }


def time_cell(step, prof: Profile, device: torch.device, before=None, clock=time.perf_counter) -> dict:
    """Time `step()` one call at a time: at least `prof.steps` calls, then more until the standard error of the
    mean is within `prof.stable_rel` of it, at most `prof.max_steps`. `before()` runs untimed before each call.
    Returns s_per_step (the mean), samples_per_s, timed_steps, rel_sem and stable."""
    times: list[float] = []
    while True:
        if before is not None:
            before()
        sync(device)
        t0 = clock()
        step()
        sync(device)
        times.append(clock() - t0)
        n = len(times)
        mean = sum(times) / n
        rel = _rel_sem(times)
        if n >= max(2, prof.steps) and (rel <= prof.stable_rel or n >= prof.max_steps):
            return {"s_per_step": mean, "samples_per_s": prof.batch / mean if mean > 0 else float("inf"),
                    "timed_steps": n, "rel_sem": rel, "stable": rel <= prof.stable_rel}


def _rel_sem(times: list[float]) -> float:
    n = len(times)
    mean = sum(times) / n
    if n < 2 or mean <= 0:
        return float("inf")
    var = sum((t - mean) ** 2 for t in times) / (n - 1)
    return (var / n) ** 0.5 / mean


def below_lower_bound(got: dict, t: str, s: str) -> list[dict]:
    """Cells of one round timed below what they contain: online < teacher + student alone, cached < student
    alone, by more than twice their combined standard errors (what noise explains)."""
    out = []
    on, ca, te, st = got[("online", t, s)], got[("cached", s)], got[("teacher", t)], got[("student", s)]
    for name, cell, parts in (("online", on, (te, st)), ("cached", ca, (st,))):
        bound = sum(p["s_per_step"] for p in parts)
        noise = 2 * sum((c["rel_sem"] * c["s_per_step"]) ** 2 for c in (cell, *parts)) ** 0.5
        if cell["s_per_step"] < bound - noise:
            out.append({"cell": f"{name} {t} {s}" if name == "online" else f"{name} {s}",
                        "ms": 1e3 * cell["s_per_step"], "lower_bound_ms": 1e3 * bound,
                        "of": "teacher + student alone" if name == "online" else "student alone"})
    return out


def _pair(results: list[dict], t: str, s: str, batch: int, stable_rel: float) -> dict:
    rows = []
    for got in results:
        on, ca = got[("online", t, s)], got[("cached", s)]
        tt, ts = got[("teacher", t)]["s_per_step"], got[("student", s)]["s_per_step"]
        rows.append({"speedup": ca["samples_per_s"] / on["samples_per_s"], "ideal": (tt + ts) / ts,
                     "online": on["samples_per_s"], "cached": ca["samples_per_s"], "t_teacher": tt, "t_student": ts,
                     "t_online": on["s_per_step"], "t_cached": ca["s_per_step"],
                     "wait_online": on["data_wait_frac"], "wait_cached": ca["data_wait_frac"],
                     "timed_steps": {k: c["timed_steps"] for k, c in (("online", on), ("cached", ca),
                                     ("teacher", got[("teacher", t)]), ("student", got[("student", s)]))},
                     "rel_sem": {k: c["rel_sem"] for k, c in (("online", on), ("cached", ca),
                                 ("teacher", got[("teacher", t)]), ("student", got[("student", s)]))},
                     "below_lower_bound": below_lower_bound(got, t, s)})
    col = {k: [row[k] for row in rows] for k in rows[0]}
    speedup, ideal = median(col["speedup"]), median(col["ideal"])
    return {
        "teacher": t, "student": s, "batch_size": batch,
        "online_samples_per_s": median(col["online"]), "cached_samples_per_s": median(col["cached"]),
        "speedup": speedup, "ideal_speedup": ideal, "efficiency": speedup / ideal,
        "speedup_min": min(col["speedup"]), "speedup_max": max(col["speedup"]),
        "t_teacher_ms": 1e3 * median(col["t_teacher"]), "t_student_ms": 1e3 * median(col["t_student"]),
        "t_online_ms": 1e3 * median(col["t_online"]), "t_cached_ms": 1e3 * median(col["t_cached"]),
        "online_overhead_ms": 1e3 * median([o - a - b for o, a, b in zip(col["t_online"], col["t_teacher"],
                                                                          col["t_student"])]),
        "cached_overhead_ms": 1e3 * median([c - b for c, b in zip(col["t_cached"], col["t_student"])]),
        "online_data_wait_frac": median(col["wait_online"]), "cached_data_wait_frac": median(col["wait_cached"]),
        "below_lower_bound": [b for row in rows for b in row["below_lower_bound"]],
        "unstable_cells": sum(1 for row in rows for r in row["rel_sem"].values() if r > stable_rel),
        "rounds": rows,
    }


@section("step")
def run_section(bench: Bench) -> dict:
    return step_section(bench.ws, bench.prof, bench.device)
