"""The cache format: the one definition shared by the writer (extract), the reader (cache) and verify.

    CACHE/
      config.yaml        the extract configuration that produced it (rerun checks it)
      manifest.json      written last, by rank 0, once every shard is complete
      shard-00000/       a zarr v3 group, renamed into place only when complete
        shard.json       the shard's record: counts, skipped inputs, file sizes
        target/ scale/ mask/ crop/ flip/ source_index/ key/ pixels/   zarr v3 arrays

`pixels` (unless extracted with `--pixels none`) holds each view's visible patches exactly as the teacher
saw them: uint8 [n_keep, p, p, 3], ascending patch order, HWC inside a patch, crop and flip applied. With
them a training step needs no image file and no decoder: its input is a block read (views.visible_patches).

Every array has shape [K, n, ...]: K views per image, n images in the shard, view-major, so the
views an epoch uses (view e mod K of every image) are one contiguous region per shard, stored in
its own zarr shard file `c/k/0...`. Inside it, inner chunks hold `chunk_views` images of one view,
each with a crc32c (as is the shard index). A shard folder exists under its final name only once
all its files are written (write to `.shard-XXXXX.tmp-*`, then rename), so a shard is complete iff
its folder exists; a missing file in a complete shard is corruption, never fill values.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .codecs import Codec, get_codec
from .views import ViewGeometry

FORMAT_VERSION = 2   # 2: visible pixels (optional), the `pixels` field of the manifest
MANIFEST = "manifest.json"
CONFIG = "config.yaml"
SHARD_RECORD = "shard.json"
SHARD_PREFIX = "shard-"
TMP_MARK = ".tmp-"


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}"


def tmp_shard_name(index: int) -> str:
    """Where a shard is written before it is complete; the suffix makes concurrent writers distinct."""
    return f".{shard_name(index)}{TMP_MARK}{os.uname().nodename}-{os.getpid()}"


@dataclass(frozen=True)
class ArraySpec:
    per_view_shape: tuple[int | None, ...]   # None: a width decided per shard (the keys' byte length)
    dtype: str


def array_specs(codec: Codec, tokens: int, width: int, patches: int,
                visible_pixels: tuple[int, int] | None = None) -> dict[str, ArraySpec]:
    """Per-view arrays of a shard. `target` holds codes ([T, D], int4: [T, D/2] packed); `scale` exists for
    scaled codecs only ([T] float32, int4: [T, D/32] float16); `pixels` only when `visible_pixels` =
    (n_keep, patch_size) says the cache stores them."""
    if codec.values_per_code > 1 and width % codec.values_per_code:
        from .errors import UserError
        raise UserError(f"codec {codec.name} packs {codec.values_per_code} values per byte and needs a target width "
                        f"divisible by {codec.values_per_code}; this teacher's is {width}: choose another --codec")
    specs = {
        "target": ArraySpec((tokens, codec.code_width(width)), codec.storage_dtype),
        "mask": ArraySpec((patches,), "bool"),
        "crop": ArraySpec((4,), "int32"),          # top, left, height, width in source pixels
        "flip": ArraySpec((), "bool"),
        "source_index": ArraySpec((), "int64"),
        # UTF-8 bytes zero-padded to the shard's longest key: fixed-width, so readers slice it like the rest
        "key": ArraySpec((None,), "uint8"),
    }
    if codec.scaled:
        specs["scale"] = ArraySpec(codec.scale_shape(tokens, width), codec.scale_dtype)
    if visible_pixels is not None:
        n_keep, p = visible_pixels
        specs["pixels"] = ArraySpec((n_keep, p, p, 3), "uint8")
    return specs


@dataclass
class ShardRecord:
    """shard.json: what one shard holds. `files` maps each file under the shard to its size in bytes."""

    index: int
    images: int
    views_per_image: int
    source: str                     # "images a..b" of a folder listing, or the tar URL
    skipped: list[dict] = field(default_factory=list)   # [{"key", "error"}] inputs left out
    codec_error: dict = field(default_factory=dict)     # {codec: {rel_rmse, cosine}} on this shard's first batch
    files: dict[str, int] = field(default_factory=dict)

    @property
    def views(self) -> int:
        return self.images * self.views_per_image

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ShardRecord":
        return cls(**json.loads(text))


def encode_keys(keys: np.ndarray) -> np.ndarray:
    """str array [...] -> uint8 [..., W]: UTF-8 bytes zero-padded to the longest key (W >= 1)."""
    raw = [str(k).encode() for k in keys.ravel()]
    width = max([1, *map(len, raw)])
    out = np.zeros((len(raw), width), dtype=np.uint8)
    for i, b in enumerate(raw):
        out[i, :len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out.reshape(*keys.shape, width)


def decode_keys(codes: np.ndarray) -> np.ndarray:
    """uint8 [..., W] -> str array [...] (inverse of `encode_keys`)."""
    flat = np.ascontiguousarray(codes).reshape(-1, codes.shape[-1])
    return np.array([bytes(row).rstrip(b"\0").decode() for row in flat], dtype=str).reshape(codes.shape[:-1])


def source_index_for_tar(tar: int, position: int) -> int:
    """Tar sources have no global image numbering: pack (tar number, position in tar) into one int."""
    return (tar << 32) | position


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_MARK + str(os.getpid()))
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:  # a failed write (disk full) must not leave the temporary behind
        tmp.unlink(missing_ok=True)


@dataclass
class Manifest:
    """manifest.json: the single source of truth about a finished cache. Readers check it."""

    format_version: int
    teacher: dict          # {arch, source, sha256}
    target_layer: int
    geometry: dict         # views.ViewGeometry as a dict
    views_per_image: int
    seed: int
    codec: str
    pixels: str            # "visible": every view's visible patches are stored (uint8); "none": images needed
    tokens: int            # T, cls first
    target_dim: int        # D, the teacher's decoder width
    chunk_views: int
    source: dict           # {kind, root, count, fingerprint, shards (tar URLs, tars only)}
    versions: dict         # {torch, torchvision, pillow}: view replay depends on them
    teacher_precision: str  # "fp32" or "bf16-autocast": how the teacher ran (sets replay tolerances)
    shards: list[dict]     # [{name, images, views, complete, source, files}]
    skipped: list[dict]    # [{key, error}]
    codec_error: dict      # {codec: {rel_rmse, cosine}}: every codec against fp32, on sampled views
    views: int
    images: int
    created: str

    @property
    def view_geometry(self) -> ViewGeometry:
        return ViewGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.geometry.items()})

    @property
    def stores_pixels(self) -> bool:
        return self.pixels == "visible"

    def specs(self) -> dict[str, ArraySpec]:
        """The per-view arrays every shard of this cache holds."""
        g = self.view_geometry
        return array_specs(get_codec(self.codec), self.tokens, self.target_dim, g.num_patches,
                           (g.num_visible, g.patch_size) if self.stores_pixels else None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        from .errors import UserError
        # A damaged or hand-edited manifest is a user-facing error (one line), not a JSONDecodeError/KeyError traceback.
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"cache manifest {MANIFEST} is not valid JSON ({e}); rerun the same `g2sd-cache extract` "
                            f"command to rewrite it") from e
        if not isinstance(data, dict):
            raise UserError(f"cache manifest {MANIFEST} is not a JSON object; rerun `g2sd-cache extract` to rewrite it")
        if data.get("format_version") != FORMAT_VERSION:
            raise UserError(f"cache format version {data.get('format_version')} is not supported by this g2sd-cache "
                            f"(it reads version {FORMAT_VERSION}); re-extract the cache or use a matching release")
        missing = [k for k in cls.__dataclass_fields__ if k not in data]
        if missing:
            raise UserError(f"cache manifest {MANIFEST} lacks {', '.join(missing)}; rerun `g2sd-cache extract` to rewrite it")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})
