"""Plain PyTorch causal attention with ALiBi, the reference that ``megagpt.kernels.alibi_attention`` is tested against.

It materialises the ``[seq_q, seq_k]`` score matrix, which is what the Triton kernel exists to avoid.
"""
from __future__ import annotations

import math

import torch


def alibi_causal_bias(slopes: torch.Tensor, seq_q: int, seq_k: int) -> torch.Tensor:
    """``[heads, seq_q, seq_k]`` additive bias: ``-slope_h * (i - j)`` where key ``j <= i``, ``-inf`` elsewhere.

    Query row ``r`` sits at absolute position ``i = seq_k - seq_q + r`` (the queries are the last ``seq_q``
    positions, as when decoding with a KV cache).
    """
    if seq_q > seq_k:
        raise ValueError(f"seq_q ({seq_q}) must not exceed seq_k ({seq_k}): queries are the last keys' positions")
    i = torch.arange(seq_k - seq_q, seq_k, device=slopes.device).view(seq_q, 1)
    j = torch.arange(seq_k, device=slopes.device).view(1, seq_k)
    distance = (i - j).to(slopes.dtype)
    bias = -slopes.view(-1, 1, 1) * distance
    return bias.masked_fill(j > i, float("-inf"))


def alibi_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q @ k^T * softmax_scale + alibi_causal_bias) @ v`` over ``[batch, heads, seq, head_dim]`` inputs.

    ``softmax_scale`` defaults to ``1 / sqrt(head_dim)``. Computes in the dtype of ``q`` (slopes are cast to it);
    tests pass float64 copies.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    scores = scores + alibi_causal_bias(slopes.to(q.dtype), q.shape[-2], k.shape[-2])
    return torch.matmul(torch.softmax(scores, dim=-1), v)
