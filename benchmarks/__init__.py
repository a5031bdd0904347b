"""Benchmarks, run as `python benchmarks/throughput.py` or `python -m benchmarks.throughput`
(`study`, `finetune`, `loss`, `class_mixing`, `codec_error` likewise). Installed as g2sd_cache.benchmarks.
"""
