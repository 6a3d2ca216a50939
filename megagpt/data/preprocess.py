"""Corpus preprocessing: read → ftfy-clean → tokenize → Megatron ``MMIDIDX`` datasets, one per JSON key.

The main process reads and decompresses inputs and cuts them into work units of whole records; worker processes
parse, clean and tokenize; results come back in submission order, so the output is the same for every worker
count. Bad records are counted by reason (with the first ``file:line`` of each) and never stop the run, unless
``strict``; nothing is written under a final name until the whole run has succeeded.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from megagpt.data.cleaning import clean_text
from megagpt.data.indexed import IndexedDatasetWriter, best_dtype, dataset_exists
from megagpt.data.sources import WorkUnit, count_records, find_sources, iter_units
from megagpt.data.tokenizer_record import merged_record, read_record, record_for, record_path, write_record

RECORD_REASONS = ("blank_line", "invalid_utf8", "invalid_json", "not_an_object")
KEY_REASONS = ("missing_key", "non_string", "empty")


@dataclass
class PreprocessOptions:
    """Everything one preprocessing run needs (tools/preprocess_data.py maps its flags onto this)."""
    inputs: list[str]
    output_prefix: str
    tokenizer: object
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    ftfy: bool = True
    workers: int = 1
    strict: bool = False
    overwrite: bool = False
    num_shards: int = 1
    shard_index: int = 0
    txt_separator: str | None = None
    unit_bytes: int = 1 << 20  # ~1 MB units keep both workers busy to the end of a file
    progress: bool = True
    log_interval: int = 10000

    def output_prefix_for(self, key: str) -> str:
        return f"{self.output_prefix}_{key}_document"

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("--input: give at least one file, directory or glob")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"--json-keys must name distinct keys, got {self.json_keys}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"--shard-index must be in [0, --num-shards={self.num_shards}), got {self.shard_index}")
        if self.unit_bytes < 1:
            raise ValueError("unit_bytes must be positive")


class SkipTally:
    """Counts of skipped records/documents by reason, each with the first place it happened."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, reason: str, where: str, count: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + count
        self.first.setdefault(reason, where)

    def merge(self, other: "SkipTally") -> None:
        for reason, n in other.counts.items():
            self.add(reason, other.first[reason], n)

    def as_dict(self) -> dict:
        return {r: {"count": self.counts[r], "first": self.first[r]} for r in sorted(self.counts)}


@dataclass
class UnitResult:
    tokens: dict[str, np.ndarray]  # per key: the unit's documents concatenated
    lengths: dict[str, np.ndarray]  # per key: tokens per document
    text_bytes: dict[str, int]
    skips: SkipTally
    key_skips: dict[str, SkipTally]
    num_records: int
    num_bytes: int


class UnitProcessor:
    """Parse, clean and tokenize one work unit. Runs in worker processes (pickled once) or inline."""

    def __init__(self, tokenizer, keys: list[str], append_eod: bool, ftfy: bool, dtype: np.dtype):
        self.tokenizer, self.keys, self.append_eod, self.ftfy, self.dtype = tokenizer, keys, append_eod, ftfy, dtype

    def __call__(self, unit: WorkUnit) -> UnitResult:
        skips = SkipTally()
        key_skips = {k: SkipTally() for k in self.keys}
        pieces: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        lengths: dict[str, list[int]] = {k: [] for k in self.keys}
        text_bytes = dict.fromkeys(self.keys, 0)
        eod = np.array([self.tokenizer.eod], dtype=self.dtype)
        for line, doc in unit_documents(unit, skips):
            where = f"{unit.path}:{line}"
            for key in self.keys:
                text = document_text(doc, key, where, key_skips[key], self.ftfy)
                if text is None:
                    continue
                ids = self.tokenizer.encode(text)
                pieces[key].append(ids.astype(self.dtype, copy=False))
                if self.append_eod:
                    pieces[key].append(eod)
                lengths[key].append(len(ids) + self.append_eod)
                text_bytes[key] += len(text.encode("utf-8", errors="surrogatepass"))
        return UnitResult(
            tokens={k: np.concatenate(p) if p else np.zeros(0, self.dtype) for k, p in pieces.items()},
            lengths={k: np.asarray(v, dtype=np.int64) for k, v in lengths.items()},
            text_bytes=text_bytes, skips=skips, key_skips=key_skips,
            num_records=unit.num_records, num_bytes=unit.num_bytes)

def unit_documents(unit: WorkUnit, skips: SkipTally):
    """``(line, record dict)`` for each usable record of a unit; unusable records are counted in ``skips``."""
    if unit.format != "jsonl":
        yield from unit.payload
        return
    lines = unit.payload.split(b"\n")
    for i in range(unit.num_records):
        raw, line = lines[i], unit.first_line + i
        where = f"{unit.path}:{line}"
        if not raw.strip():
            skips.add("blank_line", where)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skips.add("invalid_utf8", f"{where} (byte {e.start})")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            skips.add("invalid_json", f"{where} ({e.msg}, column {e.colno})")
            continue
        if not isinstance(obj, dict):
            skips.add("not_an_object", f"{where} ({type(obj).__name__})")
            continue
        yield line, obj


def document_text(doc: dict, key: str, where: str, tally: SkipTally, ftfy: bool) -> str | None:
    """The cleaned text under ``key``, or None after counting in ``tally`` why there is none."""
    if key not in doc:
        tally.add("missing_key", where)
        return None
    value = doc[key]
    if isinstance(value, bytes):  # raw text-file content: decoded here, in the worker
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            tally.add("invalid_utf8", f"{where} (byte {e.start})")
            return None
    if not isinstance(value, str):
        tally.add("non_string", f"{where} ({type(value).__name__})")
        return None
    text = clean_text(value) if ftfy else value
    if not text.strip():
        tally.add("empty", where)
        return None
    return text


_worker_processor: UnitProcessor | None = None


def _init_worker(processor: UnitProcessor) -> None:
    global _worker_processor
    _worker_processor = processor


def _run_in_worker(unit: WorkUnit) -> UnitResult:
    return _worker_processor(unit)


def _ordered_results(units, processor: UnitProcessor, workers: int):
    """Process units in order with at most a few in flight (``Pool.imap`` would read the whole corpus ahead)."""
    if workers == 1:
        for unit in units:
            yield processor(unit)
        return
    with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(processor,)) as pool:
        pending: deque = deque()
        for unit in units:
            pending.append(pool.apply_async(_run_in_worker, (unit,)))
            if len(pending) >= 2 * workers + 1:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _shard_units(opts: PreprocessOptions, sources, separator: bytes | None):
    """Work units of this shard's contiguous record range over all sources."""
    if opts.num_shards == 1:
        for src in sources:
            yield from iter_units(src, opts.json_keys, txt_separator=separator, unit_bytes=opts.unit_bytes)
        return
    counts = [count_records(s, separator) for s in sources]
    total = sum(counts)
    lo, hi = total * opts.shard_index // opts.num_shards, total * (opts.shard_index + 1) // opts.num_shards
    start = 0
    for src, n in zip(sources, counts):
        a, b = max(lo, start) - start, min(hi, start + n) - start
        if a < b:
            yield from iter_units(src, opts.json_keys, skip=a, take=b - a, txt_separator=separator,
                                  unit_bytes=opts.unit_bytes)
        start += n


def preprocess(opts: PreprocessOptions) -> dict:
    """Run preprocessing; return the report (also saved as ``{output_prefix}_report.json``)."""
    opts.validate()
    sources = find_sources(opts.inputs)
    if any(s.format == "txt" for s in sources) and opts.json_keys != ["text"]:
        raise ValueError("text (.txt) inputs write the 'text' dataset; --json-keys applies to jsonl/parquet only")
    prefixes = {k: opts.output_prefix_for(k) for k in opts.json_keys}
    report_path = f"{opts.output_prefix}_report.json"
    existing = [p for p in prefixes.values() if dataset_exists(p)]
    if existing and not opts.overwrite:
        raise FileExistsError(f"output dataset(s) already exist: {', '.join(existing)}; pass --overwrite to "
                              f"replace them")
    separator = None
    if opts.txt_separator is not None:
        if not opts.txt_separator:
            raise ValueError("--txt-separator must not be empty")
        separator = opts.txt_separator.encode("utf-8")

    dtype = best_dtype(opts.tokenizer.vocab_size)
    processor = UnitProcessor(opts.tokenizer, opts.json_keys, opts.append_eod, opts.ftfy, dtype)
    writers = {k: IndexedDatasetWriter(p, dtype, overwrite=opts.overwrite) for k, p in prefixes.items()}
    skips, key_skips = SkipTally(), {k: SkipTally() for k in opts.json_keys}
    text_bytes = dict.fromkeys(opts.json_keys, 0)
    max_ids = dict.fromkeys(opts.json_keys, -1)  # recorded beside each dataset (megagpt/data/tokenizer_record.py)
    records = in_bytes = docs = tokens = 0
    next_log = opts.log_interval
    started = time.perf_counter()
    bar = _progress_bar(opts)
    try:
        for res in _ordered_results(_shard_units(opts, sources, separator), processor, opts.workers):
            for k, w in writers.items():
                w.add_documents(res.tokens[k], res.lengths[k])
                if res.tokens[k].size:
                    max_ids[k] = max(max_ids[k], int(res.tokens[k].max()))
                text_bytes[k] += res.text_bytes[k]
                key_skips[k].merge(res.key_skips[k])
            skips.merge(res.skips)
            if opts.strict:
                _raise_on_skip(skips, key_skips)
            new_docs = sum(len(v) for v in res.lengths.values())
            docs += new_docs
            tokens += sum(v.size for v in res.tokens.values())
            records += res.num_records
            in_bytes += res.num_bytes
            elapsed = max(time.perf_counter() - started, 1e-9)
            rates = f"{docs / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tok/s"
            if bar is not None:
                bar.set_postfix_str(rates, refresh=False)
                bar.update(res.num_bytes)
            elif opts.log_interval and docs >= next_log:  # no bar (--no-progress): a log line every N documents
                print(f"processed {docs:,} documents, {in_bytes / 1e6:,.1f} MB: {in_bytes / 1e6 / elapsed:.2f} "
                      f"MB/s, {rates}", file=sys.stderr, flush=True)
                next_log = (docs // opts.log_interval + 1) * opts.log_interval
        empty = [k for k, w in writers.items() if w.num_documents == 0]
        if empty:
            raise RuntimeError(f"no documents were written for key(s) {empty} (skipped: "
                               f"{json.dumps(skips.as_dict() | {k: key_skips[k].as_dict() for k in empty})}); "
                               f"check --input and --json-keys")
        for k, w in writers.items():
            _remove_stale_record(w.prefix)
            w.finalize()
            write_record(prefixes[k], record_for(opts.tokenizer, max_ids[k]))
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    report = {
        "inputs": [s.path for s in sources],
        "shard": {"index": opts.shard_index, "count": opts.num_shards},
        "tokenizer": opts.tokenizer.describe(),
        "dtype": str(dtype), "append_eod": opts.append_eod, "ftfy": opts.ftfy, "workers": opts.workers,
        "records_read": records, "input_bytes": in_bytes,
        "documents_written": docs, "tokens": tokens,
        "skipped": skips.as_dict(),
        "outputs": {k: {"prefix": prefixes[k], "documents": writers[k].num_documents,
                        "tokens": writers[k].num_tokens, "text_bytes": text_bytes[k],
                        "skipped": key_skips[k].as_dict()} for k in opts.json_keys},
        "seconds": round(seconds, 3),
        "mb_per_s": round(in_bytes / 1e6 / max(seconds, 1e-9), 3),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
    }
    tmp = report_path + ".partial"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, report_path)
    report["report_path"] = report_path
    return report


def _raise_on_skip(skips: SkipTally, key_skips: dict[str, SkipTally]) -> None:
    for tally, label in [(skips, "record")] + [(t, f"key {k!r}") for k, t in key_skips.items()]:
        if tally.counts:
            reason = next(iter(tally.counts))
            raise ValueError(f"--strict: {label} skipped ({reason}) at {tally.first[reason]}; fix the input or "
                             f"drop --strict to count and skip such records")


def _remove_stale_record(prefix: str) -> None:
    """An overwritten dataset's old tokenizer record must not describe the new data, even for a moment."""
    if os.path.exists(record_path(prefix)):
        os.remove(record_path(prefix))


def _progress_bar(opts: PreprocessOptions):
    if not opts.progress:
        return None
    from tqdm import tqdm
    return tqdm(unit="B", unit_scale=True, unit_divisor=1000, desc="preprocess", mininterval=1.0,
                dynamic_ncols=True)


def merge_datasets(prefixes: list[str], output_prefix: str, overwrite: bool = False) -> dict:
    """Concatenate indexed datasets in the given order (e.g. the shards of a multi-node run) into one."""
    from megagpt.data.indexed import IndexedDataset
    if not prefixes:
        raise ValueError("merge_datasets: no input datasets")
    datasets = [IndexedDataset(p) for p in prefixes]
    dtypes = {d.dtype for d in datasets}
    if len(dtypes) != 1:
        raise ValueError(f"cannot merge datasets of different dtypes: "
                         f"{', '.join(f'{d.path_prefix} ({d.dtype})' for d in datasets)}")
    record = merged_record([read_record(p) for p in prefixes], prefixes)
    with IndexedDatasetWriter(output_prefix, datasets[0].dtype, overwrite=overwrite) as w:
        _remove_stale_record(output_prefix)
        for d in datasets:
            w.add_dataset(d)
    if record is not None:
        write_record(output_prefix, record)
    return {"output_prefix": output_prefix, "inputs": prefixes, "documents": w.num_documents,
            "tokens": w.num_tokens}
