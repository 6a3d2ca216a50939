"""Per-document score files: one value per document of an indexed dataset, tied to that dataset by a fingerprint.

Everything that ranks documents (perplexity from ``tools/score_documents.py``, influence scores, any other
per-document signal) writes this one format, and ``tools/select_documents.py`` reads it, so a new kind of score
plugs into the selection rules unchanged.

A score file is a NumPy ``.npz`` archive (read with ``allow_pickle=False``: nothing in it can run code) holding

* one or more **columns**: 1-D arrays of length ``num_documents``, row ``i`` belonging to document ``i`` of the
  dataset (its index in ``document_indices``, the order preprocessing wrote); e.g. ``tokens`` (int64),
  ``nll_sum`` and ``perplexity`` (float64). NaN marks a document the scorer could not score (a one-token
  document has no target); selection never picks those by score and reports how many there were;
* ``__meta__``: UTF-8 JSON, ``{"format": FORMAT, "dataset": dataset_record(prefix), "default_column": ...,
  ...}`` plus whatever the scorer records (checkpoint, settings).

``dataset_record`` describes the dataset (prefix, documents, tokens, dtype, fingerprint); ``check_alignment``
refuses a score file whose document count or fingerprint differ from a dataset's, naming both.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megagpt.data.indexed import IndexedDataset, data_file_path, index_file_path

FORMAT = "megagpt.document_scores/1"
META_KEY = "__meta__"
SUFFIX = ".npz"
_FINGERPRINT_BLOCKS = 64  # evenly spaced samples of the .bin ...
_FINGERPRINT_BLOCK_BYTES = 1 << 16  # ... of 64 KiB each


def dataset_fingerprint(prefix: str | os.PathLike) -> str:
    """``sha256:<hex>`` of the whole ``.idx`` (every document's length and position), the ``.bin``'s size, and 64
    evenly spaced 64 KiB blocks of the ``.bin`` (its start and end included).

    It tells one dataset from another (a re-tokenized or re-ordered corpus, another shard) while reading a few MB
    of a multi-GB ``.bin``; it is not a cryptographic digest of every token."""
    digest = hashlib.sha256()
    with open(index_file_path(prefix), "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    bin_path = data_file_path(prefix)
    size = os.path.getsize(bin_path)
    digest.update(size.to_bytes(8, "little"))
    with open(bin_path, "rb") as f:
        if size <= _FINGERPRINT_BLOCKS * _FINGERPRINT_BLOCK_BYTES:
            digest.update(f.read())
        else:
            last = size - _FINGERPRINT_BLOCK_BYTES
            for k in range(_FINGERPRINT_BLOCKS):
                f.seek(last * k // (_FINGERPRINT_BLOCKS - 1))
                digest.update(f.read(_FINGERPRINT_BLOCK_BYTES))
    return "sha256:" + digest.hexdigest()


def dataset_record(prefix: str | os.PathLike, dataset: IndexedDataset | None = None) -> dict:
    """What a score file records about its dataset: prefix, document and token counts, dtype, fingerprint."""
    dataset = dataset if dataset is not None else open_dataset(prefix)
    return {"prefix": os.fspath(prefix), "num_documents": dataset.num_documents, "num_tokens": dataset.num_tokens,
            "dtype": str(dataset.dtype), "fingerprint": dataset_fingerprint(prefix)}


def open_dataset(prefix: str | os.PathLike, flag: str = "--data-path") -> IndexedDataset:
    """``IndexedDataset(prefix)`` with a missing or broken pair reported as ValueError naming the flag."""
    try:
        return IndexedDataset(prefix)
    except FileNotFoundError as err:
        raise ValueError(f"{flag} {prefix}: {err}") from None
    except ValueError as err:
        raise ValueError(f"{flag} {prefix}: {err}") from None


@dataclass
class DocumentScores:
    """The columns and metadata of one score file (``read_scores``), or of one about to be written."""

    columns: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    path: str | None = None  # where it was read from, for messages

    @property
    def num_documents(self) -> int:
        return len(next(iter(self.columns.values())))

    @property
    def dataset(self) -> dict:
        return self.meta.get("dataset") or {}

    def column(self, name: str | None = None) -> np.ndarray:
        """The column ``name`` (default: the file's ``default_column``), float64; ValueError listing the others."""
        name = name or self.meta.get("default_column")
        if name not in self.columns:
            raise ValueError(f"score file {self.path or '(unsaved)'} has no column {name!r}; it has "
                             f"{sorted(self.columns)} (choose one with --score-column)")
        return np.asarray(self.columns[name], dtype=np.float64)


def _check_columns(columns: dict[str, np.ndarray], where: str) -> int:
    if not columns:
        raise ValueError(f"{where}: a score file needs at least one column")
    lengths = {name: np.asarray(values).shape for name, values in columns.items()}
    if any(len(shape) != 1 for shape in lengths.values()) or len({s[0] for s in lengths.values()}) != 1:
        raise ValueError(f"{where}: every column must be 1-D with one row per document, got shapes {lengths}")
    if META_KEY in columns:
        raise ValueError(f"{where}: {META_KEY!r} is reserved for the metadata")
    return next(iter(lengths.values()))[0]


def write_scores(path: str | os.PathLike, scores: DocumentScores, overwrite: bool = False) -> Path:
    """Write ``scores`` (its ``meta`` must hold ``dataset``: ``dataset_record(prefix)``) to ``path``, through a
    temporary name renamed at the end. Refuses an existing file unless ``overwrite``."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"score file {path} must end in {SUFFIX}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"score file {path} already exists; pass --overwrite to replace it")
    rows = _check_columns(scores.columns, str(path))
    dataset = scores.meta.get("dataset")
    if not dataset or "fingerprint" not in dataset or "num_documents" not in dataset:
        raise ValueError(f"{path}: meta['dataset'] must be dataset_record(prefix) of the scored dataset")
    if rows != dataset["num_documents"]:
        raise ValueError(f"{path}: {rows} rows for a dataset of {dataset['num_documents']} documents")
    default = scores.meta.get("default_column") or next(iter(scores.columns))
    if default not in scores.columns:
        raise ValueError(f"{path}: default_column {default!r} is not one of {sorted(scores.columns)}")
    meta = {"format": FORMAT, **scores.meta, "default_column": default}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    arrays = {name: np.ascontiguousarray(values) for name, values in scores.columns.items()}
    arrays[META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_scores(path: str | os.PathLike) -> DocumentScores:
    """The score file at ``path``; ValueError naming it when it is missing or not a megagpt score file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"score file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"score file {path} is not a NumPy .npz archive: {err}") from None
    if META_KEY not in arrays:
        raise ValueError(f"score file {path} has no {META_KEY}: not written by megagpt.selection.write_scores")
    meta = json.loads(arrays.pop(META_KEY).tobytes().decode("utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"score file {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    _check_columns(arrays, str(path))
    return DocumentScores(arrays, meta, str(path))


def check_alignment(scores: DocumentScores, prefix: str | os.PathLike, record: dict | None = None) -> dict:
    """Refuse ``scores`` unless they belong to the dataset ``prefix``: same document count and fingerprint.
    Returns the dataset's record (``record`` if the caller already computed it)."""
    record = record or dataset_record(prefix)
    theirs = scores.dataset
    problems = []
    if scores.num_documents != record["num_documents"]:
        problems.append(f"{scores.num_documents} documents in the scores, {record['num_documents']} in the dataset")
    if theirs.get("fingerprint") != record["fingerprint"]:
        problems.append(f"fingerprint {theirs.get('fingerprint')} (of {theirs.get('prefix')}) in the scores, "
                        f"{record['fingerprint']} for the dataset")
    if problems:
        raise ValueError(f"score file {scores.path} does not belong to dataset {os.fspath(prefix)}: "
                         + "; ".join(problems) + ". Score this dataset with tools/score_documents.py")
    return record


__all__ = ["FORMAT", "DocumentScores", "check_alignment", "dataset_fingerprint", "dataset_record", "open_dataset",
           "read_scores", "write_scores"]
