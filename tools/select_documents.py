#!/usr/bin/env python
"""Keep a subset of an indexed dataset by per-document score, or at random (the control), as a new dataset.

    python tools/select_documents.py --data-path data/c4_text_document --scores c4.ppl.npz \\
        --keep middle --fraction 0.5 --token-budget 100000000 --output-prefix data/c4_middle
    python tools/select_documents.py --data-path data/c4_text_document --random --seed 1 \\
        --token-budget 100000000 --output-prefix data/c4_random

Rules (one of): ``--keep low|middle|high`` (``--fraction`` of the scored documents, or all of them in that order
with ``--token-budget``), ``--min-score`` and/or ``--max-score``, ``--quantiles LO,HI``, ``--random``. ``--scores``: any
megagpt score file of this dataset (tools/score_documents.py's perplexity, influence scores, ...);
``--score-column`` picks its column. Writes ``PREFIX.bin/.idx`` (byte-identical to preprocessing the chosen
documents in order), ``PREFIX.selection.json`` (the manifest) and ``PREFIX.doc_ids.npy`` (the chosen ids).
Definitions: megagpt/selection/select.py and docs/data_selection.md.
"""
from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__":  # run from a checkout without installing: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.selection.select import SelectionRule  # noqa: E402


def _quantiles(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two quantiles LO,HI, e.g. 0.25,0.75") from None
    return lo, hi


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="source indexed dataset prefix (.bin/.idx)")
    p.add_argument("--scores", help="per-document score file of this dataset (.npz)")
    p.add_argument("--score-column", help="column of the score file (default: the file's own, e.g. perplexity)")
    p.add_argument("--output-prefix", required=True, help="prefix of the new dataset")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--keep", choices=("low", "middle", "high"), help="the band of scores to keep")
    rule.add_argument("--quantiles", type=_quantiles, help="keep documents ranked between quantiles LO,HI")
    rule.add_argument("--random", action="store_true", help="a seeded random selection (the control)")
    p.add_argument("--fraction", type=float, help="share of the documents in the band, in (0, 1]")
    p.add_argument("--min-score", type=float, help="keep documents scoring at least this (the range rule)")
    p.add_argument("--max-score", type=float, help="keep documents scoring at most this (the range rule)")
    p.add_argument("--token-budget", type=int, help="keep documents in the rule's order up to this many tokens")
    p.add_argument("--seed", type=int, default=0, help="random rule, and the order within a range / quantiles")
    p.add_argument("--overwrite", action="store_true", help="replace an existing subset")
    return p.parse_args(argv)


def rule_from_args(args) -> SelectionRule:
    bounds = args.min_score is not None or args.max_score is not None
    if not (args.keep or args.quantiles or args.random or bounds):
        raise ValueError("give a rule: --keep low|middle|high, --quantiles LO,HI, --min-score/--max-score or --random")
    kind = args.keep or ("quantiles" if args.quantiles else "random" if args.random else "range")
    return SelectionRule(kind, args.fraction, args.min_score, args.max_score, args.quantiles, args.seed)


def select_documents(argv=None) -> dict:
    """Run the command line; returns the manifest. Bad input: ValueError."""
    from megagpt.selection.perplexity import document_lengths
    from megagpt.selection.scores import check_alignment, dataset_record, open_dataset, read_scores
    from megagpt.selection.select import score_stats, select
    from megagpt.selection.subset import check_subset_free, write_subset

    args = parse_args(argv)
    rule = rule_from_args(args)
    check_subset_free(args.output_prefix, args.overwrite)
    source = open_dataset(args.data_path)
    record = dataset_record(args.data_path, source)
    scores, column, values = None, None, None
    if args.scores:
        scores = read_scores(args.scores)
        check_alignment(scores, args.data_path, record)
        column = args.score_column or scores.meta.get("default_column")
        values = scores.column(column)
    elif rule.needs_scores:
        raise ValueError(f"--{'keep' if args.keep else rule.kind} needs --scores (a score file of {args.data_path})")
    lengths = document_lengths(source)
    chosen = select(rule, values, lengths, args.token_budget)
    manifest = {
        "source": record,
        "scores": None if scores is None else {"path": args.scores, "column": column, "kind": scores.meta.get("kind"),
                                               "checkpoint": scores.meta.get("checkpoint")},
        "rule": rule.describe(), "token_budget": args.token_budget,
        "counts": {"source_documents": source.num_documents, "source_tokens": source.num_tokens,
                   "unscored_documents": chosen.unscored, "candidate_documents": chosen.candidates,
                   "candidate_tokens": chosen.candidate_tokens, "chosen_documents": int(len(chosen.ids)),
                   "chosen_tokens": chosen.tokens},
        "chosen_scores": None if values is None else score_stats(values[chosen.ids]),
    }
    manifest = write_subset(source, chosen.ids, args.output_prefix, manifest, args.overwrite)
    print(f"kept {len(chosen.ids):,} of {source.num_documents:,} documents ({chosen.tokens:,} of "
          f"{source.num_tokens:,} tokens) by {rule.describe()}"
          + (f" within --token-budget {args.token_budget:,}" if args.token_budget else "")
          + f"\nwrote {args.output_prefix}.bin/.idx, .selection.json and .doc_ids.npy", flush=True)
    return manifest


def main(argv=None) -> int:
    """``select_documents`` with input errors printed as one line (exit status 1) instead of a traceback."""
    try:
        select_documents(argv)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
