"""Extract's calibration: measure codecs on the user's teacher before writing a cache, and fit the low-rank basis.

Runs when `--codec` is `auto` or a low-rank codec (pcaR), on rank 0, before any shard:
1. the teacher's float32 targets of the first `--calibration-views` views in the cache's own order (the first
   images of the first shards, all their views: the views the cache will hold, rendered as extract renders them);
2. a PCA basis of the largest rank any candidate needs, fitted on the first 3/4 of those views (lowrank.fit_basis);
3. every candidate codec (auto: every codec of CODECS; else the one asked for) on the held-out last 1/4: relative
   RMS error, cosine, the worst view's relative error, target bytes per view;
4. auto: the codec with the fewest target bytes per view whose held-out error is within `--max-error`.
The chosen low-rank codec's basis (the first R + 1 rows of the fitted one) is written to basis.npy, then the
record to calibration.json (both atomically), so that a resumed extract encodes its remaining shards with the
same basis rather than refitting one; the manifest binds basis.npy by its sha256 and carries the record.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable

import torch

from g2sd_cache.cache import codecs, lowrank
from g2sd_cache.cache.schema import BASIS_FILE, CALIBRATION_FILE
from g2sd_cache.common.errors import UserError
from g2sd_cache.data.views import normalize_patches

AUTO = "auto"


@dataclass(frozen=True)
class Calibration:
    """What extract writes with: the codec (auto resolved), the basis of a low-rank codec ([R + 1, D] float32,
    else None), and the record for the manifest (None when no calibration ran)."""

    codec: str
    basis: torch.Tensor | None = None
    record: dict | None = None
    basis_raw: bytes | None = None


def needs_calibration(codec: str) -> bool:
    return codec == AUTO or codecs.get_codec(codec).rank is not None


def teacher_targets(items: Iterable[dict], teacher, device: torch.device, views: int, batch_size: int,
                    target_layer: int, autocast=nullcontext) -> torch.Tensor:
    """float32 [N, T, D] (N <= views, on the CPU): the teacher's targets of the rendered images' views in `items`
    (extract's RenderedImages items; errors and tar ends are passed over), in order, until `views` are taken."""
    patches, masks = [], []
    for item in items:
        if "patches" not in item:
            continue
        k = min(len(item["patches"]), views - len(patches))
        patches += list(item["patches"][:k])
        masks += [torch.from_numpy(m) for m in item["mask"][:k]]
        if len(patches) >= views:
            break
    if not patches:
        raise UserError("calibration found no readable image: nothing to measure the codecs on")
    out = []
    for s in range(0, len(patches), batch_size):
        p = torch.stack(patches[s:s + batch_size]).to(device)
        m = torch.stack(masks[s:s + batch_size]).to(device)
        with torch.no_grad(), autocast():   # the teacher's own precision (a context factory), as extract runs it
            out.append(teacher.targets_visible(normalize_patches(p), m, target_layer).float().cpu())
    return torch.cat(out)


def view_errors(codec: codecs.Codec, x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """[N] relative RMS error of each view of x [N, T, D] through `codec` (dithered: seeds 0..N-1)."""
    seeds = torch.arange(len(x), dtype=torch.int64) if codec.dithered else None
    y = codecs.decode(codec, *codecs.encode(codec, x, seeds, basis), width=x.shape[-1], basis=basis)
    return (y - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-30)


def truncation_error(x: torch.Tensor, basis: torch.Tensor) -> float:
    """Relative RMS error of x [N, T, D] projected onto `basis` [R + 1, D] with exact coefficients: what a low-rank
    code of rank R drops, whatever its rounding."""
    b = basis.double()
    centred = x.double() - b[0]
    return float((centred - (centred @ b[1:].T) @ b[1:]).norm() / x.double().norm().clamp_min(1e-30))


def calibrate(x: torch.Tensor, codec: str, max_error: float | None) -> Calibration:
    """Targets x [N, T, D] float32 -> the codec to write with, its basis and the calibration record (see the
    module docstring). Deterministic given x."""
    n, tokens, width = x.shape
    held = n // 4
    fit, test = (x[:n - held], x[n - held:]) if held else (x, x)
    if codec != AUTO and not codecs.get_codec(codec).fits(width):
        raise UserError(f"--codec {codec} keeps {codecs.get_codec(codec).rank} coefficients per token but this "
                        f"teacher's targets are {width} wide: choose counts that add up to at most {width}")
    candidates = ([c for c in codecs.CODECS.values() if c.fits(width)] if codec == AUTO
                  else [codecs.get_codec(codec)])
    ranks = [c.basis_rank(width) for c in candidates if c.rank is not None]
    full = lowrank.fit_basis(fit, max(ranks)) if ranks else None
    errors = {}
    for c in candidates:
        err = codecs.codec_error(c, test, basis=full)
        errors[c.name] = {**err, "max_view_rel_rmse": float(view_errors(c, test, full).max()),
                          "target_bytes_per_view": c.bytes_per_view(tokens, width)}
        if c.rank is not None:   # the part of the error the student could learn (the study: it is what costs)
            errors[c.name]["truncation_rel_rmse"] = truncation_error(test, full[:c.basis_rank(width) + 1])
    if codec == AUTO:
        within = [c for c in candidates if errors[c.name]["rel_rmse"] <= max_error]
        if not within:
            best = min(errors, key=lambda k: errors[k]["rel_rmse"])
            raise UserError(f"--max-error {max_error:g}: no codec is that close to the teacher's targets (the closest, "
                            f"{best}, has rel RMS error {errors[best]['rel_rmse']:.2e}); raise --max-error")
        chosen = min(within, key=lambda c: (errors[c.name]["target_bytes_per_view"], errors[c.name]["rel_rmse"])).name
    else:
        chosen = codec
    rank = codecs.get_codec(chosen).rank
    basis = full[:codecs.get_codec(chosen).basis_rank(width) + 1].clone() if rank is not None else None
    raw = lowrank.basis_bytes(basis) if basis is not None else None
    record = {"views": n, "fit_views": len(fit), "heldout_views": held, "max_error": max_error, "chosen": chosen,
              "errors": errors, "basis": lowrank.basis_record(raw, basis.shape) if raw else None}
    return Calibration(chosen, basis, record, raw)


def write_calibration(out, cal: Calibration) -> None:
    """basis.npy first, then calibration.json: a calibration record in a cache always has its basis. `out`: the
    cache's destination (cache/destination.py: a folder, or a URL where each is one PUT, never partly there)."""
    if cal.basis_raw is not None:
        out.write_bytes(BASIS_FILE, cal.basis_raw)
    out.write_text(CALIBRATION_FILE, json.dumps(cal.record, indent=1))


def read_calibration(out) -> Calibration | None:
    """The calibration an earlier run of this extract wrote into the destination `out` (None if none): a resumed
    extract writes its remaining shards with the same codec and basis. Its basis must match the record's digest."""
    shown = str(getattr(out, "url", None) or out.out)
    raw_record = out.read_bytes(CALIBRATION_FILE)
    if raw_record is None:
        return None
    try:
        record = json.loads(raw_record)
        chosen = record["chosen"]
        codecs.get_codec(chosen)
    except (ValueError, KeyError, TypeError, UserError) as e:
        raise UserError(f"{shown}/{CALIBRATION_FILE} does not parse ({type(e).__name__}: {e}); rerun extract with "
                        f"--overwrite") from e
    if codecs.get_codec(chosen).rank is None:
        return Calibration(chosen, None, record, None)
    raw = out.read_bytes(BASIS_FILE)
    rec = record.get("basis") or {}
    problem = lowrank.basis_problem(rec, raw, (rec.get("shape") or [1])[0] - 1, (rec.get("shape") or [0, 0])[1])
    if problem:
        raise UserError(f"--out {shown}: {problem}; rerun extract with --overwrite")
    return Calibration(chosen, lowrank.load_basis(raw), record, raw)
