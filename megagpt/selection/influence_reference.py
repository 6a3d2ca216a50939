"""The exact reference for influence scoring: full per-example gradients, one example at a time, in float64.

What users' own scripts do (and what the fast path must equal with the projection off): a float64 copy of each
checkpoint's model, ``loss.backward()`` per example, the covered parameters' ``.grad`` flattened (a linear's bias
as its matrix's last column, as projection.py lays it out), multiplied elementwise by the preconditioner matrix
when one is given, and plain float64 dot products. Examples are the same as the fast path's
(``influence.document_pieces`` / ``stream_pieces``); nothing else is shared with it. Tiny models only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from megagpt.selection.adam import preconditioner_matrix
from megagpt.selection.influence import Piece, document_pieces, stream_pieces
from megagpt.selection.projection import gradient_blocks


@dataclass
class ReferenceCheckpoint:
    """One checkpoint of TracInCP: its model, learning rate and (optional) factored Adam preconditioner."""

    model: torch.nn.Module
    lr: float
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


def full_gradient(model: torch.nn.Module, pieces: Sequence[Piece], factors=None) -> torch.Tensor:
    """The full float64 gradient of one example (the sum of its pieces' weighted losses), flattened by block."""
    model.zero_grad(set_to_none=True)
    for piece in pieces:
        ids = torch.as_tensor(piece.tokens.astype(np.int64))[None]
        logits = model(ids[:, :-1]).double()
        loss = F.cross_entropy(logits[0], ids[0, 1:], reduction="sum") * piece.weight
        loss.backward()
    params = dict(model.named_parameters())
    parts = []
    for block in gradient_blocks(model):
        grad = params[block.name].grad
        grad = torch.zeros_like(params[block.name]) if grad is None else grad
        if block.bias is not None:
            grad = torch.cat([grad, params[block.bias].grad[:, None]], dim=1)
        if factors is not None:
            grad = grad * preconditioner_matrix(factors[block.name])
        parts.append(grad.reshape(-1).double())
    return torch.cat(parts)


def _by_example(pieces: list[Piece]) -> list[list[Piece]]:
    grouped: dict[int, list[Piece]] = {}
    for piece in pieces:
        grouped.setdefault(piece.example, []).append(piece)
    return [grouped[i] for i in sorted(grouped)]


def _unit(vector: torch.Tensor) -> torch.Tensor:
    norm = vector.norm()
    return vector / norm if norm > 0 else vector


def reference_influence(checkpoints: Sequence[ReferenceCheckpoint], documents: Sequence[np.ndarray],
                        valid_tokens: np.ndarray, seq_len: int, cosine: bool = False,
                        max_valid_windows: int | None = None) -> np.ndarray:
    """``sum_c lr_c < g_c(d), mean_i g_c(v_i) >`` per document, exactly (NaN for a document without a target)."""
    scores = np.zeros(len(documents))
    scorable = [i for i, d in enumerate(documents) if len(d) >= 2]
    doc_examples = _by_example(document_pieces([documents[i] for i in scorable], seq_len))
    valid_examples = _by_example(stream_pieces(valid_tokens, seq_len, max_valid_windows))
    for checkpoint in checkpoints:
        model = copy.deepcopy(checkpoint.model).double().eval()
        valid = [full_gradient(model, pieces) for pieces in valid_examples]
        valid_mean = torch.stack([_unit(g) if cosine else g for g in valid]).mean(dim=0)
        for slot, pieces in zip(scorable, doc_examples):
            grad = full_gradient(model, pieces, checkpoint.factors)
            scores[slot] += checkpoint.lr * float((_unit(grad) if cosine else grad) @ valid_mean)
    scores[[i for i in range(len(documents)) if i not in set(scorable)]] = np.nan
    return scores


__all__ = ["ReferenceCheckpoint", "full_gradient", "reference_influence"]
