"""The cache format: the one definition shared by the writer (extract), the reader (cache) and verify.

    CACHE/
      .g2sd-cache        the marker, written first: this folder is a cache (format, tool, version)
      .g2sd-cache.lock   the advisory lock a running extract holds (with its pid and host)
      config.yaml        the extract configuration that produced it (rerun checks it)
      manifest.json      written last, by rank 0, once every shard is complete; a digest of every shard.json
      basis.npy          low-rank codecs (pcaR) only: the PCA basis the codes decode with, float32 [R + 1, D]
                         (cache/lowrank.py), bound by its sha256 in the manifest
      calibration.json   codec auto and pcaR: the calibration extract ran first (its record is in the manifest)
      shard-00000/       a zarr v3 group, renamed into place only when complete
        shard.json       the shard's record: counts, skipped inputs, file sizes and digests, source image crc32c
        target/ scale/ mask/ crop/ flip/ source_index/ key/ pixels/ (or jpeg/)   zarr v3 arrays

`pixels` (unless extracted with `--pixels none`) holds each view's visible patches exactly as the teacher
saw them: uint8 [n_keep, p, p, 3], ascending patch order, HWC inside a patch, crop and flip applied. With
them a training step needs no image file and no decoder: its input is a block read (views.visible_patches).
With `--pixels jpeg` the array `jpeg` holds instead one JPEG per view (variable-length bytes, zarr's vlen-bytes
codec under the same sharding, crc32c and digests), whose decoding is exactly what the teacher was given
(cache/pixel_codecs.py); the reader decodes it into the same [n_keep, p, p, 3] patches. With `--pixels lossless`
the array `lossless` holds the same way one blob per view: the exact patches, filtered and compressed
(cache/lossless.py); the host decompresses it, the device undoes the filter.


Every array has shape [K, n, ...]: K views per image, n images in the shard, view-major, so the
views an epoch uses (view e mod K of every image) are one contiguous region per shard, stored in
its own zarr shard file `c/k/0...`. Inside it, inner chunks hold `chunk_views` images of one view,
each with a crc32c (as is the shard index). A shard folder exists under its final name only once
all its files are written (write to `.shard-XXXXX.tmp-*`, then rename), so a shard is complete iff
its folder exists; a missing file in a complete shard is corruption, never fill values.

Folder images go to shards in a seeded random order of the sorted listing (`folder_order`): shard i
holds positions a..b of that order (its record says so), so no shard and no inner chunk is one class
of a class-sorted folder, and blocks read at train time mix like a global shuffle. `source_index`
stays the image's index in the sorted listing. Tar sources keep one shard per tar, in tar order.

Content is bound to its place (format 2): shard.json records a digest of every file under the shard,
keyed by its path (`digests.shard_digests`: for a zarr shard file, of its index and every inner chunk's
stored crc32c, which the reader checks against the chunk's bytes before first use; for the small JSON
files, of their bytes), and the manifest records a digest of every shard.json. A file moved, swapped or
copied in from another cache therefore fails its digest, although its own crc32c holds.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from g2sd_cache.cache import lowrank
from g2sd_cache.cache.codecs import Codec, get_codec
from g2sd_cache.cache.pixel_codecs import BYTES_ARRAYS
from g2sd_cache.common.fsutil import TMP_MARK  # noqa: F401  (re-exported: the cache's temporaries carry it)
from g2sd_cache.data.views import ViewGeometry

FORMAT_VERSION = 2      # 2: visible pixels (optional), cache marker, file and record digests, source image crc32c

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
SHARD_RECORD = "shard.json"
SHARD_PREFIX = "shard-"
CACHE_MARKER = ".g2sd-cache"
CALIBRATION_FILE = "calibration.json"
BASIS_FILE = lowrank.BASIS_FILE
LOCK_FILE = ".g2sd-cache.lock"


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}"


def tmp_shard_name(index: int) -> str:
    """Where a shard is written before it is complete; the suffix makes concurrent writers distinct."""
    return f".{shard_name(index)}{TMP_MARK}{os.uname().nodename}-{os.getpid()}"


@dataclass(frozen=True)
class ArraySpec:
    per_view_shape: tuple[int | None, ...]   # None: a width decided per shard (the keys' byte length)
    dtype: str


VLEN_BYTES = "variable_length_bytes"    # zarr's data type of one bytes object per element


def array_specs(codec: Codec, tokens: int, width: int, patches: int,
                visible_pixels: tuple[int, int] | None = None, pixels: str = "visible") -> dict[str, ArraySpec]:
    """Per-view arrays of a shard. `target` holds codes ([T, D], int4: [T, D/2] packed); `scale` exists for
    scaled codecs only ([T] float32, int4: [T, D/32] float16); `pixels` only when `visible_pixels` =
    (n_keep, patch_size) says the cache stores them, or instead `jpeg` / `lossless` (one blob per view) with
    `pixels` = "jpeg" / "lossless"."""
    if codec.values_per_code > 1 and width % codec.values_per_code:
        from g2sd_cache.common.errors import UserError
        raise UserError(f"codec {codec.name} packs {codec.values_per_code} values per byte and needs a target width "
                        f"divisible by {codec.values_per_code}; this teacher's is {width}: choose another --codec")
    if codec.tiers is not None and codec.rank > width:
        from g2sd_cache.common.errors import UserError
        raise UserError(f"codec {codec.name} keeps {codec.rank} coefficients per token but this teacher's targets are "
                        f"{width} wide: choose counts that add up to at most {width}")
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
    if visible_pixels is not None and pixels in BYTES_ARRAYS:
        specs[BYTES_ARRAYS[pixels]] = ArraySpec((), VLEN_BYTES)
    elif visible_pixels is not None:
        n_keep, p = visible_pixels
        specs["pixels"] = ArraySpec((n_keep, p, p, 3), "uint8")
    return specs


@dataclass
class ShardRecord:
    """shard.json: what one shard holds. `files` maps each file under the shard to its size in bytes,
    `digests` to its digest (cache/digests.py). A folder shard holds the images at positions [start, stop) of
    `folder_order(seed, listing size)`; a tar shard holds tar `tar` (its URL), start and stop None."""

    index: int
    images: int
    views_per_image: int
    start: int | None = None
    stop: int | None = None
    tar: str | None = None
    skipped: list[dict] = field(default_factory=list)   # [{"key", "error"}] inputs left out
    codec_error: dict = field(default_factory=dict)     # {codec: {rel_rmse, cosine}} on this shard's first batch
    files: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # file -> digests.file_digest: binds content to its path
    image_crc32c: list[int] = field(default_factory=list)  # per image row: crc32c of the source bytes extract read

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


_FOLDER_ORDER_TAG = 0x6C697374  # keeps this random stream apart from the views' (seed, index, view) streams
def folder_order(seed: int, count: int) -> np.ndarray:
    """[count] int64: the listing indices of a folder's images in the order extract deals them to shards
    and inner chunks, a pure function of (extract --seed, image count)."""
    rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, _FOLDER_ORDER_TAG])))
    return rng.permutation(count)


def source_index_for_tar(tar, position):
    """Tar sources have no global image numbering: pack (tar number, position in tar) into one int (works on
    ints and on numpy arrays alike)."""
    return (tar << 32) | position


def unsupported_format(version) -> str:
    """The one line for a cache of another format version (older caches lack digests and the marker)."""
    if isinstance(version, int) and version < FORMAT_VERSION:
        return (f"this cache has format version {version}, from an older g2sd-cache; this one reads version "
                f"{FORMAT_VERSION} only (it stores the views' pixels and binds every file to its place with digests): re-extract the cache "
                f"into a new --out (or delete this one first)")
    return (f"cache format version {version} is not supported by this g2sd-cache (it reads version {FORMAT_VERSION}); "
            f"use the g2sd-cache release that wrote it, or re-extract the cache")


@dataclass(frozen=True)
class TeacherRecord:
    """The teacher that made a cache: its architecture, where it came from, the sha256 of its weights."""

    arch: str
    source: str          # "random:SEED" or the checkpoint path
    sha256: str


@dataclass(frozen=True)
class SourceRecord:
    """The images a cache was made from. count: inputs in the listing (folder: images listed; tars: samples
    read); fingerprint: sources.Source.fingerprint; scan_skipped: entries the folder scan left out (they come
    first in the manifest's skipped list); shards: the tar URLs (tars only)."""

    kind: str            # "folder" or "tars"
    root: str
    count: int
    fingerprint: str
    scan_skipped: int = 0
    shards: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardEntry:
    """The manifest's line for one shard: its record's counts and range, file sizes, and `record`, the digest
    of its shard.json (which binds every file the record lists to this cache)."""

    name: str
    images: int
    views: int
    files: dict
    record: str
    start: int | None = None
    stop: int | None = None
    tar: str | None = None
    complete: bool = True


@dataclass(frozen=True)
class Manifest:
    """manifest.json: the single source of truth about a finished cache. Readers check it first
    (cache/manifest_checks.py), then build this typed view of it with `from_dict`."""

    format_version: int
    teacher: TeacherRecord
    target_layer: int
    geometry: ViewGeometry
    views_per_image: int
    seed: int
    codec: str
    pixels: str            # "visible": every view's visible patches are stored (uint8); "jpeg": as one JPEG per
                           # view (decoded, exactly what the teacher saw); "lossless": exactly, filtered and
                           # compressed per view; "none": images needed
    tokens: int            # T, cls first
    target_dim: int        # D, the teacher's decoder width
    chunk_views: int
    source: SourceRecord
    versions: dict         # {torch, torchvision, pillow}: view replay depends on them
    teacher_precision: str  # "fp32", "fp16-autocast" or "bf16-autocast": how the teacher ran (replay tolerances)
    shards: tuple[ShardEntry, ...]
    skipped: list[dict]    # [{key, error}]: the folder scan's entries first, then each shard's
    codec_error: dict      # {codec: {rel_rmse, cosine}}: every codec against fp32, on sampled views
    views: int
    images: int
    created: str
    # Optional (caches of the same format made before them lack them):
    basis: dict | None = None        # low-rank codecs: {file, sha256, shape} of basis.npy (lowrank.basis_record)
    calibration: dict | None = None  # codec auto / pcaR: {views, fit_views, heldout_views, max_error, chosen,
                                     #   errors: {codec: {rel_rmse, cosine, max_view_rel_rmse, target_bytes_per_view}}}
    # jpeg caches: {"quality", "subsampling", "decoder"}: how the stored JPEGs were made and which decoder gave
    # the teacher its pixels (the reader decodes with the same one); lossless caches: {"filter", "compressor"}
    # (lossless.encoding_record). Empty otherwise; optional in the JSON.
    pixel_encoding: dict = field(default_factory=dict)

    @property
    def stores_pixels(self) -> bool:
        return self.pixels in ("visible", "jpeg", "lossless")

    def specs(self) -> dict[str, ArraySpec]:
        """The per-view arrays every shard of this cache holds."""
        g = self.geometry
        return array_specs(get_codec(self.codec), self.tokens, self.target_dim, g.num_patches,
                           (g.num_visible, g.patch_size) if self.stores_pixels else None, self.pixels)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        """A manifest's JSON object -> the typed manifest. Check it first (`manifest_checks.manifest_problems`):
        this trusts the types."""
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["teacher"] = TeacherRecord(**data["teacher"])
        fields["geometry"] = geometry_from_dict(data["geometry"])
        src = dict(data["source"])
        fields["source"] = SourceRecord(**{**src, "shards": tuple(src.get("shards", ()))})
        known = ShardEntry.__dataclass_fields__
        fields["shards"] = tuple(ShardEntry(**{k: v for k, v in e.items() if k in known}) for e in data["shards"])
        return cls(**fields)


def required_fields() -> list[str]:
    """The manifest fields every cache of this format has (later, optional ones have defaults)."""
    from dataclasses import MISSING
    return [k for k, f in Manifest.__dataclass_fields__.items() if f.default is MISSING and f.default_factory is MISSING]


def geometry_from_dict(data: dict) -> ViewGeometry:
    """views.ViewGeometry from its JSON form (pairs are lists there)."""
    return ViewGeometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def parse_manifest(text: str) -> dict:
    """manifest.json's text -> its JSON object, with every field of this format present. A damaged or hand-edited
    manifest, or one of another format version, is a one-line UserError (never a JSONDecodeError traceback)."""
    from g2sd_cache.common.errors import UserError
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"cache manifest {MANIFEST} is not valid JSON ({e}); rerun the same `g2sd-cache extract` "
                        f"command to rewrite it") from e
    if not isinstance(data, dict):
        raise UserError(f"cache manifest {MANIFEST} is not a JSON object; rerun `g2sd-cache extract` to rewrite it")
    if data.get("format_version") != FORMAT_VERSION:
        raise UserError(unsupported_format(data.get("format_version")))
    missing = [k for k in required_fields() if k not in data]
    if missing:
        raise UserError(f"cache manifest {MANIFEST} lacks {', '.join(missing)}; rerun `g2sd-cache extract` to rewrite it")
    return data


def read_manifest_text(fs, root: str, shown: str) -> str:
    """The text of the manifest of the cache at `root` (an fsspec path; `shown` is how the user wrote it), or the
    one-line refusal for a folder that is not a finished cache."""
    from g2sd_cache.common.errors import UserError
    if not fs.exists(f"{root}/{MANIFEST}"):
        if fs.exists(f"{root}/{CONFIG}"):
            raise UserError(f"cache {shown} is incomplete: extraction has not finished (no {MANIFEST}); rerun the "
                            f"same `g2sd-cache extract` command to complete it")
        raise UserError(f"{shown} is not a g2sd-cache cache (no {MANIFEST}); create one with `g2sd-cache extract`")
    raw = fs.cat_file(f"{root}/{MANIFEST}")
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise UserError(f"cache manifest {shown}/{MANIFEST} is not UTF-8 text (damaged: byte {e.start} of "
                        f"{len(raw)}); rerun the same `g2sd-cache extract` command to rewrite it") from e
