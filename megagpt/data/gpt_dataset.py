"""GPT samples cut from an indexed dataset: document index, sample index and shuffle index (Megatron-core style).

A :class:`GPTDataset` exposes one split (a contiguous range of documents) of an
:class:`~megagpt.data.indexed.IndexedDataset` as fixed-length samples of ``seq_len + 1`` tokens that run across
document boundaries, in the order Megatron-LM's ``megatron/core/datasets/gpt_dataset.py`` gives for the same
seed. Three arrays define it:

- document index: the split's documents repeated for every epoch, shuffled (the last epoch on its own when less
  than 80% of it is used, so that the samples of the full epochs are not diluted by a partial one);
- sample index (``[num_samples + 1, 2]``, from the C++ helper): where each sample starts and ends in the document
  index, as (position, token offset);
- shuffle index: a seeded permutation of the samples.

Sample ``i`` is then three array look-ups and one read per document it spans, so a resumed run jumps straight
to any position. The arrays are cached as ``.npy`` files named by a hash of everything that shapes them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from typing import Callable, Sequence

import numpy as np

from megagpt.data.helpers import build_sample_idx
from megagpt.data.indexed import IndexedDataset

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "valid", "test")
# Megatron's rule: shuffle the final epoch separately when fewer than this share of its samples are used.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80
# Every sample carries one token past seq_len: the label of its last position (and the next sample's first token).
EXTRA_TOKEN = 1


def split_document_ranges(split: str | Sequence[float], num_documents: int) -> list[tuple[int, int]]:
    """Document ranges ``[(begin, end)] * 3`` for train/valid/test from weights such as ``"949,50,1"``.

    Megatron-core's rule: missing parts count as 0 (``"98,2"`` has no test split), weights are normalised, and
    each bound is ``int(round(cumulative_weight * num_documents))``, the last one set to ``num_documents`` (the
    float sum of the weights may miss 1.0).
    """
    if isinstance(split, str):
        parts = [p.strip() for p in split.split(",")]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"split {split!r}: every part must be a number, e.g. '949,50,1' "
                             f"(train,valid,test)") from None
    else:
        weights = [float(w) for w in split]
    if not 1 <= len(weights) <= len(SPLIT_NAMES):
        raise ValueError(f"split {split!r} has {len(weights)} parts; give 1 to 3 weights for train,valid,test")
    weights += [0.0] * (len(SPLIT_NAMES) - len(weights))
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"split {split!r}: weights must be finite and >= 0")
    if sum(weights) <= 0:
        raise ValueError(f"split {split!r}: weights are all zero; give at least one positive weight")
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    weights_array = np.asarray(weights, dtype=np.float64)
    fractions = (weights_array / np.sum(weights_array)).tolist()
    cumulative = [0.0]
    for f in fractions:
        cumulative.append(cumulative[-1] + f)
    bounds = [int(round(c * float(num_documents))) for c in cumulative[:-1]] + [num_documents]
    assert all(a <= b for a, b in zip(bounds, bounds[1:])), bounds
    return [(bounds[i], bounds[i + 1]) for i in range(len(SPLIT_NAMES))]


def samples_per_epoch(indexed: IndexedDataset, document_range: tuple[int, int], seq_len: int) -> int:
    """Number of samples one pass over ``document_range`` yields (what ``num_samples=None`` builds)."""
    begin, end = document_range
    tokens = int(indexed.sequence_lengths[begin:end].sum(dtype=np.int64))
    return max(tokens - EXTRA_TOKEN, 0) // seq_len


class GPTDataset:
    """Samples of ``seq_len + 1`` tokens (np.int64) from the documents ``document_range`` of ``indexed``.

    ``num_samples=None`` builds one epoch; otherwise enough epochs for at least ``num_samples`` samples (the
    dataset then holds every sample of those epochs, ``len(self) >= num_samples``). ``cache_dir=None`` builds
    the indices in memory without caching.
    """

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int], seq_len: int,
                 num_samples: int | None = None, seed: int = 1234, cache_dir: str | os.PathLike | None = None):
        begin, end = (int(x) for x in document_range)
        if not 0 <= begin < end <= len(indexed):
            raise ValueError(f"document_range {document_range} must be a non-empty range inside "
                             f"[0, {len(indexed)}] of {indexed.path_prefix}")
        if int(seq_len) < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if num_samples is not None and int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1 or None (one epoch), got {num_samples}")
        if not 0 <= int(seed) < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.indexed = indexed
        self.document_range = (begin, end)
        self.seq_len = int(seq_len)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.seed = int(seed)
        self.tokens_per_epoch = int(indexed.sequence_lengths[begin:end].sum(dtype=np.int64))
        if self.tokens_per_epoch < 1:
            raise ValueError(f"documents {self.document_range} of {indexed.path_prefix} hold no tokens")
        if self.num_samples is None and self.tokens_per_epoch < self.seq_len + EXTRA_TOKEN:
            raise ValueError(f"documents {self.document_range} of {indexed.path_prefix} hold {self.tokens_per_epoch} "
                             f"tokens, fewer than one sample of seq_len + 1 = {self.seq_len + 1}; use a "
                             f"smaller seq_len, a larger split or set num_samples")
        self.num_epochs = self._num_epochs()

        idx_stat = os.stat(f"{indexed.path_prefix}.idx")
        self.description = {
            "class": type(self).__name__,
            "format_version": CACHE_FORMAT_VERSION,
            "dataset_path": os.path.abspath(indexed.path_prefix),
            "index_size": idx_stat.st_size,
            "index_mtime_ns": idx_stat.st_mtime_ns,
            "document_range": [begin, end],
            "seq_len": self.seq_len,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "extra_token": EXTRA_TOKEN,
        }
        arrays, self.loaded_from_cache = cached_index_arrays(
            cache_dir, self.description, ("document_index", "sample_index", "shuffle_index"), self._build_indices)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def __getitem__(self, idx: int) -> np.ndarray:
        """Tokens of sample ``idx`` (after shuffling): np.int64 array of ``seq_len + 1``."""
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for a GPTDataset of {len(self)} samples")
        return self.unshuffled_sample(int(self.shuffle_index[idx]))

    def unshuffled_sample(self, j: int) -> np.ndarray:
        """Tokens of the ``j``-th sample in document-index order (before the shuffle index)."""
        (doc_begin, offset_begin), (doc_end, offset_end) = self.sample_index[j], self.sample_index[j + 1]
        doc_begin, offset_begin, doc_end, offset_end = map(int, (doc_begin, offset_begin, doc_end, offset_end))
        get, docs = self.indexed.get, self.document_index
        if doc_begin == doc_end:
            parts = [get(int(docs[doc_begin]), offset_begin, offset_end - offset_begin + EXTRA_TOKEN)]
        else:
            parts = [get(int(docs[doc_begin]), offset_begin)]
            parts += [get(int(docs[d])) for d in range(doc_begin + 1, doc_end)]
            parts.append(get(int(docs[doc_end]), 0, offset_end + EXTRA_TOKEN))
        sample = np.concatenate(parts).astype(np.int64, copy=False)
        assert len(sample) == self.seq_len + EXTRA_TOKEN, (j, len(sample))
        return sample

    def _num_epochs(self) -> int:
        if self.num_samples is None:
            return 1
        tokens_needed = self.num_samples * self.seq_len + EXTRA_TOKEN
        num_epochs = max(1, -(-tokens_needed // self.tokens_per_epoch))
        if num_epochs > np.iinfo(np.int32).max:
            raise ValueError(f"num_samples = {self.num_samples} needs {num_epochs} epochs of "
                             f"{self.tokens_per_epoch} tokens, more than int32 can count")
        return num_epochs

    def _build_indices(self) -> dict[str, np.ndarray]:
        tokens, epochs, seq_len = self.tokens_per_epoch, self.num_epochs, self.seq_len
        separate_final_epoch = False
        if epochs > 1:
            samples_before_final = ((epochs - 1) * tokens - EXTRA_TOKEN) // seq_len
            samples_from_final = self.num_samples - samples_before_final
            per_epoch = (tokens - EXTRA_TOKEN) // seq_len
            assert 0 <= samples_from_final <= per_epoch + 1, (samples_from_final, per_epoch)
            separate_final_epoch = samples_from_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)

        # One RandomState drawn in Megatron's order (documents, then samples) gives Megatron's permutations.
        random_state = np.random.RandomState(self.seed)
        documents = np.arange(*self.document_range, dtype=np.int32)
        if separate_final_epoch:
            document_index = np.concatenate([_shuffled_documents(documents, epochs - 1, random_state),
                                             _shuffled_documents(documents, 1, random_state)])
        else:
            document_index = _shuffled_documents(documents, epochs, random_state)

        sample_index = build_sample_idx(np.ascontiguousarray(self.indexed.sequence_lengths, dtype=np.int32),
                                        document_index, seq_len, epochs, tokens, True, EXTRA_TOKEN)
        num_built = sample_index.shape[0] - 1
        first_range = samples_before_final if separate_final_epoch else num_built
        shuffle_index = _shuffled_samples(first_range, num_built, random_state)
        logger.info("built GPTDataset indices for %s documents %s: %d samples, %d epochs",
                    self.indexed.path_prefix, self.document_range, num_built, epochs)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def _shuffled_documents(documents: np.ndarray, num_epochs: int, random_state: np.random.RandomState) -> np.ndarray:
    document_index = np.tile(documents, num_epochs).astype(np.int32)
    random_state.shuffle(document_index)
    return document_index


def _shuffled_samples(first_range: int, total: int, random_state: np.random.RandomState) -> np.ndarray:
    """``[0, first_range)`` shuffled, then ``[first_range, total)`` shuffled on its own."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(first_range, dtype=dtype)
    random_state.shuffle(first)
    if first_range == total:
        return first
    rest = np.arange(first_range, total, dtype=dtype)
    random_state.shuffle(rest)
    return np.concatenate([first, rest])


# ------------------------------------------------------------------------------------------------ index cache

def _distributed():
    """``torch.distributed`` when a process group is up, else None (torch is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    return torch.distributed


def _save_atomic(path: str, write: Callable) -> None:
    partial = f"{path}.{os.getpid()}.partial"
    try:
        with open(partial, "wb") as f:
            write(f)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def cached_index_arrays(cache_dir: str | os.PathLike | None, description: dict, names: Sequence[str],
                        build: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
    """Arrays ``names`` for ``description``: loaded (``mmap_mode="r"``) from ``cache_dir`` or built and saved.

    Files are ``{class}-{sha256(description)[:16]}-{name}.npy`` plus ``...-description.json``, written under
    temporary names and renamed, the description last. Under ``torch.distributed`` only rank 0 builds; the
    others wait at a barrier and load (``cache_dir`` must be shared by all ranks). Returns ``(arrays,
    loaded_from_cache)``; with ``cache_dir=None`` the arrays are built in memory.
    """
    if cache_dir is None:
        return build(), False
    text = json.dumps(description, sort_keys=True, indent=2)
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    base = os.path.join(os.fspath(cache_dir), f"{description['class']}-{key}")
    paths = {name: f"{base}-{name}.npy" for name in names}
    description_path = f"{base}-description.json"

    def complete() -> bool:
        return all(os.path.isfile(p) for p in (*paths.values(), description_path))

    dist = _distributed()
    rank = dist.get_rank() if dist is not None else 0
    built_here = not complete() and rank == 0
    if built_here:
        arrays = build()
        os.makedirs(cache_dir, exist_ok=True)
        for name, path in paths.items():
            _save_atomic(path, lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
        _save_atomic(description_path, lambda f: f.write(text.encode("utf-8")))
        logger.info("saved index cache %s-*", base)
    if dist is not None:
        dist.barrier()
    if not complete():
        raise FileNotFoundError(f"rank {rank}: index cache {description_path} is missing after rank 0 built it; "
                                f"cache_dir must be a directory shared by all ranks")
    return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in paths.items()}, not built_here


def build_train_valid_test_datasets(prefix_or_dataset: str | os.PathLike | IndexedDataset,
                                    split: str | Sequence[float], seq_len: int,
                                    num_samples: Sequence[int | None] = (None, None, None), seed: int = 1234,
                                    cache_dir: str | os.PathLike | None = None) -> tuple[GPTDataset | None, ...]:
    """Train, valid and test :class:`GPTDataset` over disjoint document ranges of one indexed dataset.

    ``num_samples`` gives each split's sample count (None: one epoch; 0: do not build). A split with no
    documents, or 0 samples asked, is None.
    """
    indexed = prefix_or_dataset if isinstance(prefix_or_dataset, IndexedDataset) else IndexedDataset(
        prefix_or_dataset)
    if len(num_samples) != len(SPLIT_NAMES):
        raise ValueError(f"num_samples must give (train, valid, test) counts, got {num_samples}")
    datasets = []
    for name, document_range, count in zip(SPLIT_NAMES, split_document_ranges(split, len(indexed)), num_samples):
        if document_range[0] == document_range[1] or count == 0:
            datasets.append(None)
            continue
        logger.info("%s split: documents %s", name, document_range)
        datasets.append(GPTDataset(indexed, document_range, seq_len, count, seed, cache_dir))
    return tuple(datasets)
