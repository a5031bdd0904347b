"""benchmarks/study.py's parity test: each cached arm against fp16 at the same K, paired seed by seed.

The question a compact codec must answer is not "how far from online" (that gap is mostly what K costs, and its
spread over seeds is the initialisation's) but "can the study tell it from fp16 at the same K". An arm
CODEC:PIXELS:K and the fp16 arm with the same PIXELS and K, at one seed, start from the same initialisation and
train on the same views in the same order: only the stored targets differ. So their per-seed difference of
held-out loss cancels everything the seed changes, and its standard error over seeds is what the seeds pin down.

The reference of an arm (`reference_key`):
    CODEC:PIXELS:K   -> fp16:PIXELS:K     (the codec's own cost, pixels held fixed)
    fp16:PIXELS:K    -> fp16:visible:K    (the pixel mode's own cost, targets held fixed), PIXELS != visible
    fp16:visible:K   -> none: it is the reference; online has none either

The verdict (`paired_gap`), with online's mean held-out loss as the unit:
    resolved   the standard error of the mean gap is below 1 % of online's loss (enough seeds to judge)
    within_2se |mean gap| <= 2 standard errors (the study cannot tell the arm from its reference)
    parity     both
"""
from __future__ import annotations

import statistics

REFERENCE_CODEC = "fp16"
REFERENCE_PIXELS = "visible"
RESOLUTION = 0.01      # the standard error must be below this fraction of online's held-out loss
SIGMAS = 2.0           # "cannot tell from the reference": the mean gap within this many standard errors of 0


def reference_key(codec: str | None, pixels: str | None, views: int | None) -> tuple[str, str, int] | None:
    """(codec, pixels, K) of the arm an arm is judged against, or None (online, fp16 with exact pixels)."""
    if views is None or codec is None:
        return None
    if codec != REFERENCE_CODEC:
        return REFERENCE_CODEC, pixels, views
    if pixels != REFERENCE_PIXELS:
        return REFERENCE_CODEC, REFERENCE_PIXELS, views
    return None


def paired_gap(losses: list[float], reference: list[float], online_mean: float) -> dict:
    """Per-seed held-out losses of an arm and its reference (same seeds, same order) -> the paired gap:
    {"mean", "std", "sem", "seeds", "mean_pct", "sem_pct" (% of online_mean), "resolved", "within_2se", "parity"}.
    With one seed there is no spread: std, sem and the verdicts are None."""
    if len(losses) != len(reference) or not losses:
        raise ValueError(f"paired_gap needs the same seeds for both arms, got {len(losses)} and {len(reference)}")
    d = [a - r for a, r in zip(losses, reference)]
    n, mean = len(d), statistics.fmean(d)
    std = statistics.stdev(d) if n > 1 else None
    sem = std / n ** 0.5 if std is not None else None
    out = {"mean": mean, "std": std, "sem": sem, "seeds": n, "mean_pct": 100 * mean / online_mean,
           "sem_pct": None if sem is None else 100 * sem / online_mean,
           "resolved": None, "within_2se": None, "parity": None}
    if sem is not None:
        out["resolved"] = sem < RESOLUTION * online_mean
        out["within_2se"] = abs(mean) <= SIGMAS * sem
        out["parity"] = out["resolved"] and out["within_2se"]
    return out


def verdict(gap: dict) -> str:
    """One word for the table: parity / differs / unresolved (SE >= 1 %) / one seed."""
    if gap["sem"] is None:
        return "one seed"
    if not gap["resolved"]:
        return "unresolved"
    return "parity" if gap["within_2se"] else "differs"
