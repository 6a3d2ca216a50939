"""Triton kernels, installed as ``megagpt.kernels`` (see setup.py).

Each kernel module sits beside a plain PyTorch reference of the same function.
"""
# When the repository root is on sys.path (``python -m pytest``, scripts run from a checkout) this folder is also
# importable as a top-level ``kernels``, the name of a PyPI package that bitsandbytes (``from kernels import
# get_kernel``) and transformers (``import_module("kernels")`` to read its version) probe for. As that name it must
# look like "not the package": import fine, export nothing and have no __version__ (so ``from kernels import X``
# raises ImportError and transformers sees no usable version). Raising ImportError here instead breaks
# transformers, which does not catch it.
if __name__ == "megagpt.kernels":
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
