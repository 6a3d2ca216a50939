"""Perplexity-style tasks over one long token stream: a raw text file, or a split of an indexed dataset.

text: the file is read as UTF-8 and tokenized whole (no ftfy, no EOD added); bits per byte and per character
are the summed NLL in bits divided by the ORIGINAL file's size in bytes and its length in characters (so they
compare across tokenizers; the first token, never a target, is still counted in the denominators).
data: the documents of one split (``split_document_ranges``, the rule training uses), concatenated in order with
the EOD tokens preprocessing wrote, scored as one stream (a document's first token is predicted from the
previous document, as in training; only the stream's token 0 is never a target).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from megagpt.evaluation.distributed import Shard
from megagpt.evaluation.scoring import score_windows, sliding_windows, stream_metrics

LN2 = math.log(2.0)


def read_text_file(path: str | Path) -> str:
    """The file's text; ValueError naming the file when it is missing or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--text-file {path} does not exist")
    try:
        return path.read_bytes().decode("utf-8-sig")  # a leading BOM is a marker, not data
    except UnicodeDecodeError as err:
        raise ValueError(f"--text-file {path} is not UTF-8 (byte {err.start}: {err.reason})") from None


def _windows(num_tokens: int, seq_length: int, stride: int, max_windows: int | None):
    windows = sliding_windows(num_tokens, seq_length, stride)
    truncated = max_windows is not None and len(windows) > max_windows
    return (windows[:max_windows] if truncated else windows), truncated


def evaluate_text(model, tokenizer, path: str | Path, seq_length: int, stride: int, batch_size: int,
                  shard: Shard = Shard(), max_windows: int | None = None, progress: bool = False) -> dict:
    """The ``text:<file name>`` result: tokens, loss, perplexity, accuracy, bytes, chars, bits per byte/char.

    With ``max_windows`` cutting the file short, bytes and chars are those of the covered prefix (the decoded
    tokens up to the last target), or null when the decoded prefix is not exactly the start of the file."""
    text = read_text_file(path)
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    windows, truncated = _windows(len(tokens), seq_length, stride, max_windows)
    rows = score_windows(model, tokens, windows, batch_size, shard, progress, desc=f"text {Path(path).name}")
    result = {"task": f"text:{Path(path).name}", "kind": "text", "seq_length": seq_length, "stride": stride,
              "windows": len(windows), "truncated": truncated, **stream_metrics(rows, f"--text-file {path}")}
    covered = text
    if truncated:
        covered = tokenizer.decode(tokens[:windows[-1].end + 1])
        covered = covered if text.startswith(covered) else None
    if covered is None:
        result.update(bytes=None, chars=None, bits_per_byte=None, bits_per_char=None)
    else:
        n_bytes, n_chars = len(covered.encode("utf-8")), len(covered)
        result.update(bytes=n_bytes, chars=n_chars, bits_per_byte=result["nll_sum"] / LN2 / n_bytes,
                      bits_per_char=result["nll_sum"] / LN2 / n_chars)
    return result


def split_tokens(prefix: str | Path, split: str, split_name: str) -> np.ndarray:
    """The tokens of the ``split_name`` documents of the indexed dataset ``prefix``, concatenated in order."""
    from megagpt.data.gpt_dataset import SPLIT_NAMES, split_document_ranges
    from megagpt.data.indexed import IndexedDataset

    if split_name not in SPLIT_NAMES:
        raise ValueError(f"--split-name {split_name!r} is not one of {list(SPLIT_NAMES)}")
    try:
        data = IndexedDataset(prefix)
    except FileNotFoundError as err:
        raise ValueError(f"--data-path {prefix}: {err}") from None
    begin, end = split_document_ranges(split, data.num_documents)[SPLIT_NAMES.index(split_name)]
    if begin == end:
        raise ValueError(f"--data-path {prefix}: the {split_name} split of {split!r} holds no documents "
                         f"(of {data.num_documents}); choose another --split or --split-name")
    first_seq, last_seq = int(data.document_indices[begin]), int(data.document_indices[end])
    parts = [data.get(i) for i in range(first_seq, last_seq)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=data.dtype)


def evaluate_data(model, prefix: str | Path, split: str, split_name: str, seq_length: int, stride: int,
                  batch_size: int, shard: Shard = Shard(), max_windows: int | None = None,
                  progress: bool = False) -> dict:
    """The ``data:<prefix name>:<split name>`` result: tokens, loss, perplexity, accuracy."""
    tokens = split_tokens(prefix, split, split_name)
    windows, truncated = _windows(len(tokens), seq_length, stride, max_windows)
    name = f"data:{Path(prefix).name}:{split_name}"
    rows = score_windows(model, tokens, windows, batch_size, shard, progress, desc=name)
    return {"task": name, "kind": "data", "split": split, "seq_length": seq_length, "stride": stride,
            "windows": len(windows), "truncated": truncated, **stream_metrics(rows, f"--data-path {prefix}")}
