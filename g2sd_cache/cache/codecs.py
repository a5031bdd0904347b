"""Value codecs for cached targets: how a float32 target [N, T, D] becomes stored codes and back.

- fp16, bf16: a cast; 2 bytes per value.
- int8, fp8 (e4m3): 1 byte per value plus one float32 scale per token; the stored value is
  `code * scale`, with scale = absmax(token) / 127 (int8) or / 448 (e4m3's largest normal), so every
  token uses its codes' full range. The fused loss decodes these on the fly (`code * scale`).
- int4: half a byte per value plus one float16 scale per group of 32 channels of a token
  (197 x 512 targets: 50,432 B of codes + 6,304 B of scales = 56,736 B per view, 0.28 x fp16).
  Codes [..., T, ceil(D/2)] uint8 hold two 4-bit codes n in 0..15 per byte, channel 2j in the low
  nibble and 2j+1 in the high one (a pad nibble 0 after an odd D); the value is (n - 7.5) * scale, 16
  levels symmetric about 0, scale = absmax(group) / 7.5 rounded *up* to float16 so no value is clipped.
  Rounding is stochastic: n = floor(x / scale + 7.5 + u), u uniform in [0, 1), so E[decoded] = x and
  the decoded target is an unbiased estimate of the fp32 target. u is a pure function of the view's seed
  (`dither_seeds`: cache seed, source index, view index), so rerunning or resuming extract writes the
  same bytes, on any device and with any batch composition.
  Why groups of 32 and not one fp32 scale per token (51,220 B/view): on a random mae_vit_base_patch16's
  targets the relative RMS error is 12.6 % per group vs 16.4 % per token (noise power -41 %) for +11 %
  bytes (benchmarks/codec_error.py), and a group confines an outlier channel -- real MAE features have them -- to its 32 neighbours:
  with one per-token scale a channel at 20x the token's RMS sets the step for all 512 channels and the
  error exceeds 100 %. A group's error can never exceed sqrt(31)/15 = 0.37 of its RMS (one nonzero value).
  float16 scales keep the view within 57,000 B; LayerNorm-ed values (|x| <= sqrt(D)) sit far inside
  float16's range, and values beyond +-491,000 are refused.

- pcaR (pca32, pca64, pca128 registered; any `pcaR` by name): R int8 coefficients per token in a PCA basis
  fitted on the teacher's targets at extract start and stored with the cache, plus one float16 scale per token
  (cache/lowrank.py). Encoding and decoding need that basis (`basis=`); R is capped at the target width D.
- pcaA+B+C (any counts by name, e.g. pca8+32+64): the same basis, A + B + C coefficients per token, the first A
  in int8, the next B in 4 and the next C in 2 dithered bits, one float16 scale per tier (cache/tiered.py): codes
  uint8 [T, A + B/2 + C/4], scale float16 [T, tiers]. Its dither is seeded by the view, as int4's.

Bytes per view are decided here, not by lossless compression (zstd saves ~8 % on LayerNorm-ed
features and doubles decode time; docs/design.md §5), so the cache stores the codes uncompressed.
zarr has no bfloat16 or float8 dtypes, so those are stored as their raw bits (uint16 / uint8) and
viewed back on read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from g2sd_cache.cache import lowrank, tiered
from g2sd_cache.common.errors import UserError

#: channels sharing one int4 scale (the fused loss kernel decodes the same layout)
INT4_GROUP = 32
# A 4th word in the dither's seed sequence, so a view's dither never shares the key of its crop/flip/mask
# generator (views.view_rng keys Philox by [seed, index, view]).
_DITHER_DOMAIN = 0x1D17


@dataclass(frozen=True)
class Codec:
    name: str
    torch_dtype: torch.dtype     # dtype of the codes in memory (what the loss kernel takes)
    storage_dtype: str           # numpy dtype of the codes on disk
    qmax: float | None           # largest code magnitude for scaled codecs, None for plain casts
    values_per_code: int = 1     # int4: two values per stored byte
    group: int | None = None     # channels per scale; None: one scale per token
    scale_dtype: str = "float32"
    dithered: bool = False       # stochastic rounding: `encode` needs one seed per view
    rank: int | None = None      # low-rank codes (pcaR): coefficients per token, needs the cache's basis
    tiers: tuple[int, int, int] | None = None   # pcaA+B+C: coefficients in int8, 4 and 2 bits (rank = their sum)

    @property
    def scaled(self) -> bool:
        return self.qmax is not None

    def code_width(self, width: int) -> int:
        """Codes per token for `width` channels (the last dim of the stored target)."""
        if self.tiers is not None:
            return tiered.code_bytes(self.tiers)
        if self.rank is not None:
            return min(self.rank, width)
        return -(-width // self.values_per_code)

    def basis_rank(self, width: int) -> int | None:
        """Principal directions a low-rank codec decodes with (the basis has one more row, the centre), None
        for the others."""
        return None if self.rank is None else min(self.rank, width)

    def fits(self, width: int) -> bool:
        """Whether the codec can code `width`-wide targets: a tiered code keeps an exact number of coefficients,
        which must not exceed the width (a plain pcaR is capped at it instead)."""
        return self.tiers is None or self.rank <= width

    def scale_shape(self, tokens: int, width: int) -> tuple[int, ...]:
        """Per-view shape of the scale array (scaled codecs): [T], [T, ceil(D / group)] or [T, tiers]."""
        if self.tiers is not None:
            return (tokens, tiered.scale_count(self.tiers))
        return (tokens,) if self.group is None else (tokens, -(-width // self.group))

    def bytes_per_value(self) -> float:
        """Stored bytes per target value, scales not included (0.5 for int4)."""
        return np.dtype(self.storage_dtype).itemsize / self.values_per_code

    def bytes_per_view(self, tokens: int, width: int) -> int:
        """Target bytes of one view, codes and scales (what `inspect` reports, without chunk overhead)."""
        codes = tokens * self.code_width(width) * np.dtype(self.storage_dtype).itemsize
        scales = math.prod(self.scale_shape(tokens, width)) * np.dtype(self.scale_dtype).itemsize if self.scaled else 0
        return codes + scales


CODECS: dict[str, Codec] = {
    "fp16": Codec("fp16", torch.float16, "float16", None),
    "bf16": Codec("bf16", torch.bfloat16, "uint16", None),
    "int8": Codec("int8", torch.int8, "int8", 127.0),
    "fp8": Codec("fp8", torch.float8_e4m3fn, "uint8", 448.0),
    "int4": Codec("int4", torch.uint8, "uint8", 7.5, values_per_code=2, group=INT4_GROUP, scale_dtype="float16",
                  dithered=True),
}


def lowrank_codec(rank: int) -> Codec:
    """pcaR: R int8 coefficients and a float16 scale per token (cache/lowrank.py)."""
    return Codec(f"pca{rank}", torch.int8, "int8", 127.0, scale_dtype="float16", rank=rank)


CODECS.update({f"pca{r}": lowrank_codec(r) for r in (32, 64, 128)})


def tiered_codec(tiers: tuple[int, int, int]) -> Codec:
    """pcaA+B+C: A int8, B 4-bit and C 2-bit coefficients per token, a float16 scale per tier (cache/tiered.py)."""
    name = f"pca{tiers[0]}+{tiers[1]}" + (f"+{tiers[2]}" if tiers[2] else "")
    return Codec(name, torch.uint8, "uint8", 127.0, scale_dtype="float16", rank=sum(tiers), tiers=tiers,
                 dithered=tiered.dithered_count(tiers) > 0)


# ViT-B's 40 KB budget (197 tokens x 512): pca32+128+256 is 197 x 166 = 32,702 B with JPEG pixels (~4.4 KB),
# pca16+64+128 197 x 86 = 16,942 B with lossless ones (~18.7 KB on photographs); 416 and 208 of 512 directions
CODECS.update({c.name: c for c in (tiered_codec((32, 128, 256)), tiered_codec((16, 64, 128)))})


def get_codec(name: str) -> Codec:
    if name in CODECS:
        return CODECS[name]
    rank = lowrank.parse_rank(name)
    if rank is not None:
        return lowrank_codec(rank)
    try:
        tiers = tiered.parse_tiers(name)
    except ValueError as e:
        raise UserError(f"codec {e}") from None
    if tiers is None:
        raise UserError(f"unknown codec '{name}'; choose one of: {', '.join(CODECS)} (or pcaR for any rank R, "
                        f"pcaA+B+C for A int8, B 4-bit and C 2-bit coefficients)")
    return tiered_codec(tiers)


def encode(codec: Codec, x: torch.Tensor, seeds: torch.Tensor | None = None, basis: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [..., T, D] float32 -> (codes, scale) in the codec's layout:
    codes [..., T, D] (int4: [..., T, ceil(D/2)] uint8) in codec.torch_dtype; scale [..., T] float32,
    int4: [..., T, ceil(D/32)] float16; None for plain casts.
    seeds: int64 of shape x.shape[:-2], one per view; required by dithered codecs (int4), whose codes are
    a pure function of (x, seeds); ignored by the others.
    basis: float32 [>= R + 1, D], required by low-rank codecs (pcaR: codes [..., T, R] int8, scale [..., T]
    float16); ignored by the others."""
    if codec.rank is not None:
        if basis is None:
            raise ValueError(f"{codec.name} encodes against a basis (lowrank.fit_basis): pass basis=")
        if codec.tiers is not None:
            return _encode_tiered(codec, x, seeds, basis)
        return lowrank.encode(x, basis, codec.basis_rank(x.shape[-1]))
    if not codec.scaled:
        return x.to(codec.torch_dtype), None
    if codec.dithered:
        return _encode_int4(codec, x, seeds)
    absmax = x.abs().amax(dim=-1).float()
    scale = torch.where(absmax > 0, absmax / codec.qmax, torch.ones_like(absmax))
    y = x / scale.unsqueeze(-1)
    if codec.name == "int8":
        codes = y.round().clamp_(-codec.qmax, codec.qmax).to(torch.int8)
    else:
        codes = y.clamp(-codec.qmax, codec.qmax).to(torch.float8_e4m3fn)
    return codes, scale


def decode(codec: Codec, codes: torch.Tensor, scale: torch.Tensor | None, width: int | None = None,
           basis: torch.Tensor | None = None) -> torch.Tensor:
    """codes, scale as `encode` returns them -> float32 [..., T, D].
    width: D, needed only to decode int4 codes of an odd D (default: two values per byte).
    basis: the cache's basis [R + 1, D], needed only by low-rank codecs."""
    if codec.rank is not None:
        if basis is None:
            raise ValueError(f"{codec.name} decodes with the cache's basis: pass basis=")
        if codec.tiers is not None:
            return lowrank.reconstruct(tiered.dequantize(codes, scale, codec.tiers), basis)
        return lowrank.decode(codes, scale, basis)
    if not codec.scaled:
        return codes.float()
    if codec.values_per_code == 1:
        return codes.float() * scale.float().unsqueeze(-1)
    width = 2 * codes.shape[-1] if width is None else width
    if codec.code_width(width) != codes.shape[-1]:
        raise ValueError(f"{codec.name} codes of width {codes.shape[-1]} cannot hold {width} values per token")
    n = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)[..., :width]
    return (n.float() - codec.qmax) * group_scale(codec, scale, width)


def group_scale(codec: Codec, scale: torch.Tensor, width: int) -> torch.Tensor:
    """int4 scale [..., T, G] -> float32 [..., T, width]: each channel's scale."""
    return scale.float().repeat_interleave(codec.group, dim=-1)[..., :width]


def dither_seeds(seed: int, source_index, view) -> torch.Tensor:
    """int64 [N] dither seeds for views (source_index[i], view[i]) of a cache made with `seed`: a pure function
    of that triple (Philox's SeedSequence, as `views.view_rng`, in its own domain), never of batch or device."""
    idx = np.asarray(source_index, dtype=np.int64).reshape(-1)
    views = np.asarray(view, dtype=np.int64).reshape(-1)
    if idx.shape != views.shape:
        raise ValueError(f"dither_seeds: {idx.size} source indices but {views.size} view indices")
    out = [int(np.random.SeedSequence([int(seed), int(i), int(v), _DITHER_DOMAIN]).generate_state(1, np.uint64)[0] >> 1)
           for i, v in zip(idx.tolist(), views.tolist())]
    return torch.tensor(out, dtype=torch.int64)


def _uniform(seeds: torch.Tensor, n: int) -> np.ndarray:
    """float32 [len(seeds), n] in [0, 1): for each seed, the top 24 bits of the 32-bit halves of the raw
    Philox stream keyed by it (raw streams are stable across numpy versions; exactly representable)."""
    out = np.empty((len(seeds), n), dtype=np.float32)
    for row, s in enumerate(seeds.tolist()):
        raw = np.random.Philox(s & 0xFFFF_FFFF_FFFF_FFFF).random_raw((n + 1) // 2)
        words = np.stack([raw & 0xFFFF_FFFF, raw >> 32], axis=-1).reshape(-1)[:n]
        out[row] = (words >> 8).astype(np.float32) * np.float32(2.0 ** -24)
    return out


def _checked_seeds(name: str, seeds, views: tuple[int, ...]) -> torch.Tensor:
    if seeds is None:
        raise ValueError(f"{name} rounds stochastically and needs seeds: one int64 per view (codecs.dither_seeds)")
    seeds = torch.as_tensor(seeds)
    if tuple(seeds.shape) != tuple(views) or seeds.dtype != torch.int64:
        raise ValueError(f"{name}: seeds must be int64 of shape {tuple(views)} (one per view), "
                         f"got {seeds.dtype} {tuple(seeds.shape)}")
    return seeds


def _encode_tiered(codec: Codec, x: torch.Tensor, seeds, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() < 2:
        raise ValueError(f"{codec.name} encodes views [..., T, D], got shape {tuple(x.shape)}")
    if codec.rank > x.shape[-1]:
        raise ValueError(f"{codec.name} keeps {codec.rank} coefficients of {x.shape[-1]}-wide targets")
    coef = lowrank.coefficients(x, basis, codec.rank)
    T, n = x.shape[-2], tiered.dithered_count(codec.tiers)
    if n:
        seeds = _checked_seeds(codec.name, seeds, x.shape[:-2])
        u = torch.from_numpy(_uniform(seeds.reshape(-1).cpu(), T * n)).to(x.device).reshape(*x.shape[:-1], n)
    else:
        u = coef.new_zeros(*coef.shape[:-1], 0)
    return tiered.quantize(coef, codec.tiers, u)


def _encode_int4(codec: Codec, x: torch.Tensor, seeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() < 2:
        raise ValueError(f"int4 encodes views [..., T, D], got shape {tuple(x.shape)}")
    seeds = _checked_seeds("int4", seeds, x.shape[:-2])
    T, D = x.shape[-2:]
    x = x.float()
    groups = -(-D // codec.group)
    padded = torch.nn.functional.pad(x, (0, groups * codec.group - D)).unflatten(-1, (groups, codec.group))
    scale = lowrank.float16_at_least(padded.abs().amax(dim=-1) / codec.qmax)       # [..., T, G] float16
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("int4: a value beyond +-491,000 (or NaN/Inf) does not fit float16 scales")
    u = torch.from_numpy(_uniform(seeds.reshape(-1).cpu(), T * D)).to(x.device).reshape(x.shape)
    n = torch.floor(x / group_scale(codec, scale, D) + codec.qmax + u).clamp_(0, 15).to(torch.uint8)
    if D % 2:
        n = torch.nn.functional.pad(n, (0, 1))
    return n[..., 0::2] | (n[..., 1::2] << 4), scale


def to_storage(codec: Codec, codes: torch.Tensor) -> np.ndarray:
    """Codes -> numpy array of codec.storage_dtype (raw bits for bf16 / fp8)."""
    codes = codes.detach().cpu().contiguous()
    if codec.torch_dtype in (torch.bfloat16, torch.float8_e4m3fn):
        codes = codes.view(torch.uint16 if codec.torch_dtype == torch.bfloat16 else torch.uint8)
    return codes.numpy()


def from_storage(codec: Codec, stored: np.ndarray) -> torch.Tensor:
    """Inverse of `to_storage`: a numpy array read from the cache -> codes in codec.torch_dtype."""
    t = torch.from_numpy(np.ascontiguousarray(stored))
    return t.view(codec.torch_dtype) if t.dtype != codec.torch_dtype else t


def codec_error(codec: Codec, x: torch.Tensor, basis: torch.Tensor | None = None) -> dict[str, float]:
    """Round-trip error of `codec` on float32 targets x [..., D]: relative RMS error
    ||dec(enc(x)) - x|| / ||x|| and the mean per-token cosine similarity. Dithered codecs use seeds 0, 1, ...
    (one per view, x [..., T, D]). Low-rank codecs use `basis` (its first R + 1 rows), or one fitted on x
    itself when None (in-sample: optimistic)."""
    seeds = torch.arange(math.prod(x.shape[:-2]), dtype=torch.int64).reshape(x.shape[:-2]) if codec.dithered else None
    if codec.rank is not None and basis is None:
        basis = lowrank.fit_basis(x, codec.rank)
    y = decode(codec, *encode(codec, x, seeds, basis), width=x.shape[-1], basis=basis).float()
    x = x.float()
    rel_rmse = float((y - x).pow(2).sum().sqrt() / x.pow(2).sum().sqrt().clamp_min(1e-30))
    cosine = float(torch.nn.functional.cosine_similarity(y.flatten(0, -2), x.flatten(0, -2), dim=-1).mean())
    return {"rel_rmse": rel_rmse, "cosine": cosine}
