"""GPTDataset: samples tile the shuffled document stream, seeds, epochs, index caches and splits."""
import os

import numpy as np
import pytest

from megagpt.data.gpt_dataset import (
    GPTDataset,
    build_train_valid_test_datasets,
    samples_per_epoch,
    split_document_ranges,
)
from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter


def _write_corpus(prefix, num_docs=40, seed=0, max_len=30):
    """Random documents of 1..max_len tokens (1-token documents included)."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for _ in range(num_docs):
            length = 1 if rng.random() < 0.15 else int(rng.integers(1, max_len))
            writer.add_document(rng.integers(0, 60000, size=length))
    return IndexedDataset(prefix)


@pytest.fixture
def corpus(tmp_path):
    return _write_corpus(tmp_path / "corpus")


def _stream(dataset):
    """The split's tokens in document-index order (what the samples are cut from)."""
    return np.concatenate([dataset.indexed[int(d)] for d in dataset.document_index]).astype(np.int64)


def test_samples_tile_the_shuffled_document_stream(corpus):
    seq_len = 7
    ds = GPTDataset(corpus, (0, len(corpus)), seq_len, seed=3)
    stream = _stream(ds)
    assert sorted(ds.document_index.tolist()) == list(range(len(corpus)))  # one epoch: every document once
    assert len(ds) == (corpus.num_tokens - 1) // seq_len == samples_per_epoch(corpus, (0, len(corpus)), seq_len)
    np.testing.assert_array_equal(np.sort(ds.shuffle_index), np.arange(len(ds)))
    for i in range(len(ds)):  # random access by index: sample i is stream window shuffle_index[i]
        j = int(ds.shuffle_index[i])
        sample = ds[i]
        assert sample.dtype == np.int64 and len(sample) == seq_len + 1
        np.testing.assert_array_equal(sample, stream[j * seq_len: j * seq_len + seq_len + 1])
    # Every token of the epoch is in some sample, but for the tail too short for one more sample.
    assert len(stream) - (len(ds) * seq_len + 1) < seq_len
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.parametrize("epochs, separate", [(3.5, True), (3.9, False)])
def test_multiple_epochs_and_the_separate_final_epoch(corpus, epochs, separate):
    seq_len = 5
    per_epoch = samples_per_epoch(corpus, (0, len(corpus)), seq_len)
    num_samples = int(epochs * per_epoch)
    ds = GPTDataset(corpus, (0, len(corpus)), seq_len, num_samples=num_samples, seed=1)
    num_docs = len(corpus)
    assert ds.num_epochs == 4 and len(ds) >= num_samples
    np.testing.assert_array_equal(np.bincount(ds.document_index, minlength=num_docs), np.full(num_docs, 4))
    final_epoch_docs = np.sort(ds.document_index[3 * num_docs:])
    # With a separate final epoch, its documents are one whole permutation, and the samples of the first three
    # epochs come first in the shuffle index; shuffled together, neither holds (for this seed).
    assert np.array_equal(final_epoch_docs, np.arange(num_docs)) == separate
    before_final = ((3 * corpus.num_tokens) - 1) // seq_len
    assert (ds.shuffle_index[:before_final].max() < before_final) == separate
    stream = _stream(ds)
    for i in range(0, len(ds), 7):
        j = int(ds.shuffle_index[i])
        np.testing.assert_array_equal(ds[i], stream[j * seq_len: j * seq_len + seq_len + 1])


def test_same_seed_same_order_other_seed_other_order(corpus):
    a = GPTDataset(corpus, (0, len(corpus)), 6, num_samples=100, seed=11)
    b = GPTDataset(corpus, (0, len(corpus)), 6, num_samples=100, seed=11)
    c = GPTDataset(corpus, (0, len(corpus)), 6, num_samples=100, seed=12)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.document_index, c.document_index)
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)
    np.testing.assert_array_equal(np.stack([a[i] for i in range(20)]), np.stack([b[i] for i in range(20)]))


def test_index_cache_is_reused_and_keyed_by_every_parameter(corpus, tmp_path):
    cache = tmp_path / "cache"
    first = GPTDataset(corpus, (0, 30), 8, num_samples=50, seed=2, cache_dir=cache)
    assert not first.loaded_from_cache
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and sum(f.endswith("-description.json") for f in files) == 1
    assert not any(f.endswith(".partial") for f in files)

    second = GPTDataset(corpus, (0, 30), 8, num_samples=50, seed=2, cache_dir=cache)
    assert second.loaded_from_cache and isinstance(second.shuffle_index, np.memmap)
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    # A resumed run reaches any sample directly, with the same tokens.
    for i in (len(second) - 1, 17, 0):
        np.testing.assert_array_equal(first[i], second[i])

    changes = [dict(seq_len=9), dict(seed=3), dict(num_samples=51), dict(document_range=(0, 31))]
    for change in changes:
        args = dict(document_range=(0, 30), seq_len=8, num_samples=50, seed=2) | change
        ds = GPTDataset(corpus, args["document_range"], args["seq_len"], args["num_samples"], args["seed"], cache)
        assert not ds.loaded_from_cache, change
    assert len(os.listdir(cache)) == 4 * (1 + len(changes))

    # Rewriting the dataset (a new .idx mtime) invalidates its caches too.
    stat = os.stat(f"{corpus.path_prefix}.idx")
    os.utime(f"{corpus.path_prefix}.idx", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert not GPTDataset(corpus, (0, 30), 8, num_samples=50, seed=2, cache_dir=cache).loaded_from_cache


def test_splits_are_disjoint_and_cover_every_document(corpus, tmp_path):
    train, valid, test = build_train_valid_test_datasets(corpus.path_prefix, "80,15,5", seq_len=4, seed=5,
                                                         cache_dir=tmp_path / "cache")
    ranges = [ds.document_range for ds in (train, valid, test)]
    assert ranges == split_document_ranges("80,15,5", len(corpus))
    seen = [set(np.unique(ds.document_index).tolist()) for ds in (train, valid, test)]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) == set(range(len(corpus)))
    for documents, (begin, end) in zip(seen, ranges):
        assert documents == set(range(begin, end))

    only_train = build_train_valid_test_datasets(corpus, "1", seq_len=4, num_samples=(10, 5, 5))
    assert only_train[1] is None and only_train[2] is None and len(only_train[0]) >= 10


def test_split_document_ranges_rounding_and_errors():
    assert split_document_ranges("949,50,1", 1000) == [(0, 949), (949, 999), (999, 1000)]
    assert split_document_ranges([0.98, 0.02], 100) == [(0, 98), (98, 100), (100, 100)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        weights = rng.integers(0, 5, size=3).astype(float)
        if weights.sum() == 0:
            continue
        n = int(rng.integers(0, 50))
        ranges = split_document_ranges(weights.tolist(), n)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(b <= e for b, e in ranges) and ranges[0][1] == ranges[1][0] and ranges[1][1] == ranges[2][0]
        for (b, e), w in zip(ranges, weights / weights.sum()):
            assert abs((e - b) - w * n) <= 1 + 1e-9  # each bound is within half a document of its exact place
    for bad, match in [("a,b,c", "must be a number"), ("-1,1,1", ">= 0"), ("0,0,0", "all zero"),
                       ("1,1,1,1", "4 parts"), ("", "must be a number")]:
        with pytest.raises(ValueError, match=match):
            split_document_ranges(bad, 10)


def test_bad_parameters_raise_clear_errors(corpus):
    with pytest.raises(ValueError, match="document_range"):
        GPTDataset(corpus, (0, len(corpus) + 1), 4)
    with pytest.raises(ValueError, match="document_range"):
        GPTDataset(corpus, (5, 5), 4)
    with pytest.raises(ValueError, match="seq_len"):
        GPTDataset(corpus, (0, 10), 0)
    with pytest.raises(ValueError, match="fewer than one sample"):
        GPTDataset(corpus, (0, 1), 10_000)
    with pytest.raises(ValueError, match="num_samples"):
        GPTDataset(corpus, (0, 10), 4, num_samples=0)


class _OracleTokenizer:
    """The few tokenizer fields Megatron's GPTDatasetConfig reads; the indices do not depend on them."""
    eod, pad, vocab_size = 0, 1, 60000
    unique_identifiers = {"class": "_OracleTokenizer"}


def test_indices_and_splits_match_megatron_core(corpus, tmp_path):
    mgpt = pytest.importorskip("megatron.core.datasets.gpt_dataset", reason="megatron-core is the oracle")
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
    from megatron.core.datasets.utils import Split

    seq_len, document_range = 6, (5, 38)
    per_epoch = samples_per_epoch(corpus, document_range, seq_len)
    config = mgpt.GPTDatasetConfig(
        random_seed=5, sequence_length=seq_len, blend=([corpus.path_prefix], None), split="1,0,0",
        tokenizer=_OracleTokenizer(), reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        path_to_cache=str(tmp_path / "megatron_cache"))
    # One epoch, two epochs with a separate final one, four epochs shuffled together.
    for num_samples in (None, int(1.2 * per_epoch), int(3.95 * per_epoch)):
        theirs = mgpt.GPTDataset(MegatronIndexedDataset(corpus.path_prefix), corpus.path_prefix,
                                 np.arange(*document_range, dtype=np.int32), num_samples, Split.train, config)
        ours = GPTDataset(corpus, document_range, seq_len, num_samples, seed=5)
        for name in ("document_index", "sample_index", "shuffle_index"):
            mine, megatron = getattr(ours, name), getattr(theirs, name)
            assert mine.dtype == megatron.dtype, name
            np.testing.assert_array_equal(mine, megatron, err_msg=f"{name}, num_samples={num_samples}")
        for i in (0, len(ours) // 2, len(ours) - 1):
            np.testing.assert_array_equal(ours[i][:-1], theirs[i]["tokens"].numpy())
            np.testing.assert_array_equal(ours[i][1:], theirs[i]["labels"].numpy())

    rng = np.random.default_rng(4)
    for _ in range(200):
        split = ",".join(str(int(w)) for w in rng.integers(0, 6, size=int(rng.integers(1, 4))))
        if not any(int(w) for w in split.split(",")):
            continue
        n = int(rng.integers(0, 60))
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        for (begin, end), bookends in zip(split_document_ranges(split, n), matrix):
            if bookends is None:  # Megatron builds no dataset for an empty split
                assert begin == end, (split, n)
            else:  # Megatron-core's builder: int(round(bookend * num_elements))
                assert (begin, end) == tuple(int(round(b * float(n))) for b in bookends), (split, n)


_RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from megagpt.data.gpt_dataset import GPTDataset
from megagpt.data.indexed import IndexedDataset
rank, init_file, prefix, cache, out = int(sys.argv[1]), *sys.argv[2:]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
ds = GPTDataset(IndexedDataset(prefix), (0, 40), 5, num_samples=300, seed=9, cache_dir=cache)
json.dump({"loaded": ds.loaded_from_cache, "sample": ds[123].tolist()}, open(out, "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_only_rank_zero_builds_the_cache(corpus, tmp_path):
    import json
    import subprocess
    import sys

    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(rank), str(tmp_path / "rendezvous"),
                               corpus.path_prefix, str(cache), str(tmp_path / f"rank{rank}.json")])
             for rank in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    results = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in range(2)]
    assert [r["loaded"] for r in results] == [False, True]
    assert results[0]["sample"] == results[1]["sample"]
    assert len(os.listdir(cache)) == 4
