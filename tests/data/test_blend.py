"""Blending: weighted blends track their weights, epoch blends take exact counts, caches, clear errors."""
import math

import numpy as np
import pytest

from megagpt.data.blend import (
    BlendedDataset,
    EpochBlendedDataset,
    build_blended_datasets,
    build_epoch_blended_datasets,
    component_num_samples,
    parse_data_path,
)
from megagpt.data.gpt_dataset import GPTDataset, samples_per_epoch, split_document_ranges
from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter


def _write_corpus(prefix, token_base, num_docs, seed):
    """Documents whose token ids all lie in [token_base, token_base + 1000): a sample shows its corpus."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for _ in range(num_docs):
            writer.add_document(token_base + rng.integers(0, 1000, size=int(rng.integers(1, 25))))
    return str(prefix)


@pytest.fixture
def prefixes(tmp_path):
    return [_write_corpus(tmp_path / "a", 0, 30, 0), _write_corpus(tmp_path / "b", 1000, 50, 1)]


def _assert_within_one_sample(dataset_index, weights):
    counts = np.zeros(len(weights))
    for n, d in enumerate(dataset_index, start=1):
        counts[d] += 1
        assert np.all(np.abs(counts - np.asarray(weights) * n) <= 1.0 + 1e-9), (n, counts)


def test_parse_data_path():
    assert parse_data_path(["corpus"]) == ([1.0], ["corpus"])
    assert parse_data_path(["0.7", "a", "0.3", "b"]) == ([0.7, 0.3], ["a", "b"])
    assert parse_data_path("2 a 0.5 b") == ([2.0, 0.5], ["a", "b"])
    for bad, match in [([], "empty"), (["0.5"], "only a number"), (["0.7", "a", "0.3"], "3 entries"),
                       (["a", "0.7", "b", "0.3"], "must be a number"), (["0.7", "0.3", "0.3", "b"], "prefix"),
                       (["-1", "a", "1", "b"], ">= 0"), (["0", "a", "0", "b"], "all zero")]:
        with pytest.raises(ValueError, match=match):
            parse_data_path(bad)


def test_weighted_blend_reads_components_in_proportion(prefixes, tmp_path):
    size = 120
    train, valid, test = build_blended_datasets(["0.7", prefixes[0], "0.3", prefixes[1]], "90,10,0", seq_len=4,
                                                num_samples=(size, 12, 0), seed=7, cache_dir=tmp_path / "cache")
    assert test is None and len(train) == size and len(valid) == 12
    for blend, n in ((train, size), (valid, 12)):
        assert isinstance(blend, BlendedDataset)
        np.testing.assert_allclose(blend.weights, [0.7, 0.3])
        assert [len(ds) >= need for ds, need in zip(blend.datasets, component_num_samples([0.7, 0.3], n))] == \
            [True, True]
        _assert_within_one_sample(blend.dataset_index, blend.weights)
        for d in range(2):  # each component is read from its sample 0 on, in order
            np.testing.assert_array_equal(blend.dataset_sample_index[blend.dataset_index == d],
                                          np.arange(blend.samples_taken()[d]))
    for i in range(size):
        d, k = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        sample = train[i]
        np.testing.assert_array_equal(sample, train.datasets[d][k])
        assert np.all((sample >= 1000 * d) & (sample < 1000 * (d + 1)))  # it really came from corpus d
    # Each component covers the documents of its own split only.
    for ds, prefix in zip(train.datasets, prefixes):
        assert ds.document_range == split_document_ranges("90,10,0", len(IndexedDataset(prefix)))[0]


def test_blend_cache_is_reused_and_keyed(prefixes, tmp_path):
    cache = tmp_path / "cache"
    components = [GPTDataset(IndexedDataset(p), (0, 20), 4, num_samples=60, seed=1, cache_dir=cache)
                  for p in prefixes]
    first = BlendedDataset(components, [2, 1], 50, cache_dir=cache)
    again = BlendedDataset(components, [2, 1], 50, cache_dir=cache)
    other = BlendedDataset(components, [2, 1], 51, cache_dir=cache)
    assert not first.loaded_from_cache and again.loaded_from_cache and not other.loaded_from_cache
    np.testing.assert_allclose(first.weights, [2 / 3, 1 / 3])  # weights are normalised
    _assert_within_one_sample(first.dataset_index, [2 / 3, 1 / 3])
    np.testing.assert_array_equal(first.dataset_index, again.dataset_index)
    np.testing.assert_array_equal(first.dataset_sample_index, again.dataset_sample_index)
    np.testing.assert_array_equal(first[49], again[49])


def test_weighted_blend_refuses_bad_input(prefixes):
    small = GPTDataset(IndexedDataset(prefixes[0]), (0, 5), 4, seed=1)  # one epoch of 5 short documents
    large = GPTDataset(IndexedDataset(prefixes[1]), (0, 50), 4, num_samples=500, seed=1)
    with pytest.raises(ValueError, match=r"component 0 .* has \d+ samples but the blend reads"):
        BlendedDataset([small, large], [0.5, 0.5], 400)
    with pytest.raises(ValueError, match="zero"):
        BlendedDataset([small, large], [0.0, 1.0], 10)
    with pytest.raises(ValueError, match="2 datasets but 3 weights"):
        BlendedDataset([small, large], [0.2, 0.3, 0.5], 10)
    with pytest.raises(ValueError, match="size"):
        BlendedDataset([small, large], [0.5, 0.5], 0)
    with pytest.raises(ValueError, match="description"):
        BlendedDataset([[np.zeros(5)] * 10, large], [0.5, 0.5], 4, cache_dir="unused")
    with pytest.raises(ValueError, match="needs a sample count"):
        build_blended_datasets(["1", prefixes[0], "1", prefixes[1]], "1", 4, num_samples=(None, 0, 0))


def test_epoch_blend_takes_exact_relative_epochs(prefixes, tmp_path):
    seq_len = 4
    train, valid, test = build_epoch_blended_datasets(["2", prefixes[0], "0.5", prefixes[1]], "1", seq_len,
                                                      seed=3, cache_dir=tmp_path / "cache")
    assert valid is None and test is None
    per_epoch = [samples_per_epoch(IndexedDataset(p), (0, len(IndexedDataset(p))), seq_len) for p in prefixes]
    expected = [2 * per_epoch[0], math.floor(0.5 * per_epoch[1] + 0.5)]
    np.testing.assert_array_equal(train.samples_taken(), expected)
    assert len(train) == sum(expected)
    for d in range(2):
        np.testing.assert_array_equal(train.dataset_sample_index[train.dataset_index == d], np.arange(expected[d]))
    _assert_within_one_sample(train.dataset_index, np.array(expected) / sum(expected))
    # Two epochs of corpus a: every document of it twice in the component's document index.
    a = train.datasets[0]
    np.testing.assert_array_equal(np.bincount(a.document_index), np.full(len(a.indexed), 2))
    for i in range(0, len(train), 5):
        d = int(train.dataset_index[i])
        assert np.all(train[i] // 1000 == d)


def test_epoch_blend_refuses_bad_input(prefixes):
    ds = GPTDataset(IndexedDataset(prefixes[0]), (0, 30), 4, seed=1)
    with pytest.raises(ValueError, match=r"has \d+ samples but the blend reads"):
        EpochBlendedDataset([ds], [len(ds) + 1])
    with pytest.raises(ValueError, match="positive total"):
        EpochBlendedDataset([ds], [0])
    with pytest.raises(ValueError, match="1 datasets but 2 sample counts"):
        EpochBlendedDataset([ds], [1, 2])
