"""The one exception type for user mistakes.

Anything the user can fix (a wrong path, a mismatched cache, a bad flag) raises `UserError` with
one line saying what is wrong and what to do. `cli.main` prints it without a traceback and exits 2;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line."""


class CacheCorruptError(UserError):
    """A cache shard fails its checksum, misses a chunk or disagrees with its manifest."""

    @classmethod
    def in_shard(cls, shard: str, what: str) -> "CacheCorruptError":
        return cls(f"cache shard {shard} is corrupt: {what}; run `g2sd-cache verify` on the cache, then delete "
                   f"that shard's folder and manifest.json and rerun extract, or train with --on-error skip")
