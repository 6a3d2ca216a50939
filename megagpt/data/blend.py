"""Blends of several datasets: by weight (Megatron's BlendedDataset) or by relative epochs (exhaustive).

- :class:`BlendedDataset` draws ``size`` samples so that dataset ``d`` supplies a ``weights[d]`` share at every
  point of the stream (the greedy rule of ``build_blending_indices``), as in Megatron-LM
  ``megatron/core/datasets/blended_dataset.py``. Each component must hold enough samples for its share;
  :func:`build_blended_datasets` asks each for ``ceil(weight * size * 1.005)``, Megatron's 0.5% margin.
- :class:`EpochBlendedDataset` takes exactly ``num_samples[d]`` samples from dataset ``d``, interleaved in
  proportion: a WebText++-style mixture where one corpus is seen for 2 epochs and another for half of one
  (:func:`build_epoch_blended_datasets`).

Data paths use Megatron's form: ``["0.7", "pathA", "0.3", "pathB"]`` (numbers, then prefixes) or ``["pathA"]``.
The blending arrays are cached like the GPT dataset indices (hash-keyed ``.npy`` files in ``cache_dir``).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import numpy as np

from megagpt.data.gpt_dataset import (
    CACHE_FORMAT_VERSION,
    SPLIT_NAMES,
    GPTDataset,
    build_train_valid_test_datasets,
    cached_index_arrays,
    samples_per_epoch,
    split_document_ranges,
)
from megagpt.data.helpers import MAX_DATASETS, build_blending_indices, build_exhaustive_blending_indices
from megagpt.data.indexed import IndexedDataset

logger = logging.getLogger(__name__)

# Megatron builds each component 0.5% larger than its share, so rounding in the blend never runs it dry.
COMPONENT_SIZE_MARGIN = 1.005


def parse_data_path(data_path: str | Sequence[str]) -> tuple[list[float], list[str]]:
    """Split a Megatron data path into ``(numbers, prefixes)``; a lone prefix gets the number 1.0.

    ``"0.7 a 0.3 b"`` or ``["0.7", "a", "0.3", "b"]`` -> ``([0.7, 0.3], ["a", "b"])``. The numbers are returned
    as given (weights to normalise, or epochs).
    """
    entries = data_path.split() if isinstance(data_path, str) else [str(e) for e in data_path]
    if not entries:
        raise ValueError("data_path is empty: give a prefix, or 'weight prefix' pairs such as 0.7 pathA 0.3 pathB")
    if len(entries) == 1:
        if _as_number(entries[0]) is not None:
            raise ValueError(f"data_path {entries} holds only a number; give a dataset prefix")
        return [1.0], entries
    if len(entries) % 2:
        raise ValueError(f"data_path {entries} has {len(entries)} entries; with several datasets give "
                         f"'weight prefix' pairs, e.g. 0.7 pathA 0.3 pathB")
    numbers, prefixes = [], []
    for k in range(0, len(entries), 2):
        number, prefix = _as_number(entries[k]), entries[k + 1]
        if number is None:
            raise ValueError(f"data_path entry {k} ({entries[k]!r}) must be a number (the weight of "
                             f"{prefix!r})")
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"data_path entry {k}: the weight of {prefix!r} must be finite and >= 0, got {number}")
        if _as_number(prefix) is not None:
            raise ValueError(f"data_path entry {k + 1} ({prefix!r}) must be a dataset prefix, got a number")
        numbers.append(number)
        prefixes.append(prefix)
    if sum(numbers) <= 0:
        raise ValueError(f"data_path {entries}: the weights are all zero")
    return numbers, prefixes


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def component_num_samples(weights: Sequence[float], size: int) -> list[int]:
    """Samples each component must hold for a ``size``-sample blend: megatron-core's
    ``ceil(ceil(weight * size) * 1.005)`` (the margin absorbs the blending rule's lead of up to one sample)."""
    weights = _normalised(weights)
    return [int(math.ceil(math.ceil(w * size) * COMPONENT_SIZE_MARGIN)) for w in weights]


def _normalised(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be a non-empty list of finite numbers >= 0, not all zero; got {weights}")
    return w / w.sum()


class _Blend:
    """Reads sample ``i`` as ``datasets[dataset_index[i]][dataset_sample_index[i]]``."""

    datasets: list
    dataset_index: np.ndarray
    dataset_sample_index: np.ndarray

    def _load_or_build(self, datasets, identity: dict, cache_dir, build) -> None:
        if not 1 <= len(datasets) <= MAX_DATASETS:
            raise ValueError(f"a blend takes 1 to {MAX_DATASETS} datasets, got {len(datasets)}")
        if cache_dir is not None and not all(hasattr(ds, "description") for ds in datasets):
            raise ValueError("caching a blend needs components with a `description` (e.g. GPTDataset); "
                             "pass cache_dir=None for other datasets")
        self.datasets = list(datasets)
        self.description = {
            "class": type(self).__name__,
            "format_version": CACHE_FORMAT_VERSION,
            "datasets": [getattr(ds, "description", None) for ds in datasets],
            **identity,
        }
        arrays, self.loaded_from_cache = cached_index_arrays(
            cache_dir, self.description, ("dataset_index", "dataset_sample_index"), build)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def samples_taken(self) -> np.ndarray:
        """How many samples the blend reads from each component."""
        return np.bincount(self.dataset_index, minlength=len(self.datasets))

    def _check_components_are_large_enough(self, hint) -> None:
        for d, (taken, ds) in enumerate(zip(self.samples_taken(), self.datasets)):
            if taken > len(ds):
                name = getattr(ds, "description", {}).get("dataset_path", f"component {d}")
                raise ValueError(f"blend component {d} ({name}) has {len(ds)} samples but the blend reads "
                                 f"{taken} of them; {hint(d)}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int):
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for a blend of {len(self)} samples")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]


class BlendedDataset(_Blend):
    """``size`` samples from ``datasets`` in proportion to ``weights`` (normalised; each must be > 0)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int,
                 cache_dir: str | os.PathLike | None = None):
        if len(weights) != len(datasets):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.weights = _normalised(weights)
        if (self.weights == 0).any():
            raise ValueError(f"weights {list(weights)} include a zero: remove that dataset from the blend (the "
                             f"greedy rule would still draw a sample from it when all others tie)")
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = int(size)

        def build():
            dataset_index = np.zeros(self.size, dtype=np.int16)
            dataset_sample_index = np.zeros(self.size, dtype=np.int64)
            build_blending_indices(dataset_index, dataset_sample_index, self.weights, len(datasets), self.size)
            return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

        self._load_or_build(datasets, {"weights": self.weights.tolist(), "size": self.size}, cache_dir, build)
        needed = component_num_samples(self.weights, self.size)
        self._check_components_are_large_enough(
            lambda d: f"build it with at least ceil(weight * size * {COMPONENT_SIZE_MARGIN}) = {needed[d]} samples")


class EpochBlendedDataset(_Blend):
    """Exactly ``num_samples[d]`` samples of each ``datasets[d]``, interleaved in proportion to those counts."""

    def __init__(self, datasets: Sequence, num_samples: Sequence[int], cache_dir: str | os.PathLike | None = None):
        if len(num_samples) != len(datasets):
            raise ValueError(f"{len(datasets)} datasets but {len(num_samples)} sample counts")
        counts = np.asarray([int(n) for n in num_samples], dtype=np.int64)
        if (counts < 0).any() or counts.sum() < 1:
            raise ValueError(f"num_samples must be >= 0 with a positive total, got {list(num_samples)}")
        self.num_samples = counts

        def build():
            total = int(counts.sum())
            dataset_index = np.zeros(total, dtype=np.int16)
            dataset_sample_index = np.zeros(total, dtype=np.int64)
            build_exhaustive_blending_indices(dataset_index, dataset_sample_index, counts, len(datasets))
            return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

        self._load_or_build(datasets, {"num_samples": counts.tolist()}, cache_dir, build)
        self._check_components_are_large_enough(lambda d: f"it must hold num_samples[{d}] = {counts[d]}")


def build_blended_datasets(data_path: str | Sequence[str], split: str | Sequence[float], seq_len: int,
                           num_samples: Sequence[int | None], seed: int = 1234,
                           cache_dir: str | os.PathLike | None = None) -> tuple:
    """Train/valid/test datasets for a Megatron data path; several prefixes make weighted :class:`BlendedDataset`.

    Each prefix is split by ``split``; each component gets ``ceil(weight * num_samples[s] * 1.005)`` samples.
    A split with 0 samples asked is None; a weighted blend needs a sample count for every split it builds.
    """
    weights, prefixes = parse_data_path(data_path)
    if len(prefixes) == 1:
        return build_train_valid_test_datasets(prefixes[0], split, seq_len, num_samples, seed, cache_dir)
    if len(num_samples) != len(SPLIT_NAMES):
        raise ValueError(f"num_samples must give (train, valid, test) counts, got {num_samples}")
    indexed = [IndexedDataset(p) for p in prefixes]
    ranges = [split_document_ranges(split, len(ds)) for ds in indexed]
    blends = []
    for s, (name, size) in enumerate(zip(SPLIT_NAMES, num_samples)):
        if size == 0:
            blends.append(None)
            continue
        if size is None:
            raise ValueError(f"num_samples for the {name} split is None: a weighted blend needs a sample count")
        components = []
        for ds, ds_ranges, count in zip(indexed, ranges, component_num_samples(weights, size)):
            if ds_ranges[s][0] == ds_ranges[s][1]:
                raise ValueError(f"{ds.path_prefix} has no documents in the {name} split {split!r}; "
                                 f"change the split or the blend")
            components.append(GPTDataset(ds, ds_ranges[s], seq_len, count, seed, cache_dir))
        blends.append(BlendedDataset(components, weights, size, cache_dir))
    return tuple(blends)


def build_epoch_blended_datasets(data_path: str | Sequence[str], split: str | Sequence[float], seq_len: int,
                                 seed: int = 1234, cache_dir: str | os.PathLike | None = None) -> tuple:
    """Train/valid/test :class:`EpochBlendedDataset` from ``"epochs prefix"`` pairs, e.g. ``2 wiki 0.5 web``.

    Each split of each prefix contributes ``round(epochs * samples_per_epoch)`` samples (half-up); the same
    relative epochs apply to every split. A split where no prefix contributes is None.
    """
    epochs, prefixes = parse_data_path(data_path)
    indexed = [IndexedDataset(p) for p in prefixes]
    blends = []
    for s in range(len(SPLIT_NAMES)):
        components, counts = [], []
        for ds, num_epochs in zip(indexed, epochs):
            document_range = split_document_ranges(split, len(ds))[s]
            count = 0
            if document_range[0] < document_range[1]:
                count = int(math.floor(num_epochs * samples_per_epoch(ds, document_range, seq_len) + 0.5))
            if count > 0:
                components.append(GPTDataset(ds, document_range, seq_len, count, seed, cache_dir))
                counts.append(count)
        blends.append(EpochBlendedDataset(components, counts, cache_dir) if components else None)
    return tuple(blends)
