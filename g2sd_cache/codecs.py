"""Value codecs for cached targets: how a float32 target [N, T, D] becomes stored codes and back.

- fp16, bf16: a cast; 2 bytes per value.
- int8, fp8 (e4m3): 1 byte per value plus one float32 scale per token; the stored value is
  `code * scale`, with scale = absmax(token) / 127 (int8) or / 448 (e4m3's largest normal), so every
  token uses its codes' full range. The fused loss decodes these on the fly (`code * scale`).

Bytes per view are decided here, not by lossless compression (zstd saves ~8 % on LayerNorm-ed
features and doubles decode time; DESIGN.md §5), so the cache stores the codes uncompressed.
zarr has no bfloat16 or float8 dtypes, so those are stored as their raw bits (uint16 / uint8) and
viewed back on read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError


@dataclass(frozen=True)
class Codec:
    name: str
    torch_dtype: torch.dtype     # dtype of the codes in memory (what the loss kernel takes)
    storage_dtype: str           # numpy dtype of the codes on disk
    qmax: float | None           # largest code magnitude for scaled codecs, None for plain casts

    @property
    def scaled(self) -> bool:
        return self.qmax is not None

    def bytes_per_value(self) -> int:
        return np.dtype(self.storage_dtype).itemsize


CODECS: dict[str, Codec] = {
    "fp16": Codec("fp16", torch.float16, "float16", None),
    "bf16": Codec("bf16", torch.bfloat16, "uint16", None),
    "int8": Codec("int8", torch.int8, "int8", 127.0),
    "fp8": Codec("fp8", torch.float8_e4m3fn, "uint8", 448.0),
}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise UserError(f"unknown codec '{name}'; choose one of: {', '.join(CODECS)}")
    return CODECS[name]


def encode(codec: Codec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [..., D] float32 -> (codes [..., D] in codec.torch_dtype, scale [...] float32 or None)."""
    if not codec.scaled:
        return x.to(codec.torch_dtype), None
    absmax = x.abs().amax(dim=-1).float()
    scale = torch.where(absmax > 0, absmax / codec.qmax, torch.ones_like(absmax))
    y = x / scale.unsqueeze(-1)
    if codec.name == "int8":
        codes = y.round().clamp_(-codec.qmax, codec.qmax).to(torch.int8)
    else:
        codes = y.clamp(-codec.qmax, codec.qmax).to(torch.float8_e4m3fn)
    return codes, scale


def decode(codec: Codec, codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """codes [..., D], scale [...] or None -> float32 [..., D]."""
    x = codes.float()
    return x * scale.unsqueeze(-1) if codec.scaled else x


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


def codec_error(codec: Codec, x: torch.Tensor) -> dict[str, float]:
    """Round-trip error of `codec` on float32 targets x [..., D]: relative RMS error
    ||dec(enc(x)) - x|| / ||x|| and the mean per-token cosine similarity."""
    y = decode(codec, *encode(codec, x)).float()
    x = x.float()
    rel_rmse = float((y - x).pow(2).sum().sqrt() / x.pow(2).sum().sqrt().clamp_min(1e-30))
    cosine = float(torch.nn.functional.cosine_similarity(y.flatten(0, -2), x.flatten(0, -2), dim=-1).mean())
    return {"rel_rmse": rel_rmse, "cosine": cosine}
