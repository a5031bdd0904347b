"""The one-writer lock of a cache on an object store: a lease object, since stores have no `flock`.

The lease (JSON: owner nonce, host, pid, command, since, expires) lives at `URL/.g2sd-cache.lock`.
- acquire: a conditional create (S3 `If-None-Match: *`, which s3fs sends for `mode="create"`; GCS and
  most S3-compatible stores honour it): of two extracts that start together exactly one succeeds. A store
  without conditional writes (fsspec's memory store) gets check-then-put and a re-read of our nonce after
  a pause: it catches a slower racer but is not a guarantee.
- a lease that expired, or whose holder is a process that is gone on this host, is taken over (on S3 with
  `If-Match` on the stale lease's ETag, so two takers cannot both win).
- a background thread renews it every ttl/3 while the command runs; if it finds someone else's nonce
  there (our lease expired while we were stalled and another writer took over) `check()` raises, so the
  writer stops before it publishes anything more.
- a second writer is refused in one line naming the holder and when the lease expires.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import datetime, timezone

from g2sd_cache.cache.remote import with_retries
from g2sd_cache.common.errors import UserError


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _host() -> str:
    return os.uname().nodename


def _dead_here(holder: dict) -> bool:
    """Whether the holder is a process of this host that no longer runs."""
    pid = holder.get("pid")
    if holder.get("host") != _host() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _is_s3(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return any(p in ("s3", "s3a") for p in protocols) and hasattr(fs, "call_s3")


class LeaseLock:
    """Hold the lease at `fs`/`path` (shown to users as `shown`) until `release()`."""

    def __init__(self, fs, path: str, shown: str, command: str, ttl_s: float = 120.0):
        self.fs, self.path, self.shown, self.command, self.ttl_s = fs, path, shown, command, ttl_s
        self.nonce = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._acquire()
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()

    # -- the object ----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.nonce, "host": _host(), "pid": os.getpid(), "command": self.command,
                           "since": _iso(now), "expires": now + self.ttl_s, "expires_at": _iso(now + self.ttl_s)}).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        """(the lease's content, its ETag) or (None, None) if there is none."""
        try:
            info = with_retries(lambda: self.fs.info(self.path), f"{self.shown} lease")
            raw = with_retries(lambda: self.fs.cat_file(self.path), f"{self.shown} lease")
        except FileNotFoundError:
            return None, None
        try:
            data = json.loads(raw)
        except ValueError:
            data = {}
        return (data if isinstance(data, dict) else {}), info.get("ETag")

    def _create(self) -> bool:
        """Create the lease if there is none; False if one exists."""
        body = self._body()
        if _is_s3(self.fs):
            try:
                with_retries(lambda: self.fs.pipe_file(self.path, body, mode="create"), f"{self.shown} lease")
                return True
            except FileExistsError:
                return False
        if self.fs.exists(self.path):    # no conditional writes: check, put, then re-read our nonce
            return False
        self.fs.pipe_file(self.path, body)
        time.sleep(0.05)
        data, _ = self._read()
        return bool(data) and data.get("owner") == self.nonce

    def _take_over(self, etag: str | None) -> bool:
        body = self._body()
        if _is_s3(self.fs) and etag:
            bucket, key = self.fs.split_path(self.path)[:2]
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfMatch=etag)
            except OSError as e:
                if "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
                    return False
                raise
            self.fs.invalidate_cache(self.path)
            return True
        self.fs.rm_file(self.path)
        return self._create()

    def _acquire(self) -> None:
        for _ in range(3):
            if self._create():
                return
            holder, etag = self._read()
            if holder is None:
                continue     # released between our create and our read: try again
            expired = float(holder.get("expires", 0)) < time.time()
            if expired or _dead_here(holder):
                if self._take_over(etag):
                    return
                continue
            raise UserError(f"another {holder.get('command', 'writer')} is writing into {self.shown} (pid "
                            f"{holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}; its lease "
                            f"expires at {holder.get('expires_at')} unless renewed); wait for it to finish or stop it, "
                            f"then rerun")
        raise UserError(f"{self.shown}: could not take its lock (.g2sd-cache.lock changed under us three times); rerun")

    # -- renewal ---------------------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as e:   # a store hiccup: the next renewal retries; expiry is ttl away
                if self.lost is None and isinstance(e, UserError):
                    self.lost = str(e)

    def renew(self) -> None:
        holder, etag = self._read()
        if not holder or holder.get("owner") != self.nonce:
            self.lost = (f"the lock on {self.shown} was taken by pid {(holder or {}).get('pid')} on host "
                         f"{(holder or {}).get('host')} while this {self.command} ran (its lease expired)")
            return
        if _is_s3(self.fs) and etag:
            bucket, key = self.fs.split_path(self.path)[:2]
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), IfMatch=etag)
            self.fs.invalidate_cache(self.path)
        else:
            self.fs.pipe_file(self.path, self._body())

    def check(self) -> None:
        """Raise if the lease was lost: nothing more may be published."""
        if self.lost:
            raise UserError(f"{self.lost}; stopped before publishing more. Rerun when the other writer is done")

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            holder, _ = self._read()
            if holder and holder.get("owner") == self.nonce:
                self.fs.rm_file(self.path)
        except Exception:   # an unreleased lease expires by itself
            pass
