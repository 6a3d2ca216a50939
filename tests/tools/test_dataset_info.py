"""tools/dataset_info.py: the demo's summary of a dataset and its split samples."""

import numpy as np

from megagpt.data.indexed import IndexedDatasetWriter
from testing_utils import load_script

dataset_info = load_script("tools/dataset_info.py")


def test_describe_counts_documents_tokens_and_samples(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, size=n) for n in rng.integers(5, 60, size=40)]
    with IndexedDatasetWriter(tmp_path / "d") as w:
        for d in docs:
            w.add_document(d)
    info = dataset_info.describe(str(tmp_path / "d"), "3,1,0", seq_len=8, seed=1, cache_dir=None)
    assert info["documents"] == 40 and info["tokens"] == sum(map(len, docs))
    train, valid, test = (info["splits"][k] for k in ("train", "valid", "test"))
    assert (train["documents"], valid["documents"], test["documents"]) == (30, 10, 0)
    assert train["samples_per_epoch"] == (sum(map(len, docs[:30])) - 1) // 8
    assert test["samples_per_epoch"] == 0
