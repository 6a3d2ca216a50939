"""Plain PyTorch LayerNorm, the reference that ``megagpt.kernels.layernorm`` is tested against."""
from __future__ import annotations

import torch


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension, written out: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    ``var`` is the biased variance (divided by the hidden size), as in ``torch.nn.LayerNorm``. Computes in the
    dtype of ``x``; tests pass float64 copies.
    """
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight
    if bias is not None:
        y = y + bias
    return y
