"""Data selection: score every document of an indexed dataset, then keep a subset by score (docs/data_selection.md).

* ``scores``: the per-document score-file format (writer, reader, dataset fingerprint, alignment check) that every
  scorer writes (perplexity here, influence scores next) and ``tools/select_documents.py`` reads;
* ``perplexity``: each document scored on its own, long ones in ``tools/evaluate.py``'s sliding windows;
* ``score_run``: the resumable, data-parallel scoring run (chunks + manifest) behind ``tools/score_documents.py``;
* ``compat``: does a checkpoint's tokenizer fit a dataset;
* ``select``: the rules (low / middle / high bands, range, quantiles, seeded random) and the token budget;
* ``subset``: the chosen documents as a new ``.bin/.idx`` with a manifest and the chosen ids;
* ``pipeline``: the random-vs-filtered experiment (``tools/run_data_selection.py``).
"""
from megagpt.selection.scores import (FORMAT, DocumentScores, check_alignment, dataset_fingerprint, dataset_record,
                                      open_dataset, read_scores, write_scores)

__all__ = ["FORMAT", "DocumentScores", "check_alignment", "dataset_fingerprint", "dataset_record", "open_dataset",
           "read_scores", "write_scores"]
