"""The parts of `benchmarks/study.py`: its configuration, data, arms and report.
"""
