"""Sample-index and blending-index builders: the compiled ``megagpt.data._helpers`` and their numpy references.

The public functions (``build_sample_idx``, ``build_blending_indices``, ``build_exhaustive_blending_indices``)
run the C++ code in ``csrc/helpers.cpp``; the ``*_reference`` functions are plain Python/numpy versions of the
same algorithms (Megatron-LM core, ``megatron/core/datasets/helpers.cpp``), kept as the readable specification
and as the oracle the tests compare the C++ against. They are far too slow for real corpora.

The sample index is a ``[num_samples + 1, 2]`` array: row ``s`` is ``(position in document_idx, token offset in
that document)`` where sample ``s`` starts, and row ``s + 1`` where it ends. Each sample holds
``seq_length + add_extra_token_to_sequence`` tokens; the extra token (the label of the last position) is also
the first token of the next sample.
"""
from __future__ import annotations

import numpy as np

try:
    from megagpt.data import _helpers
except ImportError as err:  # no fallback to the slow references: a missing build must be loud
    raise ImportError(
        "megagpt.data._helpers (compiled from csrc/helpers.cpp) is not built: run `pip install -e .` in the "
        "repository root (or `python setup.py build_ext --inplace`)"
    ) from err

MAX_DATASETS = int(np.iinfo(np.int16).max)  # dataset ids are stored as int16, as in Megatron


def build_sample_idx(sizes: np.ndarray, document_idx: np.ndarray, seq_length: int, num_epochs: int,
                     tokens_per_epoch: int, drop_last_partial_sequence: bool = True,
                     add_extra_token_to_sequence: int = 1) -> np.ndarray:
    """Sample index of GPT samples cut from the documents ``document_idx`` (ids into ``sizes``), in order.

    ``sizes`` and ``document_idx`` are int32; the result is ``[num_samples + 1, 2]``, int32 when every value fits
    (else int64), where ``num_samples = (num_epochs * tokens_per_epoch - extra) // seq_length`` (rounded up
    instead when ``drop_last_partial_sequence`` is False).
    """
    return _helpers.build_sample_idx(sizes, document_idx, int(seq_length), int(num_epochs), int(tokens_per_epoch),
                                     bool(drop_last_partial_sequence), int(add_extra_token_to_sequence))


def build_blending_indices(dataset_index: np.ndarray, dataset_sample_index: np.ndarray, weights: np.ndarray,
                           num_datasets: int, size: int, verbose: bool = False) -> None:
    """Fill ``dataset_index`` (int16[size]) and ``dataset_sample_index`` (int64[size]) in place.

    Sample ``i`` goes to the dataset furthest behind its share, ``argmax_d(weights[d] * max(i, 1) - taken[d])``
    (first maximum on ties), and is that dataset's ``taken[d]``-th sample.
    """
    _helpers.build_blending_indices(dataset_index, dataset_sample_index, weights, int(num_datasets), int(size),
                                    bool(verbose))


def build_exhaustive_blending_indices(dataset_index: np.ndarray, dataset_sample_index: np.ndarray,
                                      sizes: np.ndarray, num_datasets: int) -> None:
    """Fill the blending indices (length ``sizes.sum()``) taking exactly ``sizes[d]`` samples from dataset ``d``.

    The same greedy rule as :func:`build_blending_indices` with ``weights = sizes / sizes.sum()``, restricted to
    the datasets that still owe samples.
    """
    _helpers.build_exhaustive_blending_indices(dataset_index, dataset_sample_index, sizes, int(num_datasets))


# ------------------------------------------------------------------------------------------------ references

def _check_array(arr, name: str, dtype, writeable: bool = False) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of {np.dtype(dtype)}, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {arr.dtype} (convert with .astype)")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got {arr.ndim} dimensions")
    if writeable and not arr.flags.writeable:
        raise ValueError(f"{name} is an output array and must be writeable")
    return arr


def build_sample_idx_reference(sizes: np.ndarray, document_idx: np.ndarray, seq_length: int, num_epochs: int,
                               tokens_per_epoch: int, drop_last_partial_sequence: bool = True,
                               add_extra_token_to_sequence: int = 1) -> np.ndarray:
    """Python twin of :func:`build_sample_idx` (same result, same dtype rule)."""
    sizes = _check_array(sizes, "sizes", np.int32)
    document_idx = _check_array(document_idx, "document_idx", np.int32)
    extra = int(add_extra_token_to_sequence)
    if extra not in (0, 1):
        raise ValueError(f"add_extra_token_to_sequence must be 0 or 1, got {extra}")
    if seq_length < 1 or num_epochs < 1 or tokens_per_epoch < 1:
        raise ValueError(f"seq_length, num_epochs and tokens_per_epoch must be >= 1, got "
                         f"{seq_length}, {num_epochs}, {tokens_per_epoch}")
    if len(document_idx) == 0:
        raise ValueError("document_idx is empty: a sample index needs at least one document")
    if (sizes < 0).any():
        raise ValueError("sizes holds negative lengths")
    if document_idx.min() < 0 or document_idx.max() >= len(sizes):
        raise ValueError(f"document_idx holds ids outside sizes (length {len(sizes)})")

    usable = num_epochs * tokens_per_epoch - extra
    num_samples = usable // seq_length if drop_last_partial_sequence else -(-usable // seq_length)
    if num_samples < 0:
        raise ValueError(f"num_epochs * tokens_per_epoch = {usable + extra} is fewer than the extra token")
    largest = max(len(document_idx), int(sizes.max()) if len(sizes) else 0)
    out = np.zeros((num_samples + 1, 2), dtype=np.int32 if largest <= np.iinfo(np.int32).max else np.int64)

    doc_i, offset = 0, 0
    for s in range(1, num_samples + 1):
        remaining = seq_length + extra
        while remaining != 0:
            doc_len = int(sizes[document_idx[doc_i]]) - offset
            remaining -= doc_len
            if remaining <= 0:
                offset += remaining + doc_len - extra
                remaining = 0
            elif doc_i == len(document_idx) - 1:
                if s != num_samples:
                    raise ValueError(f"document_idx runs out of tokens at sample {s} of {num_samples}")
                offset = int(sizes[document_idx[doc_i]]) - extra
                break
            else:
                doc_i += 1
                offset = 0
        out[s] = (doc_i, offset)
    return out


def build_blending_indices_reference(dataset_index: np.ndarray, dataset_sample_index: np.ndarray,
                                     weights: np.ndarray, num_datasets: int, size: int,
                                     verbose: bool = False) -> None:
    """Python twin of :func:`build_blending_indices` (fills the same arrays in place)."""
    _check_array(dataset_index, "dataset_index", np.int16, writeable=True)
    _check_array(dataset_sample_index, "dataset_sample_index", np.int64, writeable=True)
    _check_array(weights, "weights", np.float64)
    if not 1 <= num_datasets <= MAX_DATASETS or len(weights) != num_datasets:
        raise ValueError(f"num_datasets = {num_datasets} must be in [1, {MAX_DATASETS}] and match "
                         f"len(weights) = {len(weights)}")
    if len(dataset_index) != size or len(dataset_sample_index) != size:
        raise ValueError(f"output arrays must have length size = {size}")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {weights}")
    taken = np.zeros(num_datasets, dtype=np.int64)
    for i in range(size):
        errors = weights * max(float(i), 1.0) - taken.astype(np.float64)
        d = int(np.argmax(errors))  # argmax keeps the first maximum, as the C++ strict '>' does
        dataset_index[i] = d
        dataset_sample_index[i] = taken[d]
        taken[d] += 1
    if verbose:
        print("  blending achieved:", taken / max(size, 1))


def build_exhaustive_blending_indices_reference(dataset_index: np.ndarray, dataset_sample_index: np.ndarray,
                                                sizes: np.ndarray, num_datasets: int) -> None:
    """Python twin of :func:`build_exhaustive_blending_indices` (fills the same arrays in place)."""
    _check_array(dataset_index, "dataset_index", np.int16, writeable=True)
    _check_array(dataset_sample_index, "dataset_sample_index", np.int64, writeable=True)
    _check_array(sizes, "sizes", np.int64)
    if not 1 <= num_datasets <= MAX_DATASETS or len(sizes) != num_datasets:
        raise ValueError(f"num_datasets = {num_datasets} must be in [1, {MAX_DATASETS}] and match "
                         f"len(sizes) = {len(sizes)}")
    if (sizes < 0).any():
        raise ValueError(f"sizes must be >= 0, got {sizes}")
    total = int(sizes.sum())
    if len(dataset_index) != total or len(dataset_sample_index) != total:
        raise ValueError(f"output arrays must have length sizes.sum() = {total}")
    weights = sizes / float(total) if total else np.zeros(num_datasets)
    taken = np.zeros(num_datasets, dtype=np.int64)
    unspent = [d for d in range(num_datasets) if sizes[d] > 0]
    for i in range(total):
        x = max(float(i), 1.0)
        errors = [weights[d] * x - float(taken[d]) for d in unspent]
        d = unspent[int(np.argmax(errors))]
        dataset_index[i] = d
        dataset_sample_index[i] = taken[d]
        taken[d] += 1
        if taken[d] == sizes[d]:
            unspent.remove(d)
