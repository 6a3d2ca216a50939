"""Megatron-LM's memory-mapped indexed dataset format (``MMIDIDX``): a ``.bin`` of raw tokens and an ``.idx``.

Layout of ``{prefix}.idx`` (little-endian), byte-identical to what Megatron-LM's ``IndexedDatasetBuilder`` writes::

    b"MMIDIDX\\x00\\x00"   magic, 9 bytes
    <Q  version = 1
    <B  dtype code      (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    <Q  sequence count  S
    <Q  document count  D + 1  (document_indices always starts with 0)
    int32[S]  sequence lengths (tokens)
    int64[S]  sequence pointers (byte offsets into .bin)
    int64[D+1] document indices (sequence index where each document starts; last = S)

megagpt writes one sequence per document (no sentence splitting), as Megatron's ``preprocess_data.py`` does
without ``--split-sentences``. Files are written under temporary names and renamed at the end — ``.bin`` first,
``.idx`` last — so an interrupted write never leaves a pair that looks finished.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
PARTIAL_SUFFIX = ".partial"


def best_dtype(vocab_size: int) -> np.dtype:
    """Token dtype for a vocabulary, Megatron's rule: uint16 below 65,500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def data_file_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def dataset_exists(prefix: str | os.PathLike) -> bool:
    """True when either file of the pair exists (a half pair still blocks an overwrite)."""
    return os.path.exists(data_file_path(prefix)) or os.path.exists(index_file_path(prefix))


def write_index(path: str | os.PathLike, dtype: np.dtype, sequence_lengths: np.ndarray,
                document_indices: np.ndarray) -> None:
    """Write an ``.idx`` file for the given sequence lengths and document indices (pointers are derived)."""
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF_DTYPE:
        raise ValueError(f"dtype {dtype} has no MMIDIDX code; use one of {sorted(map(str, _CODE_OF_DTYPE))}")
    lengths = np.ascontiguousarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc_idx = np.ascontiguousarray(document_indices, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(INDEX_MAGIC)
        f.write(struct.pack("<Q", INDEX_VERSION))
        f.write(struct.pack("<B", _CODE_OF_DTYPE[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_idx.tobytes(order="C"))


class IndexedDatasetWriter:
    """Streams documents into ``{prefix}.bin/.idx``; nothing under the final names until :meth:`finalize`.

    Use as a context manager: a clean exit finalises, an exception removes the partial files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.uint16, overwrite: bool = False):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        if dataset_exists(self.prefix) and not overwrite:
            raise FileExistsError(f"{self.prefix}.bin/.idx already exists; pass overwrite=True (--overwrite) "
                                  f"to replace it")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = data_file_path(self.prefix) + PARTIAL_SUFFIX
        self._idx_tmp = index_file_path(self.prefix) + PARTIAL_SUFFIX
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False

    def add_document(self, tokens) -> None:
        """Append one document (one sequence). Values must fit the dataset dtype."""
        arr = np.asarray(tokens)
        self.add_documents(arr, np.array([arr.size], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many documents given as one flat token array and their lengths (the fast path)."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        if tokens.dtype != self.dtype:
            if tokens.size and (tokens.min() < np.iinfo(self.dtype).min or tokens.max() > np.iinfo(self.dtype).max):
                raise ValueError(f"token ids outside the range of {self.dtype} (min {tokens.min()}, "
                                 f"max {tokens.max()}); use a wider dtype")
            tokens = tokens.astype(self.dtype)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document longer than 2^31-1 tokens cannot be stored in MMIDIDX")
        self._bin.write(np.ascontiguousarray(tokens).tobytes(order="C"))
        self._lengths.append(lengths.astype(np.int32))
        self.num_documents += lengths.size
        self.num_tokens += tokens.size

    def add_dataset(self, other: "IndexedDataset") -> None:
        """Append every document of an existing dataset of the same dtype (used to merge shards)."""
        if other.dtype != self.dtype:
            raise ValueError(f"cannot merge {other.path_prefix} ({other.dtype}) into a {self.dtype} dataset")
        if not np.array_equal(other.document_indices, np.arange(len(other) + 1)):
            raise ValueError(f"{other.path_prefix} has multi-sequence documents; merging those is not supported")
        chunk = 1 << 26  # copy in 64 MiB pieces: a merged corpus may not fit in memory
        with open(data_file_path(other.path_prefix), "rb") as src:
            while block := src.read(chunk):
                self._bin.write(block)
        self._lengths.append(np.asarray(other.sequence_lengths, dtype=np.int32))
        self.num_documents += len(other)
        self.num_tokens += other.num_tokens

    def finalize(self) -> None:
        """Write the index and move both files to their final names (``.idx`` last)."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        write_index(self._idx_tmp, self.dtype, lengths, np.arange(len(lengths) + 1, dtype=np.int64))
        os.replace(self._bin_tmp, data_file_path(self.prefix))
        os.replace(self._idx_tmp, index_file_path(self.prefix))
        self._done = True

    def discard(self) -> None:
        """Remove the partial files (after an error or an interruption)."""
        if not self._bin.closed:
            self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._done:
            self.finalize()
        elif exc_type is not None:
            self.discard()


class IndexedDataset:
    """Memory-mapped reader of an ``MMIDIDX`` pair; refuses truncated or mismatched files with a clear error."""

    def __init__(self, prefix: str | os.PathLike):
        self.path_prefix = os.fspath(prefix)
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for p in (idx_path, bin_path):
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p} not found: an indexed dataset needs both {bin_path} and {idx_path}")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        if len(header) < _HEADER_SIZE or header[:9] != INDEX_MAGIC:
            raise ValueError(f"{idx_path} is not a Megatron MMIDIDX index (bad magic or shorter than its header)")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != INDEX_VERSION:
            raise ValueError(f"{idx_path}: index version {version} is not supported (expected {INDEX_VERSION})")
        code = header[17]
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        num_seq, num_doc = struct.unpack("<QQ", header[18:34])
        expected = _HEADER_SIZE + num_seq * (4 + 8) + num_doc * 8
        if idx_size != expected:
            raise ValueError(f"{idx_path} is {idx_size} bytes but its header ({num_seq} sequences, {num_doc} "
                             f"document indices) implies {expected}: the index is truncated or corrupt; "
                             f"re-run preprocessing")
        self._idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = _HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._idx, dtype=np.int32, count=num_seq, offset=off)
        off += num_seq * 4
        self.sequence_pointers = np.frombuffer(self._idx, dtype=np.int64, count=num_seq, offset=off)
        off += num_seq * 8
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=num_doc, offset=off)
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_size = os.path.getsize(bin_path)
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise ValueError(f"{bin_path} is {bin_size} bytes but {idx_path} describes {self.num_tokens} tokens "
                             f"of {self.dtype} ({self.num_tokens * self.dtype.itemsize} bytes): the pair is "
                             f"mismatched or truncated; re-run preprocessing")
        if num_doc == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != num_seq:
            raise ValueError(f"{idx_path}: document indices must run from 0 to the sequence count {num_seq}")
        self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` without touching the rest of the file."""
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"slice [{offset}, {offset + length}) outside sequence {i} of length {n}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return np.asarray(self._bin[start:start + length])
