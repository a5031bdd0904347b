"""The one exception type for user mistakes.

Anything the user can fix (a wrong path, a mismatched cache, a bad flag) raises `UserError` with
one line saying what is wrong and what to do. `cli.main` prints it without a traceback and exits 2;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line."""


class CacheCorruptError(UserError):
    """A cache shard fails its checksum, misses a chunk or disagrees with its manifest."""

    shard: str | None = None
    what: str | None = None

    @classmethod
    def in_shard(cls, shard: str, what: str) -> "CacheCorruptError":
        e = cls(f"cache shard {shard} is corrupt: {what}; run `g2sd-cache verify` on the cache, then delete "
                f"that shard's folder and manifest.json and rerun extract, or train with --on-error skip")
        e.shard, e.what = shard, what
        return e

    def in_logits_cache(self, root: str) -> "CacheCorruptError":
        """The same damage named for a stage-2 logits cache, whose reader (`finetune`) has no --on-error and
        whose writer is `extract-logits`."""
        if self.shard is None:
            return self
        return CacheCorruptError(f"logits cache {root}: shard {self.shard} is corrupt: {self.what}; run "
                                 f"`g2sd-cache verify {root}`, then rerun `g2sd-cache extract-logits --overwrite` "
                                 f"with the same options (or finetune without --logits)")
