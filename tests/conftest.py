"""Test set-up shared by every test file.

TRITON_INTERPRET must be set before anything imports the kernel module: Triton decides at decoration
time whether a @triton.jit function runs compiled or interpreted.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
