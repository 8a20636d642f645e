"""`python -m quickllm_kernels.fp8 convert SRC DST --to bf16|fp8`: the checkpoint converter."""
import sys

from .checkpoint import main

sys.exit(main())
