"""Data selection: score every document of an indexed dataset, then keep a subset by score.

* ``scores``: the per-document score-file format (writer, reader, dataset fingerprint, alignment check) that every
  scorer writes and ``tools/select_documents.py`` reads.
"""
from megagpt.selection.scores import (FORMAT, DocumentScores, check_alignment, dataset_fingerprint, dataset_record,
                                      open_dataset, read_scores, write_scores)

__all__ = ["FORMAT", "DocumentScores", "check_alignment", "dataset_fingerprint", "dataset_record", "open_dataset",
           "read_scores", "write_scores"]
