"""Triton kernels, installed as ``megagpt.kernels`` (see setup.py).

Each kernel module sits beside a plain PyTorch reference of the same function.
"""
if __name__ != "megagpt.kernels":
    # bitsandbytes does ``from kernels import get_kernel`` (the PyPI "kernels" package) and treats an
    # ImportError as "not installed"; when this folder is on sys.path it must look exactly like that.
    raise ImportError("megagpt's kernels/ folder is the package 'megagpt.kernels', not a top-level 'kernels'")
