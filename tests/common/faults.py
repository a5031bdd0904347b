"""What the fault-injection tests share: copying and damaging caches, comparing them, full disks."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import zarr

from tests.common.helpers import MICRO_STUDENT
from g2sd_cache.cache.digests import local_reader, record_digest, shard_digests
from g2sd_cache.cache.schema import MANIFEST, SHARD_RECORD
from g2sd_cache.generic.train import TrainConfig
from g2sd_cache.cli.main import main as cli_main
from g2sd_cache.cache.zarr_layout import parse_layout, read_shard_index

ARRAYS = ("target", "mask", "crop", "flip", "source_index", "key")


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_file(cache: Path, shard: str, array: str, view: int = 0) -> Path:
    """The zarr shard file holding view `view` of `array` in cache shard `shard`."""
    meta = json.loads((cache / shard / array / "zarr.json").read_text())
    rest = len(meta["shape"]) - 2
    return cache / shard / array / "/".join(["c", str(view), "0", *["0"] * rest])


def chunk_span(path: Path, array_dir: Path, j: int) -> tuple[int, int]:
    """(offset, nbytes) of inner chunk j in a shard file, from its sharding index."""
    layout = parse_layout(json.loads((array_dir / "zarr.json").read_text()))
    index = read_shard_index(path.read_bytes(), int(np.prod(layout.chunks_per_shard)))
    off, nbytes = index[j].tolist()
    return off, nbytes


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def shard_arrays(cache: Path, shard: str) -> dict[str, np.ndarray]:
    names = [*ARRAYS, *(["scale"] if (cache / shard / "scale").is_dir() else [])]
    return {name: np.asarray(zarr.open_array(cache / shard / name, mode="r")[...]) for name in names}


def assert_caches_equal(a: Path, b: Path) -> None:
    """Same shards, same files, every array equal bit for bit, same records, same manifest (but its date)."""
    shards_a = sorted(p.name for p in a.glob("shard-*"))
    assert shards_a == sorted(p.name for p in b.glob("shard-*"))
    for shard in shards_a:
        assert json.loads((a / shard / SHARD_RECORD).read_text()) == json.loads((b / shard / SHARD_RECORD).read_text())
        x, y = shard_arrays(a, shard), shard_arrays(b, shard)
        assert sorted(x) == sorted(y)
        for name in x:
            assert x[name].dtype == y[name].dtype and np.array_equal(x[name], y[name]), f"{shard}/{name} differs"
    ma, mb = (json.loads((c / MANIFEST).read_text()) for c in (a, b))
    ma.pop("created"), mb.pop("created")
    assert ma == mb


def assert_complete_shards_sound(out: Path) -> None:
    """Every folder under a final shard name is complete: its record exists and its files are as recorded."""
    for folder in out.glob("shard-*"):
        record = folder / SHARD_RECORD
        assert record.is_file(), f"{folder.name} exists under its final name but has no {SHARD_RECORD}"
        for rel, size in json.loads(record.read_text())["files"].items():
            assert (folder / rel).stat().st_size == size, f"{folder.name}/{rel} is not as recorded"


def view_index(cache, shard: int, view: int, row: int) -> int:
    """Global index of (shard, view, row) in the reader's documented order: shard by shard, view-major."""
    i = sum(cache.shard_images[:shard]) * cache.views_per_image + view * cache.shard_images[shard] + row
    assert cache.locate(i) == (shard, view, row)
    return i


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


def micro_train_config(data, cache, out, **overrides) -> TrainConfig:
    base = dict(data=str(data), out=str(out), cache=str(cache), student=MICRO_STUDENT, workers=0, device="cpu",
                steps=3, batch_size=4, log_every=1, save_every=1000, warmup_steps=1)
    base.update(overrides)
    return TrainConfig(**base)


def verify_main(argv: list[str]) -> int:
    """`g2sd-cache verify ARGV...` in this process: its exit status."""
    return cli_main(["verify", *argv])


def run_verify_cli(*argv: str) -> tuple[int, str]:
    """`g2sd-cache verify ...` through the command line, in a subprocess (exit code, stdout+stderr)."""
    proc = subprocess.run([sys.executable, "-m", "g2sd_cache.cli.main", "verify", *argv], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def rerecord(cache: Path, shard: str) -> None:
    """After a deliberate rewrite, update the recorded file sizes and digests, and the manifest's digest of the
    record (so only content checks can notice)."""
    folder = cache / shard
    files = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != SHARD_RECORD}
    rec = json.loads((folder / SHARD_RECORD).read_text())
    rec["files"] = files
    rec["digests"] = shard_digests(files, lambda rel: (folder / rel).read_bytes(),
                                   lambda rel: local_reader(str(folder / rel)))
    raw = json.dumps(rec)
    (folder / SHARD_RECORD).write_text(raw)
    m = json.loads((cache / MANIFEST).read_text())
    for e in m["shards"]:
        if e["name"] == shard:
            e["files"], e["record"] = files, record_digest(raw.encode())
    (cache / MANIFEST).write_text(json.dumps(m))


def enospc_on(monkeypatch, *match: str) -> list[str]:
    """Make zarr's file writes whose path contains all of `match` fail half-way with ENOSPC; returns paths hit."""
    import zarr.storage._local as local
    original, hit = local._put, []

    def put(path, value, exclusive=False):
        if all(m in str(path) for m in match):
            hit.append(str(path))
            path.parent.mkdir(parents=True, exist_ok=True)
            with local._atomic_write(path, "wb") as f:
                f.write(bytes(value.as_buffer_like())[: max(1, len(value) // 2)])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, value, exclusive)
    monkeypatch.setattr(local, "_put", put)
    return hit


class FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails like a full disk (ENOSPC)."""

    def __init__(self, path: Path, room: int):
        self.file, self.room = open(path, "wb"), room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            self.file.write(bytes(b)[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.file.write(b)

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()
        super().close()


def enospc_in_atomic_writes(monkeypatch, prefix: str, room: int = 100) -> None:
    """Make fsutil's atomic writes of temporaries named `prefix...` fail with ENOSPC after `room` bytes."""
    import g2sd_cache.common.fsutil as fsutil
    original = fsutil._open_temp
    monkeypatch.setattr(fsutil, "_open_temp", lambda path: FullDisk(path, room) if path.name.startswith(prefix)
                        else original(path))


def tar_with_members(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the flock on `path` (as a running train would), saying who it is."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, json, os, time\n"
         f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nos.ftruncate(fd, 0)\n"
         "os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'elsewhere', 'since': 'now'}).encode())\n"
         "print('locked', flush=True)\ntime.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder
