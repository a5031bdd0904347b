"""Tiered coefficients for the low-rank codec (`pcaA+B+C`): the leading A principal coefficients of a token in
int8, the next B in 4 bits, the next C in 2 bits.

Why: what a low-rank code drops (the truncation) is a function of the view that the student could have learned,
so it costs the student far more than rounding noise of the same power, which it cannot fit and averages out
(benchmarks/study.py: on the 128-wide pretrained micro teacher, pca44's 5.4 % truncation cost +0.23 % of online's
held-out loss, int8's 0.8 % rounding nothing measurable). A token's coefficients fall off steeply (the first 8 of
128 carry ~97 % of the variance), so at the same bytes per token it pays to keep many more of them, coarsely:
`pca8+32+64` keeps 104 coefficients in 8 + 16 + 16 = 40 bytes (+ 3 float16 scales) where `pca44` keeps 44.

Layout per token (T tokens, coefficients c [T, A + B + C] against the cache's basis):

- codes uint8 [T, A + B/2 + C/4]: A bytes of int8 codes (two's complement), then the B 4-bit codes two per byte
  (coefficient A + 2j in the low nibble, A + 2j + 1 in the high one), then the C 2-bit codes four per byte
  (coefficient A + B + 4j + k in bits 2k..2k+1). B must be even and C a multiple of 4, so no byte is shared.
- scale float16 [T, n]: one scale per non-empty tier, in tier order, each rounded *up* to float16 so that no
  coefficient leaves its tier's range.
- values: int8 code q -> q x s (q rounded to nearest, s = absmax / 127, as `pcaR`); a 4-bit code n in 0..15 ->
  (n - 7.5) x s and a 2-bit code n in 0..3 -> (n - 1.5) x s (s = absmax / 7.5 or / 1.5; levels symmetric about
  0). The 4- and 2-bit tiers round stochastically, n = floor(c / s + (L - 1) / 2 + u) with u uniform in [0, 1),
  so a decoded coefficient is an unbiased estimate of the exact one: noise, not a bias the student would learn.
  u comes from the caller (codecs.py draws it from the view's dither seed), which keeps this module pure.

Error per token: the truncation beyond A + B + C, plus at most s / 2 per int8 coefficient and s per dithered one.
"""
from __future__ import annotations

import re

import torch

from g2sd_cache.cache import lowrank

#: bits per coefficient of each tier, in the order the tiers are stored
TIER_BITS = (8, 4, 2)
_NAME = re.compile(r"^pca([0-9]{1,4})\+([0-9]{1,4})(?:\+([0-9]{1,4}))?$")
_HALF = {4: 7.5, 2: 1.5}         # (levels - 1) / 2 of the dithered tiers


def parse_tiers(name: str) -> tuple[int, int, int] | None:
    """'pca8+32+64' -> (8, 32, 64); 'pca16+48' -> (16, 48, 0); None for any other name (plain 'pcaR' included).
    Raises ValueError for a tiered name whose counts cannot be packed (B odd, C not a multiple of 4, no
    coefficient at all)."""
    m = _NAME.match(name) if isinstance(name, str) else None
    if not m:
        return None
    a, b, c = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if b % 2 or c % 4:
        raise ValueError(f"{name}: the 4-bit count must be even and the 2-bit count a multiple of 4 (whole bytes), "
                         f"got {b} and {c}")
    if a + b + c == 0:
        raise ValueError(f"{name}: keeps no coefficient")
    return a, b, c


def code_bytes(tiers: tuple[int, int, int]) -> int:
    """Bytes of codes per token."""
    a, b, c = tiers
    return a + b // 2 + c // 4


def scale_count(tiers: tuple[int, int, int]) -> int:
    """float16 scales per token: one per non-empty tier."""
    return sum(1 for n in tiers if n)


def dithered_count(tiers: tuple[int, int, int]) -> int:
    """Coefficients per token that round stochastically (the 4- and 2-bit tiers): how many uniforms
    `quantize` needs per token."""
    return tiers[1] + tiers[2]


def quantize(coef: torch.Tensor, tiers: tuple[int, int, int], u: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """coef float32 [..., T, A + B + C], u float32 [..., T, B + C] in [0, 1) -> (codes uint8 [..., T, bytes],
    scale float16 [..., T, n]) in the layout of the module docstring."""
    a, b, c = tiers
    if coef.shape[-1] != a + b + c or u.shape != (*coef.shape[:-1], b + c):
        raise ValueError(f"tiers {tiers}: need coefficients [..., {a + b + c}] and uniforms [..., {b + c}], got "
                         f"{list(coef.shape)} and {list(u.shape)}")
    coef = coef.float()
    codes, scales = [], []
    if a:
        head = coef[..., :a]
        s = lowrank.float16_at_least(head.abs().amax(dim=-1) / 127.0)
        q = (head / s.float().unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
        codes.append(q.view(torch.uint8))
        scales.append(s)
    for bits, lo, hi, ulo in ((4, a, a + b, 0), (2, a + b, a + b + c, b)):
        if hi == lo:
            continue
        half = _HALF[bits]
        part = coef[..., lo:hi]
        s = lowrank.float16_at_least(part.abs().amax(dim=-1) / half)
        n = torch.floor(part / s.float().unsqueeze(-1) + half + u[..., ulo:ulo + hi - lo]).clamp_(0, 2 * half)
        n = n.to(torch.uint8).unflatten(-1, (-1, 8 // bits))                      # [..., T, bytes, per byte]
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=n.device)
        codes.append((n << shifts).sum(dim=-1, dtype=torch.uint8))
        scales.append(s)
    scale = torch.stack(scales, dim=-1)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("pca tiers: a coefficient beyond float16's range (or NaN/Inf) in the targets")
    return torch.cat(codes, dim=-1), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, tiers: tuple[int, int, int]) -> torch.Tensor:
    """codes uint8 [..., T, bytes], scale float16 [..., T, n] -> coefficients float32 [..., T, A + B + C]."""
    a, b, c = tiers
    if codes.shape[-1] != code_bytes(tiers) or scale.shape[-1] != scale_count(tiers):
        raise ValueError(f"tiers {tiers}: need codes [..., {code_bytes(tiers)}] and scales [..., "
                         f"{scale_count(tiers)}], got {list(codes.shape)} and {list(scale.shape)}")
    scale = scale.float()
    out, k, pos = [], 0, 0
    if a:
        out.append(codes[..., :a].view(torch.int8).float() * scale[..., k:k + 1])
        k, pos = 1, a
    for bits, count in ((4, b), (2, c)):
        if not count:
            continue
        packed = codes[..., pos:pos + count * bits // 8]
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        n = ((packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)).flatten(-2)      # [..., T, count]
        out.append((n.float() - _HALF[bits]) * scale[..., k:k + 1])
        k, pos = k + 1, pos + count * bits // 8
    return torch.cat(out, dim=-1)
