"""Small indexed datasets for the selection tests."""
import numpy as np
import pytest

from megagpt.data.indexed import IndexedDatasetWriter


def write_dataset(prefix, documents, dtype=np.uint16) -> str:
    with IndexedDatasetWriter(prefix, dtype=dtype) as writer:
        for doc in documents:
            writer.add_document(np.asarray(doc))
    return str(prefix)


def random_documents(n: int, seed: int = 0, vocab: int = 257, max_len: int = 90) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, max_len))) for _ in range(n)]


@pytest.fixture
def small_dataset(tmp_path):
    docs = random_documents(40)
    return write_dataset(tmp_path / "corpus", docs), docs
