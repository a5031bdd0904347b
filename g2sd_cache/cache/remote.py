"""Caches behind fsspec URLs (s3://, gs://, memory://, ...): which paths are remote, and the one retry loop
every request to a store goes through.

`with_retries(call, what)`: a store's transient failures (timeouts, connection resets, 429/500/503, a
body shorter than announced) are retried with exponential backoff and jitter, `RetryPolicy.attempts` times
in all; then one `RemoteError` line names the object and the last cause. Anything else (a missing object,
access denied, a bad bucket name) is not transient and goes straight to the caller.
"""
from __future__ import annotations

import errno
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import fsspec

from g2sd_cache.common.errors import UserError

T = TypeVar("T")


def is_remote(path: str) -> bool:
    """Whether `path` is an fsspec URL of a store other than the local filesystem."""
    if "://" not in str(path):
        return False
    protocol = str(path).split("://", 1)[0]
    return protocol not in ("file", "local")


def url_fs(url: str):
    """(filesystem, path inside it) for an fsspec URL."""
    return fsspec.core.url_to_fs(url)


@dataclass(frozen=True)
class RetryPolicy:
    """How transient store failures are retried: `attempts` tries in all, waiting base_s x 2^i (at most
    max_s, with +-50 % jitter so that many ranks do not retry in step) between them."""

    attempts: int = 6
    base_s: float = 0.2
    max_s: float = 8.0


DEFAULT_RETRY = RetryPolicy()


class RemoteError(UserError):
    """A request to the object store failed after its retries; the message names the object and the cause."""


# Words in an exception that mark a failure worth retrying (botocore/aiohttp/gcsfs/requests spell them
# differently; the types are not importable without those packages).
_TRANSIENT_WORDS = ("timeout", "timed out", "reset", "connection", "broken pipe", "slow down", "slowdown",
                    "503", "500", "502", "504", "429", "reduce your request rate", "service unavailable", "internal error", "throttl",
                    "payload", "incomplete", "truncated", "content-length", "not enough data", "server disconnected")


class TruncatedBody(OSError):
    """A download that ended before the object's announced size."""


def is_transient(e: BaseException) -> bool:
    if isinstance(e, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, UserError)):
        return False
    if isinstance(e, (TimeoutError, ConnectionError, TruncatedBody)):
        return True
    if isinstance(e, OSError) and e.errno in (errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET):
        return True     # s3fs's translation of SlowDown / 503
    text = f"{type(e).__name__}: {e}".lower()
    return any(w in text for w in _TRANSIENT_WORDS)


def with_retries(call: Callable[[], T], what: str, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, retried on transient failures; `what` names the object for the final error line."""
    policy = policy or DEFAULT_RETRY
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == policy.attempts - 1:
                raise RemoteError(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                                  f"(failed {policy.attempts} times with backoff; check the network and the "
                                  f"store, then rerun: finished work is kept)") from e
            delay = min(policy.max_s, policy.base_s * 2 ** attempt)
            sleep(delay * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")
