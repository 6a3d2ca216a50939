"""ALiBi: Attention with Linear Biases (Press et al., 2022, https://arxiv.org/abs/2108.12409).

Head ``h`` adds ``-slope_h * (i - j)`` to the scaled score of query position ``i`` and key
position ``j`` (causal, so ``i >= j``). Slopes are a geometric sequence; for head counts that are
not a power of two the paper takes the slopes of the nearest smaller power of two and fills up
with every other slope of the next larger one (the authors' reference code, reproduced below).

A tensor-parallel rank owns a contiguous slice of heads and asks for exactly those slopes with
``alibi_slopes(num_heads_total, head_offset, num_heads)``.
"""
from __future__ import annotations

import math

import torch


def _power_of_two_slopes(num_heads: int) -> list[float]:
    # start = 2^(-8/n); slopes = start^1 .. start^n, i.e. 2^(-8/n * k) for k = 1..n
    start = 2.0 ** (-(2.0 ** -(math.log2(num_heads) - 3)))
    return [start * start**k for k in range(num_heads)]


def _all_slopes(num_heads: int) -> list[float]:
    if math.log2(num_heads).is_integer():
        return _power_of_two_slopes(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = _all_slopes(2 * closest)[0::2][: num_heads - closest]
    return _power_of_two_slopes(closest) + extra


def alibi_slopes(num_heads_total: int, head_offset: int = 0, num_heads: int | None = None) -> torch.Tensor:
    """Slopes of heads ``head_offset .. head_offset + num_heads - 1`` out of ``num_heads_total``.

    Returns a float32 CPU tensor of shape ``[num_heads]`` (all heads when ``num_heads`` is None).
    """
    if isinstance(num_heads_total, bool) or not isinstance(num_heads_total, int) or num_heads_total <= 0:
        raise ValueError(f"num_heads_total must be a positive integer, got {num_heads_total!r}")
    if num_heads is None:
        num_heads = num_heads_total - head_offset
    if head_offset < 0 or num_heads <= 0 or head_offset + num_heads > num_heads_total:
        raise ValueError(
            f"head slice [{head_offset}, {head_offset + num_heads}) is not inside the "
            f"{num_heads_total} heads")
    slopes = _all_slopes(num_heads_total)[head_offset: head_offset + num_heads]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, seq_q: int, seq_k: int) -> torch.Tensor:
    """The ALiBi bias ``-slope_h * (i - j)`` as a ``[heads, seq_q, seq_k]`` tensor (no causal mask).

    Queries are the LAST ``seq_q`` of the ``seq_k`` positions (KV-cached decoding), so query row
    ``r`` sits at absolute position ``i = seq_k - seq_q + r``. Computed in the dtype of ``slopes``.
    """
    if seq_q > seq_k:
        raise ValueError(f"seq_q={seq_q} must not exceed seq_k={seq_k}")
    device, dtype = slopes.device, slopes.dtype
    query_pos = torch.arange(seq_k - seq_q, seq_k, device=device, dtype=dtype)  # [seq_q]
    key_pos = torch.arange(seq_k, device=device, dtype=dtype)  # [seq_k]
    distance = query_pos[:, None] - key_pos[None, :]  # [seq_q, seq_k]
    return -slopes[:, None, None] * distance[None]  # [heads, seq_q, seq_k]
