"""Tiny byte-level GPTs for the evaluation tests: a random one with sharp (context-dependent) predictions, and one
trained for a few seconds on a handful of sentences so that some LAMBADA / multiple-choice answers are right."""
import pytest
import torch

from megagpt.config import ModelConfig
from megagpt.data.tokenizers import ByteLevelTokenizer

SENTENCES = "the cat sat on the mat. the dog ate the bone. a bird sang in the tree. "


def byte_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=257, seq_len=32, d_model=32, num_layers=2, num_heads=2, make_vocab_size_divisible_by=64,
                  init_std=0.3)  # a large init: logits far from uniform, so a wrong context shows in the NLL
    return ModelConfig(**(values | overrides))


def random_model(**overrides):
    from megagpt.model import GPT

    torch.manual_seed(0)
    return GPT(byte_config(**overrides)).eval()


@pytest.fixture(scope="session")
def byte_model():
    return random_model()


@pytest.fixture(scope="session")
def trained_byte_model():
    """200 AdamW steps on SENTENCES repeated (about a second on one CPU thread)."""
    from megagpt.model import GPT

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread, and never waits for a busy core
    torch.manual_seed(0)
    model = GPT(byte_config(init_std=0.02))
    data = torch.as_tensor(ByteLevelTokenizer().encode(SENTENCES * 20))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        starts = torch.randint(0, len(data) - 33, (16,), generator=generator)
        batch = torch.stack([data[s:s + 33] for s in starts])
        loss = model.loss(model(batch[:, :-1]), batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    assert loss.item() < 0.5, f"the tiny model did not learn the sentences: loss {loss.item():.3f}"
    return model.eval()


@pytest.fixture(scope="session")
def make_model():
    """``make_model(**model_config_overrides)``: a seeded random byte-level GPT in eval mode."""
    return random_model


@pytest.fixture(scope="session")
def naive_logprob():
    """``naive_logprob(model, context_ids, continuation_ids) -> (logprob, greedy)``."""
    return _naive_logprob


def _naive_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Summed log-probability of ``continuation`` after ``context`` from one unbatched forward, and whether each of
    its tokens is the argmax: written independently of megagpt.evaluation."""
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens[:, :-1]).double(), dim=-1)[0]
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    total = sum(logprobs[p, t].item() for p, t in zip(positions, continuation))
    greedy = all(logprobs[p].argmax().item() == t for p, t in zip(positions, continuation))
    return total, greedy
