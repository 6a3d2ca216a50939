"""The tokenizer record beside each ``.bin``/``.idx``: which tokenizer made the data, and the ids it holds.

Preprocessing writes ``{prefix}.tokenizer.json`` (``write_record``) next to the dataset::

    {"format": 1, "type": "GPT2BPETokenizer", "kind": "gpt2", "vocab_size": 50257, "eod": 50256,
     "fingerprint": "sha256:…", "max_token_id": 50256}

``fingerprint`` hashes the *contents* of the tokenizer's files (vocab/merges, tokenizer.json, alphabet), so
moved or renamed copies still match and an edited vocabulary does not. Training, evaluation and generation
call ``check_dataset`` (or ``check_data_path`` for a Megatron ``data_path``) before any process group starts: a
dataset whose tokenizer disagrees with the model's vocabulary or the config's tokenizer section is refused,
naming both. Datasets without a record (Megatron-LM, older megagpt) get their largest id scanned once
(``largest_token_id``) and cached beside the index caches.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

RECORD_FORMAT = 1
RECORD_SUFFIX = ".tokenizer.json"
SCAN_SUFFIX = ".max_token_id.json"
_SCAN_CHUNK = 1 << 24  # tokens per chunk of the largest-id scan (bounded memory)


@dataclass(frozen=True)
class TokenizerRecord:
    """What is known about the tokenizer of one dataset. ``max_token_id`` is -1 for an empty dataset."""

    type: str
    kind: str
    vocab_size: int
    eod: int
    fingerprint: str
    max_token_id: int

    def to_dict(self) -> dict:
        return {"format": RECORD_FORMAT, **asdict(self)}


def record_path(prefix: str | os.PathLike) -> str:
    """Where the record of dataset ``prefix`` lives."""
    return f"{os.fspath(prefix)}{RECORD_SUFFIX}"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the tokenizer kind and the contents of its files (in a fixed role order)."""
    from megagpt.data.tokenizers import TOKENIZER_ALIASES

    described = tokenizer.describe()
    digest = hashlib.sha256(TOKENIZER_ALIASES[described["type"]].encode())
    for role in ("vocab_file", "merge_file", "tokenizer_file"):
        path = described.get(role)
        if path is not None:
            digest.update(f"\0{role}\0".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    if described.get("eod_token") is not None:
        digest.update(f"\0eod_token\0{described['eod_token']}".encode())
    return "sha256:" + digest.hexdigest()


def record_for(tokenizer, max_token_id: int) -> TokenizerRecord:
    """The record of data made by ``tokenizer`` whose largest id is ``max_token_id``."""
    from megagpt.data.tokenizers import TOKENIZER_ALIASES

    described = tokenizer.describe()
    return TokenizerRecord(type=described["type"], kind=TOKENIZER_ALIASES[described["type"]],
                           vocab_size=int(tokenizer.vocab_size), eod=int(tokenizer.eod),
                           fingerprint=tokenizer_fingerprint(tokenizer), max_token_id=int(max_token_id))


def _atomic_write_json(path: str, obj: dict) -> None:
    from megagpt.checkpoint_dir import atomic_write_text  # a unique temporary name: ranks may race to write

    atomic_write_text(Path(path), json.dumps(obj, indent=2))


def write_record(prefix: str | os.PathLike, record: TokenizerRecord) -> str:
    """Write ``record`` beside dataset ``prefix`` (atomically); returns its path."""
    path = record_path(prefix)
    _atomic_write_json(path, record.to_dict())
    return path


def read_record(prefix: str | os.PathLike) -> TokenizerRecord | None:
    """The record beside dataset ``prefix``, or None when it has none. ValueError naming the file when it is
    unreadable or lacks a field."""
    path = record_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {RECORD_FORMAT}")
        return TokenizerRecord(type=str(data["type"]), kind=str(data["kind"]), vocab_size=int(data["vocab_size"]),
                               eod=int(data["eod"]), fingerprint=str(data["fingerprint"]),
                               max_token_id=int(data["max_token_id"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: unreadable tokenizer record ({type(err).__name__}: {err}); re-run "
                         "preprocessing, or delete it to have the dataset scanned instead") from None


def merged_record(records: list[TokenizerRecord | None], prefixes: list[str]) -> TokenizerRecord | None:
    """The record of datasets concatenated in order: None when none has one; ValueError naming the two when
    their tokenizers differ (merging them would mix vocabularies) or when only some have a record."""
    if all(r is None for r in records):
        return None
    missing = [p for p, r in zip(prefixes, records) if r is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} have no tokenizer record ({RECORD_SUFFIX}) but "
                         f"{prefixes[records.index(next(r for r in records if r is not None))]} has one: merge "
                         "datasets made by the same preprocessing only")
    first = records[0]
    for prefix, record in zip(prefixes[1:], records[1:]):
        if (record.kind, record.vocab_size, record.eod, record.fingerprint) != (
                first.kind, first.vocab_size, first.eod, first.fingerprint):
            raise ValueError(f"{prefix} was made with {record.type} {record.fingerprint} and {prefixes[0]} with "
                             f"{first.type} {first.fingerprint}: datasets of different tokenizers cannot be merged")
    return TokenizerRecord(**{**asdict(first), "max_token_id": max(r.max_token_id for r in records)})


def _scan_largest_id(prefix: str) -> int:
    from megagpt.data.indexed import IndexedDataset

    tokens = IndexedDataset(prefix)._bin
    largest = -1
    for start in range(0, len(tokens), _SCAN_CHUNK):
        largest = max(largest, int(np.max(tokens[start:start + _SCAN_CHUNK])))
    return largest


def largest_token_id(prefix: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> int:
    """The largest token id in dataset ``prefix``: from its record, else scanned once and cached as
    ``{cache_dir or beside the dataset}/{name}.max_token_id.json`` (keyed by the ``.bin``/``.idx`` sizes and
    mtimes). Concurrent callers (every rank of a launch) take a file lock, so only the first one scans."""
    prefix = os.fspath(prefix)
    record = read_record(prefix)
    if record is not None:
        return record.max_token_id
    from megagpt.data.indexed import data_file_path, index_file_path

    directory = os.fspath(cache_dir) if cache_dir is not None else (os.path.dirname(prefix) or ".")
    cache = os.path.join(directory, os.path.basename(prefix) + SCAN_SUFFIX)
    key = {p: [os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in (data_file_path(prefix), index_file_path(prefix))}
    try:
        os.makedirs(directory, exist_ok=True)
        lock = open(cache + ".lock", "w")
    except OSError as err:  # a read-only data directory: scan every time, and say so
        print(f"note: cannot cache the largest token id of {prefix} in {directory} ({err}); scanning it "
              "(set data.cache_dir to a writable directory to scan once)", flush=True)
        return _scan_largest_id(prefix)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(cache) as f:
                cached = json.load(f)
            if cached.get("files") == key:
                return int(cached["max_token_id"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache yet, or a stale/damaged one: scan again
        largest = _scan_largest_id(prefix)
        _atomic_write_json(cache, {"files": key, "max_token_id": largest})
        return largest


def check_dataset(prefix: str | os.PathLike, vocab_size: int, tokenizer_config=None,
                  cache_dir: str | os.PathLike | None = None) -> None:
    """Refuse dataset ``prefix`` (ValueError naming both sides) when its tokenizer disagrees with a model of
    ``vocab_size`` ids or with ``tokenizer_config`` (a config ``tokenizer`` section; its ``type`` None: not
    compared). Ids inside the padded vocabulary but past ``vocab_size`` are refused too: their rows are
    never trained as real tokens."""
    prefix = os.fspath(prefix)
    record = read_record(prefix)
    if record is not None:
        if record.vocab_size > vocab_size:
            raise ValueError(f"dataset {prefix} was made with {record.type} of {record.vocab_size} tokens "
                             f"({record_path(prefix)}) but model.vocab_size is {vocab_size}: set model.vocab_size="
                             f"{record.vocab_size} or use data made with the model's tokenizer")
        if tokenizer_config is not None and tokenizer_config.type is not None:
            _compare_tokenizer(prefix, record, tokenizer_config)
    largest = record.max_token_id if record is not None else largest_token_id(prefix, cache_dir)
    if largest >= vocab_size:
        source = record_path(prefix) if record is not None else "scanned; no tokenizer record"
        raise ValueError(f"dataset {prefix} holds token id {largest} ({source}) but the model's vocabulary is "
                         f"[0, {vocab_size}) (model.vocab_size={vocab_size}): the data was made with another "
                         "tokenizer; set model.vocab_size to the tokenizer's size or re-run preprocessing")


def _compare_tokenizer(prefix: str, record: TokenizerRecord, tokenizer_config) -> None:
    from megagpt.data.tokenizers import TOKENIZER_ALIASES

    configured = TOKENIZER_ALIASES[tokenizer_config.type]
    if configured != record.kind:
        raise ValueError(f"dataset {prefix} was made with {record.type} ({record_path(prefix)}) but the config's "
                         f"tokenizer.type is {tokenizer_config.type!r}: fix the tokenizer section or the data_path")
    tokenizer = tokenizer_config.build()
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint != record.fingerprint or tokenizer.eod != record.eod:
        raise ValueError(f"dataset {prefix} was made with a {record.type} of fingerprint {record.fingerprint} "
                         f"(eod {record.eod}, {record_path(prefix)}) but the config's tokenizer files "
                         f"{tokenizer_config.files} give {fingerprint} (eod {tokenizer.eod}): they are different "
                         "vocabularies; point the tokenizer section at the files the data was made with")


def check_data_path(data_path, vocab_size: int, tokenizer_config=None,
                    cache_dir: str | os.PathLike | None = None) -> None:
    """``check_dataset`` for every prefix of a Megatron ``data_path`` (``[w1, p1, w2, p2]`` or ``[p]``)."""
    from megagpt.data.blend import parse_data_path

    for prefix in parse_data_path(list(data_path))[1]:
        check_dataset(prefix, vocab_size, tokenizer_config, cache_dir)


__all__ = ["TokenizerRecord", "check_data_path", "check_dataset", "largest_token_id", "merged_record", "read_record", "record_for",
           "record_path", "tokenizer_fingerprint", "write_record"]
