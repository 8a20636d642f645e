"""Pure-PyTorch references of every op: the CPU kernels and the test oracles."""
