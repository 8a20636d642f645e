"""Triton kernels and their host launchers (imported lazily: triton is optional)."""
