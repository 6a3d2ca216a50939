"""Small indexed datasets for the selection tests (helpers handed out as fixtures: tests/ is not a package)."""
import numpy as np
import pytest

from megagpt.data.indexed import IndexedDatasetWriter


def _write_dataset(prefix, documents, dtype=np.uint16) -> str:
    with IndexedDatasetWriter(prefix, dtype=dtype) as writer:
        for doc in documents:
            writer.add_document(np.asarray(doc))
    return str(prefix)


def _random_documents(n: int, seed: int = 0, vocab: int = 257, max_len: int = 90) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, max_len))) for _ in range(n)]


@pytest.fixture
def write_dataset():
    """``write_dataset(prefix, documents, dtype=uint16) -> prefix``: one document per sequence."""
    return _write_dataset


@pytest.fixture
def random_documents():
    """``random_documents(n, seed=0, vocab=257, max_len=90)``: lengths 1 .. max_len - 1."""
    return _random_documents


@pytest.fixture
def small_dataset(tmp_path):
    docs = _random_documents(40)
    return _write_dataset(tmp_path / "corpus", docs), docs


@pytest.fixture(scope="session")
def byte_checkpoint(tmp_path_factory):
    """A consolidated checkpoint of a tiny random byte-level GPT (seq_len 32) that records its tokenizer."""
    import torch

    from megagpt.config import ModelConfig
    from megagpt.convert.weights import save_model_weights
    from megagpt.model import GPT

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=257, seq_len=32, d_model=32, num_layers=2, num_heads=2,
                         make_vocab_size_divisible_by=64, init_std=0.3)
    model = GPT(config)
    out = tmp_path_factory.mktemp("ckpt") / "byte"
    save_model_weights(model.state_dict(), out, config={"model": config.to_dict(),
                                                        "tokenizer": {"type": "ByteLevelTokenizer"}})
    return str(out)
