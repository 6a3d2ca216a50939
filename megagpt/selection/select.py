"""Selection rules: which documents of a dataset to keep, from a per-document score (or at random, the control).

Rules (``SelectionRule.kind``):

* ``low`` / ``middle`` / ``high``: the band of the scored documents ranked by score (ties: lower document id
  first) holding the lowest / central / highest ``fraction`` of them (``round(fraction * n)``, at least 1).
  Without ``fraction`` the band is all scored documents, taken lowest first / from the median outwards / highest
  first until the token budget is reached;
* ``range``: documents with ``min_score <= score <= max_score`` (either bound may be open);
* ``quantiles``: documents ranked between the ``lo`` and ``hi`` quantiles (``round(lo * n)`` to ``round(hi * n)``);
* ``random``: a seeded random ``fraction`` of all documents (no scores needed).

Documents without a score (NaN: e.g. too short to have a target) are never chosen by a score rule; they are
counted in the result. ``token_budget``: take documents in the rule's priority order (low: ascending score, high:
descending, middle: nearest the median first, range / quantiles / random: a seeded random order) while the total
stays within the budget, stopping at the first one that does not fit; a rule whose documents hold fewer tokens
than the budget is an error (a comparison needs every variant at the same budget). The chosen ids are returned in
ascending order: the subset keeps the source's document order.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

RULES = ("low", "middle", "high", "range", "quantiles", "random")


@dataclass(frozen=True)
class SelectionRule:
    """A rule and its parameters (checked on construction)."""

    kind: str
    fraction: float | None = None
    min_score: float | None = None
    max_score: float | None = None
    quantiles: tuple[float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ValueError(f"rule {self.kind!r} is not one of {list(RULES)}")
        if self.fraction is not None and not (0 < self.fraction <= 1):
            raise ValueError(f"--fraction {self.fraction} is outside (0, 1]: give the share of documents to keep")
        if self.fraction is not None and self.kind in ("range", "quantiles"):
            raise ValueError(f"--fraction does not apply to the {self.kind} rule (it sets its own band)")
        if self.kind == "range":
            if self.min_score is None and self.max_score is None:
                raise ValueError("the range rule needs --min-score and/or --max-score")
            if None not in (self.min_score, self.max_score) and self.min_score > self.max_score:
                raise ValueError(f"--min-score {self.min_score} is above --max-score {self.max_score}")
        elif self.min_score is not None or self.max_score is not None:
            raise ValueError(f"--min-score / --max-score belong to the range rule, not {self.kind}")
        if self.kind == "quantiles":
            if self.quantiles is None or len(self.quantiles) != 2:
                raise ValueError("the quantiles rule needs --quantiles LO,HI")
            lo, hi = self.quantiles
            if not 0 <= lo < hi <= 1:
                raise ValueError(f"--quantiles {lo},{hi}: need 0 <= LO < HI <= 1")
        elif self.quantiles is not None:
            raise ValueError(f"--quantiles belongs to the quantiles rule, not {self.kind}")

    @property
    def needs_scores(self) -> bool:
        return self.kind != "random"

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Selection:
    """The chosen document ids (ascending) and the counts a manifest reports."""

    ids: np.ndarray
    tokens: int
    candidates: int  # documents the rule could choose from (its band), before the budget
    candidate_tokens: int
    unscored: int  # documents without a score (never chosen by a score rule)


def _band_size(fraction: float | None, n: int) -> int:
    return n if fraction is None else max(1, int(round(fraction * n)))


def priority_order(rule: SelectionRule, scores: np.ndarray | None, num_documents: int) -> tuple[np.ndarray, int]:
    """The candidate document ids in the order the budget takes them, and how many documents had no score."""
    rng = np.random.default_rng(rule.seed)
    if rule.kind == "random":
        order = rng.permutation(num_documents)
        return order[:_band_size(rule.fraction, num_documents)], 0
    scores = np.asarray(scores, dtype=np.float64)
    scored = np.flatnonzero(np.isfinite(scores))
    unscored = num_documents - len(scored)
    ascending = scored[np.lexsort((scored, scores[scored]))]  # by score, ties by id
    n = len(ascending)
    if rule.kind == "low":
        return ascending[:_band_size(rule.fraction, n)], unscored
    if rule.kind == "high":
        descending = scored[np.lexsort((scored, -scores[scored]))]
        return descending[:_band_size(rule.fraction, n)], unscored
    if rule.kind == "middle":
        k = _band_size(rule.fraction, n)
        band = ascending[(n - k) // 2:(n - k) // 2 + k]
        center = (len(band) - 1) / 2
        outwards = sorted(range(len(band)), key=lambda i: (abs(i - center), i))
        return band[outwards], unscored
    if rule.kind == "quantiles":
        lo, hi = rule.quantiles
        band = ascending[int(round(lo * n)):int(round(hi * n))]
    else:  # range
        values = scores[ascending]
        keep = np.ones(n, dtype=bool)
        if rule.min_score is not None:
            keep &= values >= rule.min_score
        if rule.max_score is not None:
            keep &= values <= rule.max_score
        band = ascending[keep]
    return band[rng.permutation(len(band))], unscored


def select(rule: SelectionRule, scores: np.ndarray | None, lengths: np.ndarray,
           token_budget: int | None = None) -> Selection:
    """Apply ``rule`` (and the budget) to ``scores`` of documents with ``lengths`` tokens; ValueError when
    nothing is selected or the budget cannot be met."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if rule.needs_scores and scores is None:
        raise ValueError(f"the {rule.kind} rule needs a score file (--scores)")
    if scores is not None and len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores for {len(lengths)} documents")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"--token-budget must be >= 1, got {token_budget}")
    order, unscored = priority_order(rule, scores, len(lengths))
    candidate_tokens = int(lengths[order].sum())
    if len(order) == 0:
        raise ValueError(f"the rule {rule.describe()} selects no documents (of {len(lengths)}, {unscored} without a "
                         "score): widen it")
    chosen = order
    if token_budget is not None:
        if candidate_tokens < token_budget:
            raise ValueError(f"the rule {rule.describe()} selects {len(order)} documents holding {candidate_tokens:,} "
                             f"tokens, fewer than --token-budget {token_budget:,}: lower the budget or widen the rule")
        taken = int(np.searchsorted(np.cumsum(lengths[order]), token_budget, side="right"))
        if taken == 0:
            raise ValueError(f"the first document the rule takes holds {int(lengths[order[0]]):,} tokens, more than "
                             f"--token-budget {token_budget:,}: the rule selects nothing within the budget")
        chosen = order[:taken]
    ids = np.sort(chosen).astype(np.int64)
    return Selection(ids, int(lengths[ids].sum()), len(order), candidate_tokens, unscored)


def score_stats(values: np.ndarray) -> dict | None:
    """min / median / mean / max of the finite ``values`` (None if there are none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    stats = {"min": float(values.min()), "median": float(np.median(values)), "mean": float(values.mean()),
             "max": float(values.max())}
    return {k: (v if math.isfinite(v) else None) for k, v in stats.items()}
