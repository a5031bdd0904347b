"""The low-rank target codec (`pcaR`): a per-cache PCA basis of the teacher's tokens, and int8 coefficients.

A ViT-B target is 197 tokens x 512 LayerNorm-ed channels, but a teacher's tokens live near a subspace of far
fewer dimensions (a random ViT-B at rank 64: 5.9 % relative RMS error in-sample, ~9 % on held-out views;
benchmarks/codec_error.py). So:

- basis: float32 [R + 1, D] -- row 0 the centre (mean token), rows 1..R the R leading principal directions of
  the calibration sample's tokens (orthonormal), fitted once at extract start on the teacher's own targets
  (`fit_basis`), stored in the cache as `basis.npy` and bound by its digest in the manifest. The directions are
  eigenvectors of the float64 covariance, each signed so that its largest-magnitude entry is positive: a pure
  function of the calibration sample (bases of ranks R < R' are the first R + 1 rows of the rank-R' one).
- per token: R int8 codes and one float16 scale, c = (x - centre) @ V^T, scale = absmax(c) / 127 rounded up
  to float16, code = round(c / scale). ViT-B at R = 64: 197 x (64 + 2) = 13,002 B per view (int4: 56,736).
- decode: codes x scale @ V + centre, a [T, R] x [R, D] matmul on the device right before the loss.
- `pcaA+B+C` (cache/tiered.py) keeps A + B + C coefficients against the same kind of basis, in int8, 4 and 2 bits.

Error per token: what lies outside the basis' span (the truncation, measured at calibration on held-out
views) plus the rounding, at most sqrt(R) x scale / 2 in norm (V is orthonormal). No fixed bound holds for
unseen views, which is why extract measures the codec on the user's teacher before it chooses (`--codec auto`).
"""
from __future__ import annotations

import hashlib
import io
import re

import numpy as np
import torch

#: where a lowrank cache keeps its basis, beside the manifest
BASIS_FILE = "basis.npy"
_NAME = re.compile(r"^pca([1-9][0-9]{0,3})$")


def parse_rank(name: str) -> int | None:
    """'pca64' -> 64; None for any other name."""
    m = _NAME.match(name) if isinstance(name, str) else None
    return int(m.group(1)) if m else None


def fit_basis(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Tokens x [..., D] (any float dtype) -> basis float32 [min(rank, D) + 1, D]: the centre, then the leading
    principal directions (see the module docstring). Deterministic for a given x."""
    rows = x.reshape(-1, x.shape[-1]).double().cpu()
    if rows.shape[0] < 1:
        raise ValueError("fit_basis needs at least one token")
    r = min(rank, rows.shape[1])
    centre = rows.mean(dim=0)
    c = rows - centre
    cov = c.T @ c / max(1, rows.shape[0] - 1)
    _, vecs = torch.linalg.eigh(cov)               # ascending eigenvalues
    comps = vecs.flip(-1)[:, :r].T.contiguous()    # [r, D], largest variance first
    lead = comps.abs().argmax(dim=1)
    comps *= torch.sign(comps[torch.arange(r), lead]).unsqueeze(1)
    return torch.cat([centre.unsqueeze(0), comps]).float().contiguous()


def float16_at_least(s: torch.Tensor) -> torch.Tensor:
    """float32 >= 0 -> the float16 at or just above it (never below: no code may leave its range), and at least
    float16's smallest subnormal, so that scales stay positive. The scale of every scaled float16 layout (pcaR,
    pcaA+B+C's tiers, int4's groups)."""
    h = s.half()
    h = torch.where(h.float() < s, (h.view(torch.int16) + 1).view(torch.float16), h)
    return torch.clamp_min(h, 2.0 ** -24)


def coefficients(x: torch.Tensor, basis: torch.Tensor, rank: int) -> torch.Tensor:
    """x [..., T, D] -> exact coefficients float32 [..., T, rank] against the first rank + 1 rows of `basis`
    [>= rank + 1, D]: (x - centre) @ V^T."""
    if basis.shape[0] < rank + 1 or basis.shape[1] != x.shape[-1]:
        raise ValueError(f"a rank-{rank} code of {x.shape[-1]}-wide targets needs a basis of at least "
                         f"[{rank + 1}, {x.shape[-1]}], got {list(basis.shape)}")
    basis = basis[:rank + 1].to(x.device, torch.float32)
    return (x.float() - basis[0]) @ basis[1:].T


def reconstruct(coef: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """coefficients [..., T, R] float32, basis [>= R + 1, D] -> float32 [..., T, D]: coef @ V + centre."""
    r = coef.shape[-1]
    if basis.shape[0] < r + 1:
        raise ValueError(f"rank-{r} codes need a basis of at least {r + 1} rows, got {basis.shape[0]}")
    basis = basis[:r + 1].to(coef.device, torch.float32)
    return coef @ basis[1:] + basis[0]


def encode(x: torch.Tensor, basis: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., T, D] -> (codes int8 [..., T, rank], scale float16 [..., T]) against the first rank + 1 rows of
    `basis` [>= rank + 1, D]."""
    coef = coefficients(x, basis, rank)
    scale = float16_at_least(coef.abs().amax(dim=-1) / 127.0)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("pca: a coefficient beyond float16's range (or NaN/Inf) in the targets")
    codes = (coef / scale.float().unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scale


def decode(codes: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """codes [..., T, R] int8, scale [..., T], basis [>= R + 1, D] -> float32 [..., T, D]."""
    return reconstruct(codes.float() * scale.float().unsqueeze(-1), basis)


# -- the basis as a file of the cache -------------------------------------------------------------------------

def basis_bytes(basis: torch.Tensor) -> bytes:
    """The .npy bytes of a basis (float32, little-endian): what extract writes and the manifest's digest covers."""
    buf = io.BytesIO()
    np.save(buf, basis.detach().cpu().numpy().astype("<f4"), allow_pickle=False)
    return buf.getvalue()


def basis_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def basis_record(raw: bytes, shape) -> dict:
    """The manifest's `basis` entry for a basis file's bytes."""
    return {"file": BASIS_FILE, "sha256": basis_digest(raw), "shape": [int(s) for s in shape]}


def basis_problem(record, raw: bytes | None, rank: int, width: int) -> str | None:
    """Why the basis file's bytes `raw` (None: missing) are not the basis the manifest's `record` binds to a
    rank-`rank` code of `width`-wide targets, or None when they are."""
    want = [rank + 1, width]
    if not isinstance(record, dict) or record.get("file") != BASIS_FILE or not isinstance(record.get("sha256"), str):
        return f"the manifest records no basis ({BASIS_FILE}) for its low-rank codec"
    if record.get("shape") != want:
        return f"the manifest's basis has shape {record.get('shape')!r}, the codec needs {want}"
    if raw is None:
        return f"{BASIS_FILE} is missing (the low-rank codec cannot decode without it)"
    if basis_digest(raw) != record["sha256"]:
        return (f"{BASIS_FILE} is not the basis the manifest holds (sha256 {basis_digest(raw)[:12]}..., the manifest "
                f"{record['sha256'][:12]}...): altered or from another cache")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError) as e:
        return f"{BASIS_FILE} does not parse ({e})"
    if list(arr.shape) != want or arr.dtype != np.dtype("<f4") or not np.isfinite(arr).all():
        return f"{BASIS_FILE} holds {arr.dtype} {list(arr.shape)}, expected finite float32 {want}"
    return None


def load_basis(raw: bytes) -> torch.Tensor:
    """A checked basis file's bytes (`basis_problem` is None) -> float32 [R + 1, D]."""
    return torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False).astype(np.float32))
