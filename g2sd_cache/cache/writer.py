"""Writing cache shards: atomically (temp folder, then rename) and in the background.

A shard is complete exactly when its folder exists under its final name; everything inside it,
`shard.json` last (with the digest of every file, cache/digests.py), is written under a temporary name first
and fsync-ed before the rename (fsutil.publish_dir). A `kill -9` or a power cut therefore leaves at most
a temporary folder, which the next run deletes and redoes.

`ShardWriter` runs `write_shard` on a background thread behind a queue of one, so the teacher keeps
computing while a shard is written, and at most one finished shard waits in memory. With `publish`, each
written shard is then handed on from the same thread (extract to a URL uploads it: cache/destination.py).
"""
from __future__ import annotations

import math
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import warnings

import zarr
from zarr.codecs import Crc32cCodec
from zarr.dtype import VariableLengthBytes

from g2sd_cache.cache.digests import local_reader, shard_digests
from g2sd_cache.common.errors import UserError
from g2sd_cache.common.fsutil import is_out_of_space, publish_dir
from g2sd_cache.cache.schema import SHARD_RECORD, ShardRecord, shard_name, tmp_shard_name

# Chunks that equal the fill value must still be written: a missing chunk must mean corruption.
_ARRAY_CONFIG = {"write_empty_chunks": True}


@dataclass
class ShardData:
    """A finished shard in memory: every array [K, n, ...] in schema order, and its record."""

    record: ShardRecord
    arrays: dict[str, np.ndarray]


def write_shard(root: Path, data: ShardData, chunk_views: int) -> int:
    """Write one shard under a temporary name, then rename it into place. Returns bytes written."""
    index = data.record.index
    final = root / shard_name(index)
    tmp = root / tmp_shard_name(index)
    if tmp.exists():
        shutil.rmtree(tmp)
    group = zarr.open_group(tmp, mode="w", zarr_format=3)
    for name, values in data.arrays.items():
        k, n = values.shape[:2]
        rest = values.shape[2:]
        inner = max(1, min(chunk_views, n))
        vlen = values.dtype == object     # one bytes object per element (jpeg pixels)
        with warnings.catch_warnings():   # vlen bytes has no zarr v3 spec yet; shard_files.py reads its layout itself
            warnings.simplefilter("ignore")
            arr = group.create_array(
                name, shape=values.shape, dtype=VariableLengthBytes() if vlen else values.dtype,
                chunks=(1, inner, *rest), shards=(1, inner * max(1, math.ceil(n / inner)), *rest),
                compressors=[Crc32cCodec()], config=_ARRAY_CONFIG, fill_value=b"" if vlen else 0)
        if values.size:
            arr[...] = values
    files = {}
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            files[path.relative_to(tmp).as_posix()] = path.stat().st_size
    data.record.files = files
    data.record.digests = shard_digests(files, lambda rel: (tmp / rel).read_bytes(),
                                        lambda rel: local_reader(str(tmp / rel)))
    (tmp / SHARD_RECORD).write_text(data.record.to_json())
    publish_dir(tmp, final)      # every file fsync-ed, then the rename, then the parent folder
    return sum(files.values())


class ShardWriter:
    """Writes shards on a background thread; `submit` blocks while one shard is already waiting."""

    def __init__(self, root: Path, chunk_views: int, what: str = "cache",
                 publish: Callable[[Path], None] | None = None):
        self.root, self.what = root, what
        self.publish = publish     # called with each written shard folder, on the thread (e.g. an upload)
        self.chunk_views = chunk_views
        self.bytes_written = 0
        self._queue: queue.Queue[ShardData | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.bytes_written += write_shard(self.root, item, self.chunk_views)
                    if self.publish is not None:
                        self.publish(self.root / shard_name(item.record.index))
                except BaseException as e:  # surfaced to the caller on the next submit/close
                    self._error = e

    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        if is_out_of_space(self._error):   # a user's problem: one line, and a rerun resumes
            raise UserError(f"no space left on the device while writing the {self.what} in {self.root}; free space "
                            f"and rerun the same command: complete shards are kept, the rest is redone") from self._error
        raise self._error

    def submit(self, data: ShardData) -> None:
        self._raise_if_failed()
        self._queue.put(data)

    def abandon(self) -> None:
        """Let the thread end without waiting (after an error); shards not yet written stay unwritten."""
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("abandoned")
            while True:  # drop what waits, then wake the thread with the end marker
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put_nowait(None)

    def close(self) -> None:
        """Wait for every submitted shard to be written; re-raise a write error."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
