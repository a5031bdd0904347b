"""The logits cache: a fine-tuned teacher's predictions on the mixed batches of K epochs of a stage-2 plan.

Same conventions as the target cache (cache/schema.py): a folder of zarr v3 shard groups, each renamed into
place only when complete (writer.write_shard), `shard.json` inside each, every inner chunk and shard index
with a crc32c, `config.yaml` written first and `manifest.json` written last.

    LOGITS/
      config.yaml        the extract-logits configuration + teacher sha256 + plan description (rerun checks it)
      manifest.json      `LogitsManifest`: teacher, the plan description (sd_plan.SDPlan.describe), K, top-k
      shard-00000/       groups [a, b) of every cached epoch
        shard.json       `LogitsShardRecord`: file sizes and digests, the crc32c of every image its groups read
        values/  [K, n, k] float16   the teacher's k largest logits per sample, descending
        indices/ [K, n, k] uint16    their classes (int32 above 65,535 classes)
        argmax/  [K, n]    uint16    the argmax of the fp32 logits: the hard-distillation label

Rows: n = (b - a) x G samples, group a's G samples first, in the plan's order inside the group; axis 0 is
the cached epoch, so the rows an epoch uses are one region per shard, as views are in the target cache.
One inner chunk holds one group. The argmax is stored on its own because it is taken on the fp32 logits:
two classes that tie after fp16 rounding of `values` keep the teacher's own choice.

Bound to its place as the target cache is (cache/digests.py): shard.json records each file's digest (a file
moved, swapped or copied in from another cache no longer matches) and the crc32c of every source image its
groups read; the manifest records each shard.json's digest. `LogitsCache` checks a shard's record and file
digests when the shard is first touched; `finetune` checks each image it reads against its recorded crc32c
(a same-size replacement keeps the listing's fingerprint, so the fingerprint alone cannot see it).

Bytes per sample per cached epoch: k x (2 + 2) + 2 = 22 B at k = 5 (ImageNet-1k: 28 MB an epoch).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from g2sd_cache.common.errors import CacheCorruptError, UserError
from g2sd_cache.cache.digests import digest_mismatch, file_digest, record_digest
from g2sd_cache.cache.schema import CONFIG, MANIFEST, SHARD_RECORD, ArraySpec
from g2sd_cache.cache.shard_files import MappedShardFile, can_map
from g2sd_cache.cache.shard_reader import ShardReader

LOGITS_FORMAT = "g2sd-logits"
LOGITS_FORMAT_VERSION = 2   # 2: per-file digests, record digests, the source images' crc32c


def index_dtype(num_classes: int) -> str:
    return "uint16" if num_classes <= np.iinfo(np.uint16).max + 1 else "int32"


def logits_specs(topk: int, num_classes: int) -> dict[str, ArraySpec]:
    """Per-sample arrays of a logits shard (`ArraySpec.per_view_shape` is per sample here)."""
    idx = index_dtype(num_classes)
    return {"values": ArraySpec((topk,), "float16"), "indices": ArraySpec((topk,), idx), "argmax": ArraySpec((), idx)}


@dataclass
class LogitsShardRecord:
    """shard.json: groups [first_group, first_group + groups) of every cached epoch. `files`: size by path."""

    index: int
    first_group: int
    groups: int
    group_size: int
    epochs: int
    files: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)      # path -> digest (cache/digests.py), by the writer
    image_crc32c: dict[str, int] = field(default_factory=dict)  # image index (as text) -> crc32c of its bytes

    @property
    def samples(self) -> int:
        return self.groups * self.group_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LogitsShardRecord":
        return cls(**json.loads(text))


@dataclass
class LogitsManifest:
    """manifest.json of a logits cache: what a trainer checks before trusting it."""

    format: str
    format_version: int
    teacher: dict            # classifier.ClassifierInfo as a dict
    teacher_precision: str   # "fp32" (G2SD: outside autocast), "fp16-autocast" or "bf16-autocast"
    plan: dict               # SDPlan.describe(): seed, recipe, images, classes, listing, library versions
    epochs: int              # K: training epoch e reads cached epoch e mod K
    groups_per_epoch: int
    group_size: int
    topk: int
    num_classes: int
    shard_groups: int
    shards: list[dict]       # [{name, first_group, groups, files, record}]: record = digest of shard.json
    samples: int             # K x groups_per_epoch x group_size
    bytes: int               # on disk, all shard files
    created: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "LogitsManifest":
        if isinstance(text, bytes):
            try:
                text = text.decode()
            except UnicodeDecodeError as e:
                raise UserError(f"{where}/{MANIFEST} is not UTF-8 text (damaged: byte {e.start} of {len(text)}); "
                                f"rerun the same `g2sd-cache extract-logits` command to rewrite it") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}/{MANIFEST} is not valid JSON ({e}); rerun the same `g2sd-cache extract-logits` "
                            f"command to rewrite it") from e
        if not isinstance(data, dict) or data.get("format") != LOGITS_FORMAT:
            raise UserError(f"{where} is not a logits cache (its {MANIFEST} is not one); pass the --out folder of "
                            f"`g2sd-cache extract-logits`")
        if data.get("format_version") != LOGITS_FORMAT_VERSION:
            raise UserError(f"{where}: logits cache format version {data.get('format_version')} is not supported "
                            f"(this g2sd-cache reads version {LOGITS_FORMAT_VERSION}); rerun extract-logits")
        missing = [k for k in cls.__dataclass_fields__ if k not in data]
        if missing:
            raise UserError(f"{where}/{MANIFEST} lacks {', '.join(missing)}; rerun extract-logits to rewrite it")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    @property
    def bytes_per_sample(self) -> float:
        """On-disk bytes per sample per cached epoch (zarr and crc overheads included)."""
        return self.bytes / max(1, self.samples)


def is_logits_cache(path: str | Path) -> bool:
    """Whether `path` (a folder or an fsspec URL) holds a logits cache (finished or not): its config or manifest
    says so."""
    from g2sd_cache.cache.remote import is_remote, url_fs
    fs, root = url_fs(str(path)) if is_remote(str(path)) else (None, None)
    p = Path(path)
    for name in (MANIFEST, CONFIG):
        try:
            head = (fs.cat_file(f"{root.rstrip('/')}/{name}").decode() if fs else (p / name).read_text())[:4096]
        except (OSError, UnicodeDecodeError):
            continue
        if f'"format": "{LOGITS_FORMAT}"' in head or f"format: {LOGITS_FORMAT}" in head:
            return True
    return False


@dataclass(frozen=True)
class TeacherPredictions:
    """One group's stored predictions: values [G, k] float32 (from fp16), indices [G, k] int64, argmax [G] int64."""

    values: torch.Tensor
    indices: torch.Tensor
    argmax: torch.Tensor


class LogitsCache(ShardReader):
    """A finished logits cache on a local disk. `read(epoch, group)` -> `TeacherPredictions` of cached epoch
    `epoch` (0 <= epoch < K). Shard files are memory-mapped; each inner chunk's crc32c is checked on first use
    and every file's size against the manifest when its shard is first touched (CacheCorruptError otherwise).
    Safe to pickle and fork: maps are reopened per process (ShardReader, cache/shard_reader.py)."""

    OPEN_FILES = 96

    def __init__(self, root: str | Path, shown: str | None = None):
        self.root = Path(root)
        self.shown = shown or str(root)    # the name in messages: the URL of a cache read through a local copy
        if "://" in str(root):
            raise UserError(f"{root}: a logits cache at a URL is opened with open_logits(url, local_folder), "
                            f"which reads it through a node-local copy")
        if not (self.root / MANIFEST).is_file():
            if (self.root / CONFIG).is_file() and is_logits_cache(self.root):
                raise UserError(f"logits cache {root} is incomplete: extract-logits has not finished (no {MANIFEST}); "
                                f"rerun the same command to complete it")
            raise UserError(f"{root} is not a logits cache (no {MANIFEST}); create one with `g2sd-cache extract-logits`")
        self.manifest = LogitsManifest.from_json((self.root / MANIFEST).read_bytes(), str(root))
        self._reset()

    @property
    def epochs(self) -> int:
        return self.manifest.epochs

    def check_shard(self, shard: int) -> None:
        """A shard's files, record and digests against the manifest (verify calls it directly)."""
        self._check_sizes(shard)

    def _check_sizes(self, shard: int) -> None:
        """A shard's files, record and digests against the manifest, once per process on first touch (a few KB
        read: each file's index and chunk crc32c, ShardReader._touch)."""
        entry = self.manifest.shards[shard]
        name = entry["name"]
        for rel, size in entry["files"].items():
            path = self.root / name / rel
            if not path.is_file():
                raise CacheCorruptError.in_shard(name, f"file {rel} is missing")
            if path.stat().st_size != size:
                raise CacheCorruptError.in_shard(name, f"file {rel} has {path.stat().st_size} bytes, the "
                                                       f"manifest says {size}")
        record = self._record(shard)
        for rel, size in entry["files"].items():
            try:
                digest = file_digest(self.root / name, rel, size)
            except (OSError, ValueError, KeyError) as e:
                raise CacheCorruptError.in_shard(name, f"file {rel}: {type(e).__name__}: {e}") from e
            problem = digest_mismatch(rel, digest, record.digests)
            if problem:
                raise CacheCorruptError.in_shard(name, problem)

    def _record(self, shard: int) -> "LogitsShardRecord":
        """shard.json of `shard`, checked against the digest the manifest records for it."""
        entry = self.manifest.shards[shard]
        try:
            raw = (self.root / entry["name"] / SHARD_RECORD).read_bytes()
        except OSError as e:
            raise CacheCorruptError.in_shard(entry["name"], f"{SHARD_RECORD} cannot be read ({e})") from e
        if record_digest(raw) != entry.get("record"):
            raise CacheCorruptError.in_shard(entry["name"], f"{SHARD_RECORD} is not the one the manifest records "
                                                            f"(moved, swapped or copied in from another cache)")
        return LogitsShardRecord.from_json(raw.decode())

    def image_crc32c(self, num_images: int) -> np.ndarray:
        """[num_images] int64: the crc32c every shard recorded for each source image (-1: never read)."""
        out = np.full(num_images, -1, dtype=np.int64)
        for shard in range(len(self.manifest.shards)):
            for index, crc in self._record(shard).image_crc32c.items():
                i = int(index)
                if not 0 <= i < num_images:
                    raise CacheCorruptError.in_shard(self.manifest.shards[shard]["name"], f"image {i} is outside "
                                                     f"the {num_images} images of the data")
                out[i] = crc
        return out

    def shard_file(self, shard: int, epoch: int, name: str) -> MappedShardFile:
        """The mapped rows of array `name`, cached epoch `epoch`, of `shard` (kept in a small LRU)."""
        return self._file(shard, epoch, name)

    def _open_file(self, shard: int, epoch: int, name: str, verified: set[int]) -> MappedShardFile:
        entry = self.manifest.shards[shard]
        base = self.root / entry["name"]
        layout = self._layout(entry["name"], name, lambda: (base / name / "zarr.json").read_text())
        if not can_map(layout, local=True):
            raise CacheCorruptError.in_shard(entry["name"], f"{name} is not stored as plain bytes + crc32c")
        rel = f"{name}/" + next(r for coord, r in layout.shard_files() if coord[0] == epoch)
        return MappedShardFile(str(base / rel), layout, entry["name"], rel, verified)

    def read(self, epoch: int, group: int) -> TeacherPredictions:
        m = self.manifest
        if not (0 <= epoch < m.epochs and 0 <= group < m.groups_per_epoch):
            raise IndexError(f"group {group} of cached epoch {epoch}: the cache holds {m.epochs} epochs of "
                             f"{m.groups_per_epoch} groups")
        shard = group // m.shard_groups
        start = (group - m.shards[shard]["first_group"]) * m.group_size
        try:
            rows = {name: np.array(self.shard_file(shard, epoch, name).rows(start, start + m.group_size))
                    for name in ("values", "indices", "argmax")}
        except CacheCorruptError as e:
            raise e.in_logits_cache(self.shown) from None
        return TeacherPredictions(values=torch.from_numpy(rows["values"].astype(np.float32)),
                                  indices=torch.from_numpy(rows["indices"].astype(np.int64)),
                                  argmax=torch.from_numpy(rows["argmax"].astype(np.int64)))


def open_logits(path: str | Path, local_cache: str | None = None) -> LogitsCache:
    """Open a finished logits cache for reading: a folder, or an fsspec URL read through a node-local copy under
    `local_cache` (default: the per-user folder train uses; cache/logits_remote.py)."""
    from g2sd_cache.cache.remote import is_remote
    if is_remote(str(path)):
        from g2sd_cache.cache.local_mirror import default_folder
        from g2sd_cache.cache.logits_remote import local_copy
        try:
            local = local_copy(str(path), local_cache or default_folder())
        except CacheCorruptError as e:
            raise e.in_logits_cache(str(path)) from None
        return LogitsCache(local, shown=str(path))
    return LogitsCache(path)
