"""Model tests run the Triton attention backend through the CPU interpreter when there is no GPU.

megagpt's Triton kernels read TRITON_INTERPRET at launch time (kernels/_common.py), so setting it here,
before any test runs, is enough; a GPU machine keeps the compiled kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
