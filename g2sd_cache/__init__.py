"""g2sd-cache: G2SD distillation of masked autoencoders from a cache of teacher targets.

Run the MAE teacher once (`g2sd-cache extract`), then train students from the stored targets
(`g2sd-cache train`) without ever running the teacher again. See README.md and docs/design.md.
"""
from g2sd_cache.cache.reader import Cache, ViewRecord, open_cache

__all__ = ["Cache", "ViewRecord", "open_cache"]
__version__ = "0.1.0"
