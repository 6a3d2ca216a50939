"""Corpus inputs: finding files, opening compressed streams, and cutting them into work units of whole records.

A *record* is one line of a jsonl file, one document of a text file (the whole file, or one piece between
separators), or one row of a parquet file. Records are numbered in input order; ``--num-shards/--shard-index``
take contiguous record ranges, so shards concatenated in order equal a single run.

A work unit is what one worker process handles at a time (a few MB), carrying the file name and first line
so that every skipped record can be reported as ``file:line``.
"""
from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import dataclass
from typing import Iterator

SUFFIXES = {  # suffix -> (format, compression)
    ".jsonl": ("jsonl", None), ".json": ("jsonl", None), ".jsonl.gz": ("jsonl", "gz"), ".json.gz": ("jsonl", "gz"),
    ".jsonl.zst": ("jsonl", "zst"), ".json.zst": ("jsonl", "zst"), ".txt": ("txt", None), ".txt.gz": ("txt", "gz"),
    ".txt.zst": ("txt", "zst"), ".parquet": ("parquet", None),
}


@dataclass(frozen=True)
class Source:
    path: str
    format: str  # "jsonl" | "txt" | "parquet"
    compression: str | None


@dataclass
class WorkUnit:
    """A batch of consecutive records of one source. ``payload`` is raw jsonl bytes (complete lines) for jsonl,
    else a list of ``(line, {key: value})`` documents."""
    path: str
    format: str
    first_line: int
    num_records: int
    payload: object
    num_bytes: int


def source_for(path: str) -> Source:
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if path.endswith(suffix):
            return Source(path, *SUFFIXES[suffix])
    raise ValueError(f"{path}: unsupported input type; supported endings are {', '.join(sorted(SUFFIXES))}")


def find_sources(inputs: list[str]) -> list[Source]:
    """Expand files, directories (recursively, sorted) and globs (sorted), keeping the order given."""
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs
                           if any(f.endswith(s) for s in SUFFIXES))
            if not found:
                raise ValueError(f"--input {item}: directory holds no file ending in {', '.join(sorted(SUFFIXES))}")
        elif any(ch in item for ch in "*?["):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise ValueError(f"--input {item}: the pattern matches no file")
        elif os.path.isfile(item):
            found = [item]
        else:
            raise FileNotFoundError(f"--input {item}: no such file or directory")
        paths.extend(found)
    seen: set[str] = set()
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise ValueError(f"--input: {p} is listed more than once; each file may be read only once")
        seen.add(real)
    return [source_for(p) for p in paths]


UTF8_BOM = b"\xef\xbb\xbf"


class _Prefixed(io.RawIOBase):
    """A read-only stream that yields ``head`` and then the rest of ``stream``."""

    def __init__(self, head: bytes, stream):
        super().__init__()
        self._head, self._stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()


def open_binary(source: Source) -> io.BufferedIOBase:
    """Open a (possibly compressed) file as a stream of decompressed bytes.

    A UTF-8 byte-order mark at the start (editors on Windows write one) is an encoding marker, not data: it is
    dropped here, so the first record parses like every other."""
    if source.compression == "gz":
        stream = gzip.open(source.path, "rb")
    elif source.compression == "zst":
        import zstandard
        stream = zstandard.ZstdDecompressor().stream_reader(open(source.path, "rb"), read_across_frames=True,
                                                            closefd=True)
    else:
        stream = open(source.path, "rb")
    head = b""
    while len(head) < len(UTF8_BOM) and (more := stream.read(len(UTF8_BOM) - len(head))):
        head += more
    return io.BufferedReader(_Prefixed(b"" if head == UTF8_BOM else head, stream), buffer_size=1 << 20)


def _nth_newline_end(buf: bytes, n: int) -> int:
    """Offset just past the n-th newline of buf (n >= 1; buf has at least n)."""
    pos = -1
    for _ in range(n):
        pos = buf.index(b"\n", pos + 1)
    return pos + 1


def _jsonl_lines(source: Source, block_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Blocks of complete lines and their line counts; a last line without a newline counts as a record."""
    with open_binary(source) as f:
        carry: list[bytes] = []
        while data := f.read(block_bytes):
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry.append(data)  # a line longer than a block: keep reading
                continue
            block = b"".join(carry + [data[:cut]])
            carry = [data[cut:]] if cut < len(data) else []
            yield block, block.count(b"\n")
        tail = b"".join(carry)
        if tail:
            yield tail + b"\n", 1


def count_records(source: Source, txt_separator: bytes | None = None, block_bytes: int = 16 << 20) -> int:
    """Number of records in a source (used to split a corpus into shards)."""
    if source.format == "jsonl":
        return sum(n for _, n in _jsonl_lines(source, block_bytes))
    if source.format == "parquet":
        import pyarrow.parquet as pq
        return pq.ParquetFile(source.path).metadata.num_rows
    return len(_txt_documents(source, txt_separator))


def _txt_documents(source: Source, separator: bytes | None) -> list[tuple[int, bytes]]:
    with open_binary(source) as f:
        data = f.read()
    if separator is None:
        return [(1, data)]
    docs, line, start = [], 1, 0
    while True:
        end = data.find(separator, start)
        piece = data[start:] if end == -1 else data[start:end]
        docs.append((line, piece))
        if end == -1:
            return docs
        line += data.count(b"\n", start, end + len(separator))
        start = end + len(separator)


def iter_units(source: Source, keys: list[str], skip: int = 0, take: int | None = None,
               txt_separator: bytes | None = None, unit_bytes: int = 4 << 20) -> Iterator[WorkUnit]:
    """Work units over records ``[skip, skip + take)`` of one source."""
    remaining = float("inf") if take is None else take
    if remaining <= 0:
        return
    if source.format == "jsonl":
        line = 1
        for block, n in _jsonl_lines(source, unit_bytes):
            if skip >= n:
                skip -= n
                line += n
                continue
            if skip:
                block, n, line = block[_nth_newline_end(block, skip):], n - skip, line + skip
                skip = 0
            if n > remaining:
                block, n = block[:_nth_newline_end(block, int(remaining))], int(remaining)
            yield WorkUnit(source.path, "jsonl", line, n, block, len(block))
            line += n
            remaining -= n
            if remaining <= 0:
                return
        return
    if source.format == "txt":
        docs = _txt_documents(source, txt_separator)
        end = len(docs) if take is None else skip + take
        records = [(ln, {"text": raw}) for ln, raw in docs[skip:end]]
        yield from _batch_documents(source, records, unit_bytes, lambda r: len(r[1]["text"]))
        return
    yield from _parquet_units(source, keys, skip, take, unit_bytes)


def _batch_documents(source: Source, records, unit_bytes: int, size_of) -> Iterator[WorkUnit]:
    batch, size = [], 0
    for rec in records:
        batch.append(rec)
        size += size_of(rec)
        if size >= unit_bytes:
            yield WorkUnit(source.path, source.format, batch[0][0], len(batch), batch, size)
            batch, size = [], 0
    if batch:
        yield WorkUnit(source.path, source.format, batch[0][0], len(batch), batch, size)


def _parquet_units(source: Source, keys: list[str], skip: int, take: int | None,
                   unit_bytes: int) -> Iterator[WorkUnit]:
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(source.path)
    present = [k for k in keys if k in pf.schema_arrow.names]
    end = pf.metadata.num_rows if take is None else min(pf.metadata.num_rows, skip + take)

    def rows():
        row = 0
        for batch in pf.iter_batches(batch_size=1024, columns=present or None):
            cols = {k: batch.column(k).to_pylist() for k in present}
            for i in range(batch.num_rows):
                row += 1
                if skip < row <= end:
                    yield row, {k: cols[k][i] for k in present}
            if row >= end:
                return

    def size_of(rec):
        return sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in rec[1].values())

    yield from _batch_documents(source, rows(), unit_bytes, size_of)
