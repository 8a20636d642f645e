"""Configuration of `python -m pytest bench` (the pytest-benchmark runs in bench/test_bench.py)."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors; before any is defined
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
