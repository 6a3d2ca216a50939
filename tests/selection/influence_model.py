"""Helpers (not fixtures) for the influence tests. The test model: a 2-layer byte-sized GPT trained for a moment on documents that count up (mod 60)
in steps of 1 or 3, and a held-out stream that counts in steps of 1 only, so that documents differ in how much
they help it."""
import numpy as np
import torch

from megagpt.config import ModelConfig

VOCAB, SEQ_LEN = 64, 16


def counting_documents(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        length, start, step = int(rng.integers(2, 40)), int(rng.integers(0, 60)), int(rng.choice([1, 3]))
        docs.append((start + step * np.arange(length)) % 60)
    return docs


def test_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=VOCAB, seq_len=SEQ_LEN, d_model=32, num_layers=2, num_heads=2,
                  make_vocab_size_divisible_by=64)
    return ModelConfig(**(values | overrides))


def train_test_model(steps: int = 60, **overrides):
    """(model, AdamW optimizer) after ``steps`` steps on ``counting_documents`` (about a second on one thread)."""
    from megagpt.model import GPT

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(test_config(**overrides))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    stream = torch.as_tensor(np.concatenate(counting_documents(400, 1)))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (8,), generator=generator)
        batch = torch.stack([stream[s:s + SEQ_LEN + 1] for s in starts])
        loss = model.loss(model(batch[:, :-1]), batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    return model.eval(), optimizer
