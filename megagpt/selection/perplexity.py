"""Per-document perplexity: every document of an indexed dataset scored on its own.

A document is the concatenation of its sequences (megagpt and Megatron without ``--split-sentences`` write one per
document, EOD included when preprocessing appended it). It is scored exactly as ``tools/evaluate.py`` scores a
stream (``megagpt.evaluation.scoring``): its token 0 is never a target, every later token is scored once, and a
document longer than the window is read in sliding windows (``stride``; a later window's targets see at least
``seq_length - stride + 1`` tokens of context). No window crosses a document boundary: each window is its own
row of a right-padded batch (causal attention: padding after a row cannot change it), so no document attends to
another.

Windows of a range of documents are batched longest first (similar lengths share a batch, so padding stays
small); the result for a range depends only on the range and the settings, never on which rank computes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from megagpt.data.indexed import IndexedDataset
from megagpt.evaluation.scoring import Window, score_windows, sliding_windows

COLUMNS = ("tokens", "nll_sum", "perplexity")  # the score file's columns, one row per document


@dataclass(frozen=True)
class ScoreSettings:
    """How documents are scored (recorded in the score file; a resumed run must use the same)."""

    seq_length: int
    stride: int
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("seq_length", "stride", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.stride > self.seq_length:
            raise ValueError(f"--stride {self.stride} is longer than --seq-length {self.seq_length}: tokens would "
                             "be skipped")


def document_tokens(dataset: IndexedDataset, doc: int) -> np.ndarray:
    """All tokens of document ``doc`` (its sequences concatenated)."""
    first, last = int(dataset.document_indices[doc]), int(dataset.document_indices[doc + 1])
    if last - first == 1:
        return dataset.get(first)
    parts = [dataset.get(i) for i in range(first, last)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dataset.dtype)


def document_lengths(dataset: IndexedDataset) -> np.ndarray:
    """Tokens per document (int64), from the index alone."""
    per_sequence = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
    return np.diff(per_sequence[np.asarray(dataset.document_indices)])


def score_document_range(model: torch.nn.Module, dataset: IndexedDataset, begin: int, end: int,
                         settings: ScoreSettings) -> dict[str, np.ndarray]:
    """``COLUMNS`` for documents ``begin .. end - 1``: scored targets (int64), summed NLL in nats and perplexity
    (float64; NaN for a document of fewer than 2 tokens, which has no target)."""
    streams, windows, owners, offset = [], [], [], 0
    for row, doc in enumerate(range(begin, end)):
        tokens = document_tokens(dataset, doc)
        streams.append(tokens)
        for w in sliding_windows(len(tokens), settings.seq_length, settings.stride):
            windows.append(Window(w.begin + offset, w.end + offset, w.scored))
            owners.append(row)
        offset += len(tokens)
    stream = np.concatenate(streams).astype(np.int64) if streams else np.zeros(0, dtype=np.int64)
    # longest first (stable: ties keep document order), so each batch pads to similar lengths
    order = sorted(range(len(windows)), key=lambda i: -(windows[i].end - windows[i].begin))
    rows = np.zeros((len(windows), 3), dtype=np.float64)
    if windows:
        rows[order] = score_windows(model, stream, [windows[i] for i in order], settings.batch_size)
    count = end - begin
    owners = np.asarray(owners, dtype=np.int64)
    nll = np.zeros(count, dtype=np.float64)
    np.add.at(nll, owners, rows[:, 0])  # unbuffered, in window order: a document's windows are summed in order
    tokens = np.bincount(owners, weights=rows[:, 2], minlength=count).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        perplexity = np.where(tokens > 0, np.exp(nll / np.maximum(tokens, 1)), np.nan)
    return {"tokens": tokens, "nll_sum": nll, "perplexity": perplexity}


def summarize(columns: dict[str, np.ndarray]) -> dict:
    """Counts, the corpus perplexity (all documents' NLL over all their targets) and per-document quantiles."""
    tokens, nll, ppl = columns["tokens"], columns["nll_sum"], columns["perplexity"]
    scored = np.isfinite(ppl)
    total_tokens, total_nll = int(tokens.sum()), float(nll.sum())
    summary = {"documents": int(len(ppl)), "scored_documents": int(scored.sum()),
               "unscored_documents": int((~scored).sum()), "scored_tokens": total_tokens,
               "corpus_loss": total_nll / total_tokens if total_tokens else None,
               "corpus_perplexity": math.exp(total_nll / total_tokens) if total_tokens else None}
    if scored.any():
        values = ppl[scored]
        quantiles = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
        summary["document_perplexity"] = {f"q{round(q * 100):02d}": float(np.quantile(values, q)) for q in quantiles}
        summary["document_perplexity"]["mean"] = float(values.mean())
    return summary


def plot_histogram(columns: dict[str, np.ndarray], path, title: str) -> None:
    """A PNG histogram of log10 per-document perplexity with the quartiles marked."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on scoring machines
    import matplotlib.pyplot as plt

    values = columns["perplexity"][np.isfinite(columns["perplexity"])]
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(values):
        logs = np.log10(values)
        ax.hist(logs, bins=min(80, max(10, len(values) // 20)), color="tab:blue", alpha=0.8)
        for q, style in ((0.25, ":"), (0.5, "--"), (0.75, ":")):
            ax.axvline(np.quantile(logs, q), color="black", linestyle=style, linewidth=1,
                       label=f"q{int(q * 100)} = {10 ** np.quantile(logs, q):.3g}")
        ax.legend()
    ax.set_xlabel("log10 perplexity per document")
    ax.set_ylabel("documents")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
