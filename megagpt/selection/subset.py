"""A selected subset as a new indexed dataset, its manifest and its chosen document ids.

``{prefix}.bin/.idx`` hold exactly the chosen documents, in the source's order, one sequence per document: byte for
byte what preprocessing exactly those documents writes. ``{prefix}.selection.json`` (the manifest: source dataset,
score file, rule, counts, tokens) and ``{prefix}.doc_ids.npy`` (the chosen source document ids, int64, ascending)
are moved into place first and the ``.idx`` last, so a subset whose ``.idx`` exists is complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from megagpt.data import tokenizer_record
from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter
from megagpt.selection.perplexity import document_tokens

MANIFEST_SUFFIX = ".selection.json"
IDS_SUFFIX = ".doc_ids.npy"
_COPY_TOKENS = 1 << 24  # documents are copied in groups of about 16 Mi tokens


def subset_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """(manifest, chosen ids) beside the subset ``prefix``."""
    prefix = os.fspath(prefix)
    return Path(prefix + MANIFEST_SUFFIX), Path(prefix + IDS_SUFFIX)


def check_subset_free(prefix: str | os.PathLike, overwrite: bool) -> None:
    """Refuse when any file of the subset exists, unless ``overwrite``."""
    taken = [p for p in (f"{os.fspath(prefix)}.bin", f"{os.fspath(prefix)}.idx", *map(str, subset_paths(prefix)))
             if os.path.exists(p)]
    if taken and not overwrite:
        raise ValueError(f"--output-prefix {prefix}: {taken} already exist; pass --overwrite to replace them")


def write_subset(source: IndexedDataset, ids: np.ndarray, prefix: str | os.PathLike, manifest: dict,
                 overwrite: bool = False) -> dict:
    """Write the documents ``ids`` (ascending) of ``source`` to ``prefix`` with the manifest and the ids;
    returns the manifest with the output's document and token counts added."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= source.num_documents):
        raise ValueError("document ids must be ascending, distinct and inside the source dataset")
    check_subset_free(prefix, overwrite)
    manifest_path, ids_path = subset_paths(prefix)
    with IndexedDatasetWriter(prefix, dtype=source.dtype, overwrite=overwrite) as out:
        group, group_tokens, largest = [], 0, -1
        for doc in ids:
            tokens = document_tokens(source, int(doc))
            group.append(tokens)
            group_tokens += len(tokens)
            largest = max(largest, int(tokens.max())) if len(tokens) else largest
            if group_tokens >= _COPY_TOKENS:
                out.add_documents(np.concatenate(group), np.array([len(t) for t in group]))
                group, group_tokens = [], 0
        if group:
            out.add_documents(np.concatenate(group), np.array([len(t) for t in group]))
        manifest = {**manifest, "output": {"prefix": os.fspath(prefix), "documents": out.num_documents,
                                           "tokens": out.num_tokens, "ids_file": str(ids_path)}}
        tmp_ids, tmp_manifest = ids_path.with_name(ids_path.name + ".partial"), manifest_path.with_name(
            manifest_path.name + ".partial")
        with open(tmp_ids, "wb") as f:
            np.save(f, ids)
        tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp_ids, ids_path)
        os.replace(tmp_manifest, manifest_path)
        record = tokenizer_record.read_record(source.path_prefix)
        if record is not None:  # the subset is the source's tokenizer's data, as preprocessing would record it
            tokenizer_record.write_record(prefix, dataclasses.replace(record, max_token_id=largest))
    # leaving the with-block finalises: .bin, then .idx last
    return manifest


def read_chosen_ids(prefix: str | os.PathLike) -> np.ndarray:
    """The source document ids of the subset ``prefix``."""
    return np.load(subset_paths(prefix)[1], allow_pickle=False)
