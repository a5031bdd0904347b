"""One module per section of `benchmarks/throughput.py` (data, extract, step, storage, loss, flops, finetune).
"""
