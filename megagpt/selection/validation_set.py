"""The validation set influence is measured on, and the check that it shares a tokenizer with the training set.

The validation tokens come from an indexed split (``evaluation.text.split_tokens``: the split's documents
concatenated, as evaluation reads them) or a UTF-8 text file tokenized with the checkpoint's tokenizer (or the
one given by flags). Refused, naming both sides:

* the training and the validation dataset were written by preprocessing runs whose reports
  (``<output_prefix>_report.json``) name different tokenizers;
* a text file is to be tokenized with a tokenizer other than the one the training data's report names;
* any token id outside the model's (or recorded tokenizer's) vocabulary (``compat.check_tokenizer_fits``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megagpt.evaluation.scoring import _check_tokens
from megagpt.evaluation.text import read_text_file, split_tokens


@dataclass
class ValidationSet:
    tokens: np.ndarray
    record: dict  # what it is, for the manifest and the score file


def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return Path(path).name  # moved since preprocessing: compare by name


def comparable_tokenizer(described: dict | None) -> dict | None:
    """A tokenizer's ``describe()`` with its files replaced by their contents' digests (paths may differ)."""
    if described is None:
        return None
    return {k: _file_digest(v) if k.endswith("_file") and isinstance(v, str) else v for k, v in described.items()}


def dataset_tokenizer(prefix: str | os.PathLike) -> dict | None:
    """The tokenizer the preprocessing report beside ``prefix`` names (None when no report lists the dataset)."""
    prefix = Path(prefix).resolve()
    for report in sorted(prefix.parent.glob("*_report.json")):
        try:
            data = json.loads(report.read_text())
        except (OSError, ValueError):
            continue
        for output in (data.get("outputs") or {}).values():
            if isinstance(output, dict) and output.get("prefix") and Path(output["prefix"]).resolve() == prefix:
                return data.get("tokenizer")
    return None


def check_same_tokenizer(train_prefix: str, other: dict | None, other_name: str) -> None:
    """Refuse when the training data's recorded tokenizer and ``other`` (a ``describe()``) are both known and differ."""
    mine = comparable_tokenizer(dataset_tokenizer(train_prefix))
    theirs = comparable_tokenizer(other)
    if mine is not None and theirs is not None and mine != theirs:
        raise ValueError(f"the validation set {other_name} shares no tokenizer with the training set {train_prefix}: "
                         f"{theirs} vs {mine}; tokenize both with one tokenizer")


def load_validation_set(train_prefix: str, vocab_size: int, data_path: str | None = None, split: str = "969,30,1",
                        split_name: str = "valid", text_file: str | None = None, tokenizer=None) -> ValidationSet:
    """The validation tokens (exactly one of ``data_path`` and ``text_file``), checked against the training set's
    tokenizer and the model's vocabulary."""
    if (data_path is None) == (text_file is None):
        raise ValueError("give the validation set as exactly one of --valid-data-path and --valid-text-file")
    if data_path is not None:
        check_same_tokenizer(train_prefix, dataset_tokenizer(data_path), data_path)
        tokens = np.asarray(split_tokens(data_path, split, split_name), dtype=np.int64)
        record = {"data_path": str(data_path), "split": split, "split_name": split_name}
    else:
        if tokenizer is None:
            raise ValueError(f"--valid-text-file {text_file}: the checkpoint records no tokenizer; give "
                             "--tokenizer-type and its files")
        check_same_tokenizer(train_prefix, tokenizer.describe(), text_file)
        tokens = np.asarray(tokenizer.encode(read_text_file(text_file)), dtype=np.int64)
        record = {"text_file": str(text_file), "tokenizer": tokenizer.describe()}
    _check_tokens(tokens, vocab_size, f"the validation set {data_path or text_file}")
    if len(tokens) < 2:
        raise ValueError(f"the validation set {data_path or text_file} holds {len(tokens)} token(s): nothing to score")
    record["tokens"] = int(len(tokens))
    record["sha256"] = hashlib.sha256(tokens.tobytes()).hexdigest()
    return ValidationSet(tokens, record)


__all__ = ["ValidationSet", "check_same_tokenizer", "comparable_tokenizer", "dataset_tokenizer",
           "load_validation_set"]
