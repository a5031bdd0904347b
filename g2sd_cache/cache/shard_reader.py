"""What both cache readers share: the target cache's `Cache` (cache/reader.py) and the logits cache's
`LogitsCache` (cache/logits.py) read shard files the same way.

- Per-process state: open shard files (memory maps, zarr handles) are never pickled and are reopened after a
  fork (`_reset` runs in the new process), so a reader can be handed to DataLoader workers.
- An LRU of open files (`OPEN_FILES`), keyed (shard, part, array): part is the view of a target cache, the
  cached epoch of a logits cache.
- A shard's files are checked (`_check_sizes`, the subclass's: present, at their recorded size, ...) the first
  time a process touches the shard; the inner chunks whose crc32c passed are remembered per file across
  reopenings, so each chunk is checked once per process.
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from typing import Callable

from g2sd_cache.cache.zarr_layout import ArrayLayout, parse_layout
from g2sd_cache.common.errors import CacheCorruptError


class ShardReader:
    """Base of the cache readers; subclasses give `_check_sizes(shard)` and `_open_file(shard, part, name,
    verified)` (the reader of one shard file, `verified` the set of its inner chunks already checked)."""

    # Shard files kept open per process; the oldest are dropped first (rows handed out keep their map alive).
    OPEN_FILES = 64
    # Attributes that belong to one process: dropped when pickled, rebuilt by `_reset`.
    PER_PROCESS = ("_files", "_sized", "_verified", "_pid", "_touch_lock")

    def _reset(self) -> None:
        self._touch_lock = threading.Lock()
        self._files: OrderedDict = OrderedDict()
        self._sized: set[int] = set()
        self._verified: dict[tuple, set[int]] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self.PER_PROCESS}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _this_process(self) -> None:
        """Forked since the last read: the maps and zarr's event-loop thread belong to the parent."""
        if self._pid != os.getpid():
            self._reset()

    def _touch(self, shard: int) -> None:
        """Check `shard`'s files once per process, before its data is read."""
        self._this_process()
        if shard in self._sized:
            return
        with self._touch_lock:     # a remote cache's download threads touch shards too: one check each, not one per thread
            if shard not in self._sized:
                self._check_sizes(shard)
                self._sized.add(shard)

    def _file(self, shard: int, part: int, name: str):
        """The reader of array `name`, part `part` of `shard`: opened once per process, kept in the LRU."""
        self._touch(shard)
        key = (shard, part, name)
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        reader = self._open_file(shard, part, name, self._verified.setdefault(key, set()))
        self._files[key] = reader
        if len(self._files) > self.OPEN_FILES:
            self._files.popitem(last=False)
        return reader

    @staticmethod
    def _layout(shard_name: str, name: str, read: Callable[[], bytes | str]) -> ArrayLayout:
        """Array `name`'s zarr.json (`read()` returns its text), any failure a CacheCorruptError naming the shard."""
        try:
            return parse_layout(json.loads(read()))
        except (OSError, ValueError, KeyError) as e:
            raise CacheCorruptError.in_shard(shard_name, f"{name}/zarr.json: {type(e).__name__}: {e}") from e

    def _check_sizes(self, shard: int) -> None:
        raise NotImplementedError

    def _open_file(self, shard: int, part: int, name: str, verified: set[int]):
        raise NotImplementedError
