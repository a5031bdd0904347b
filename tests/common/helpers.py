"""What tests share besides fixtures: the micro presets and a seconds-long extract configuration.

The micro teacher (`test_mae_micro_patch16`) and student run the real code path at 64-px crops
(L = 16 patches, T = 17 tokens, D = 32), so a whole extract or a few training steps take seconds.
"""
from g2sd_cache.generic.extract import ExtractConfig

MICRO_TEACHER = "test_mae_micro_patch16"
MICRO_STUDENT = "test_vit_micro_patch16_dec32d1b"


def micro_extract_config(data, out, **overrides) -> ExtractConfig:
    """An extract configuration that runs in seconds on CPU: micro teacher, 64-px crops, no workers."""
    base = dict(data=str(data), out=str(out), teacher="random", arch=MICRO_TEACHER, img_size=64, views=2,
                shard_size=8, chunk_views=2, batch_size=4, workers=0, device="cpu")
    base.update(overrides)
    return ExtractConfig(**base)
