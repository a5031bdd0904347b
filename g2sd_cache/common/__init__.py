"""Pieces every stage uses: user errors, atomic file writes, the YAML/dataclass config mechanism,
distributed set-up, worker start methods, untrusted checkpoint loading.
"""
