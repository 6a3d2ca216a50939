"""The swappable parts of the model: linears, the vocab embedding and the vocab projection.

The GPT model never builds an ``nn.Linear`` or ``nn.Embedding`` itself; it asks a
``LayerFactory``. This default factory makes plain single-device modules. A tensor-parallel
factory (a later issue, ``megagpt/parallel/layers.py``) subclasses it and returns
column-/row-parallel linears and a vocab-parallel embedding, sets ``tp_size``/``tp_rank`` so each
rank builds only its own heads, and overrides ``vocab_logits`` — without any change to the model.

Roles follow Megatron: a *column* linear may split its output features across ranks (QKV, MLP
up-projection), a *row* linear its input features, summing the partial outputs (attention output
projection, MLP down-projection).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megagpt.model.fused_ops import language_model_loss


class LayerFactory:
    """Builds plain (single-device) layers, initialised with a normal(0, ``init_std``) distribution."""

    tp_size: int = 1  # ranks that split a column/row linear; the model builds num_heads // tp_size heads
    tp_rank: int = 0

    def column_linear(self, in_features: int, out_features: int, *, bias: bool, init_std: float) -> nn.Module:
        """Linear whose output features a parallel version splits across ranks (output stays sharded)."""
        return self._linear(in_features, out_features, bias, init_std)

    def row_linear(self, in_features: int, out_features: int, *, bias: bool, init_std: float,
                   reduce_output: bool = True) -> nn.Module:
        """Linear whose input features a parallel version splits across ranks (output summed).

        ``reduce_output=False``: a parallel version returns this rank's partial sum (bias on one rank
        only) and the caller passes the sum of several such outputs through ``reduce`` once — the
        parallel residual's attention + MLP. On one device the partial output is the whole output."""
        return self._linear(in_features, out_features, bias, init_std)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum partial outputs of ``row_linear(..., reduce_output=False)`` over the ranks (here: one)."""
        return partial

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             fused: bool = False) -> torch.Tensor:
        """Mean next-token cross-entropy of ``vocab_logits`` output, in float32 (a log-softmax over 50k
        entries in bf16 is lossy); ``fused``: the fused Triton kernel on CUDA (megagpt/model/fused_ops.py).
        A vocab-parallel factory computes it without gathering the logits."""
        return language_model_loss(logits, targets, ignore_index, fused=fused)

    def gather_logits(self, logits: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """Full ``[..., vocab_size]`` logits from ``vocab_logits`` output (already whole on one device)."""
        return logits

    def vocab_embedding(self, num_embeddings: int, embedding_dim: int, *, init_std: float) -> nn.Module:
        """Token embedding with a ``.weight`` of shape ``[num_embeddings, embedding_dim]``."""
        embedding = nn.Embedding(num_embeddings, embedding_dim)
        nn.init.normal_(embedding.weight, mean=0.0, std=init_std)
        return embedding

    def vocab_logits(self, hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Project ``hidden`` ``[..., d_model]`` onto ``weight`` ``[padded_vocab, d_model]``.

        Returns ``[..., vocab_size]``: the padding rows are sliced off so that they can never be
        sampled or win an argmax, and the loss never sees them.
        """
        return F.linear(hidden, weight)[..., :vocab_size]

    @staticmethod
    def _linear(in_features: int, out_features: int, bias: bool, init_std: float) -> nn.Linear:
        linear = nn.Linear(in_features, out_features, bias=bias)
        nn.init.normal_(linear.weight, mean=0.0, std=init_std)
        if bias:
            nn.init.zeros_(linear.bias)
        return linear
