"""Triton kernels, installed as ``megagpt.kernels`` (see setup.py).

Each kernel module sits beside a plain PyTorch reference of the same function.
"""
if __name__ != "megagpt.kernels":
    # bitsandbytes does ``from kernels import get_kernel`` (the PyPI "kernels" package) and treats an
    # ImportError as "not installed"; when this folder is on sys.path it must look exactly like that.
    raise ImportError("megagpt's kernels/ folder is the package 'megagpt.kernels', not a top-level 'kernels'")

from .alibi_attention import alibi_flash_attention
from .alibi_attention_reference import alibi_attention_reference, alibi_causal_bias
from .cross_entropy import fused_cross_entropy
from .cross_entropy_reference import cross_entropy_reference
from .layernorm import fused_layer_norm
from .layernorm_reference import layer_norm_reference

__all__ = [
    "alibi_flash_attention",
    "alibi_attention_reference",
    "alibi_causal_bias",
    "fused_cross_entropy",
    "cross_entropy_reference",
    "fused_layer_norm",
    "layer_norm_reference",
]
