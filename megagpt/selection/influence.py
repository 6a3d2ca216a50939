"""TracIn influence of training documents on a validation set, from projected per-example gradients.

For checkpoints ``c`` (TracInCP, arXiv:2002.08484) with learning rates ``lr_c``, a training document ``d`` and
validation examples ``v_1 .. v_n``::

    influence(d) = sum_c lr_c * < g_c(d), (1/n) sum_i g_c(v_i) >

``g_c`` is the projected gradient (projection.py) of the mean next-token loss of one example at checkpoint ``c``;
with ``cosine`` every gradient is scaled to unit length first (LESS), with an Adam preconditioner (adam.py) the
training side is. The validation gradients are averaged first, so a document's score is one dot product per
checkpoint and no documents x validation matrix is ever formed.

Examples. A training document is scored on its own (no neighbouring document in its context): its tokens are cut
into windows of ``seq_len`` inputs (``evaluation.scoring.sliding_windows`` with stride ``seq_len``), every target
weighted ``1 / (its targets)``, and its windows' gradients add up to the gradient of its mean loss. A document with
fewer than two tokens has no target: its score is NaN. A validation example is one such window of the validation
stream (a text file, or an indexed split's documents concatenated, as evaluation reads them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from megagpt.evaluation.scoring import sliding_windows
from megagpt.selection.projection import ProjectedGradients


@dataclass(frozen=True)
class Piece:
    """One model input row: ``tokens`` (inputs followed by the last target), every target weighted ``weight``,
    adding to example ``example``."""

    example: int
    tokens: np.ndarray
    weight: float


def document_pieces(documents: Sequence[np.ndarray], seq_len: int) -> list[Piece]:
    """The windows of each document scored on its own (module docstring); example ``i`` is ``documents[i]``."""
    pieces = []
    for index, tokens in enumerate(documents):
        targets = len(tokens) - 1
        for window in sliding_windows(len(tokens), seq_len):
            pieces.append(Piece(index, np.asarray(tokens[window.begin:window.end + 1]), 1.0 / targets))
    return pieces


def stream_pieces(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> list[Piece]:
    """Validation examples: the non-overlapping windows of one token stream, each its own example."""
    windows = sliding_windows(len(tokens), seq_len)[:max_windows]
    return [Piece(i, np.asarray(tokens[w.begin:w.end + 1]), 1.0 / (w.end - w.begin)) for i, w in enumerate(windows)]


def _batch(pieces: Sequence[Piece], device: torch.device):
    """Right-padded ``(tokens, targets, weights)`` ``[batch, longest]``; padding has weight 0."""
    width = max(len(p.tokens) for p in pieces) - 1
    tokens = torch.zeros(len(pieces), width, dtype=torch.long)
    targets = torch.zeros(len(pieces), width, dtype=torch.long)
    weights = torch.zeros(len(pieces), width, dtype=torch.float32)
    for row, piece in enumerate(pieces):
        ids = torch.as_tensor(piece.tokens.astype(np.int64))
        tokens[row, :len(ids) - 1], targets[row, :len(ids) - 1] = ids[:-1], ids[1:]
        weights[row, :len(ids) - 1] = piece.weight
    return tokens.to(device), targets.to(device), weights.to(device)


def gradient_batches(projector: ProjectedGradients, pieces: Sequence[Piece], batch_size: int
                     ) -> Iterable[tuple[list[int], torch.Tensor]]:
    """``(example of each row, [rows, dim] float32 projected gradients)`` for ``pieces``, ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    device = next(projector.model.parameters()).device
    for start in range(0, len(pieces), batch_size):
        chunk = pieces[start:start + batch_size]
        yield [p.example for p in chunk], projector.per_row(*_batch(chunk, device))


def normalize_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = vectors.norm(dim=-1, keepdim=True)
    return vectors / torch.where(norms > 0, norms, torch.ones_like(norms))


def example_gradients(projector: ProjectedGradients, pieces: Sequence[Piece], num_examples: int,
                      batch_size: int, cosine: bool = False) -> torch.Tensor:
    """``[num_examples, dim]`` float64: each example's projected gradient, its pieces summed (unit length with
    ``cosine``)."""
    device = next(projector.model.parameters()).device
    total = torch.zeros(num_examples, projector.dim, dtype=torch.float64, device=device)
    for examples, rows in gradient_batches(projector, pieces, batch_size):
        total.index_add_(0, torch.as_tensor(examples, device=device), rows.double())
    return normalize_rows(total) if cosine else total


def validation_sum(projector: ProjectedGradients, pieces: Sequence[Piece], batch_size: int,
                   cosine: bool = False) -> torch.Tensor:
    """Sum over the validation examples in ``pieces`` (one piece each) of their projected gradients, float64
    ``[dim]``: divided by the number of examples (over all ranks) it is the averaged validation gradient."""
    device = next(projector.model.parameters()).device
    total = torch.zeros(projector.dim, dtype=torch.float64, device=device)
    for _, rows in gradient_batches(projector, pieces, batch_size):
        rows = rows.double()
        total += (normalize_rows(rows) if cosine else rows).sum(dim=0)
    return total


def document_scores(projector: ProjectedGradients, documents: Sequence[np.ndarray], validation: torch.Tensor,
                    seq_len: int, batch_size: int, cosine: bool = False) -> np.ndarray:
    """``< g(d), validation >`` for each document (float64; NaN for a document without a target)."""
    scorable = [i for i, d in enumerate(documents) if len(d) >= 2]
    scores = np.full(len(documents), np.nan)
    if scorable:
        pieces = document_pieces([documents[i] for i in scorable], seq_len)
        vectors = example_gradients(projector, pieces, len(scorable), batch_size, cosine)
        scores[scorable] = (vectors @ validation.to(vectors.device)).cpu().numpy()
    return scores


__all__ = ["Piece", "document_pieces", "document_scores", "example_gradients", "gradient_batches",
           "normalize_rows", "stream_pieces", "validation_sum"]
