"""The on-disk caches: the format (schema), value codecs, the zarr shard layout and its checksums,
digests that bind files to their place, the writer, the target-cache reader and the logits cache, and
which folders we may write into (ownership).
"""
