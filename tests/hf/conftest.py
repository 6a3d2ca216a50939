"""Tiny randomly initialised megagpt models for the Hugging Face export/import tests."""
import pytest
import torch

from megagpt.config import ModelConfig
from megagpt.convert.weights import ModelWeights
from megagpt.model import GPT

# vocab 100 pads to 128 (divisible by 64): the padded rows are dropped on export and zero-filled on import.
# init_std 0.2 spreads the logits, so a greedy argmax is never a near tie that float noise could flip.
TINY = {"vocab_size": 100, "seq_len": 32, "d_model": 32, "num_layers": 2, "num_heads": 4,
        "make_vocab_size_divisible_by": 64, "init_std": 0.2}


def tiny_gpt(seed: int = 0, **overrides) -> tuple[GPT, ModelWeights]:
    """An eval-mode GPT with random weights (LayerNorm and bias parameters randomised too) and its ModelWeights."""
    config = ModelConfig.from_dict({**TINY, **overrides})
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():  # GPT initialises LayerNorms to 1/0 and biases to 0: make every mapped tensor distinct
        for name, param in model.named_parameters():
            if "ln" in name or name.endswith("bias") or name.startswith(f"layers.{config.num_layers + 1}."):
                param.add_(torch.randn_like(param) * 0.1)
    weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    return model, ModelWeights({"model": config.to_dict()}, weights, "tiny test model")


@pytest.fixture(scope="session")
def make_tiny_gpt():
    """``tiny_gpt``: ``make_tiny_gpt(seed=0, **model overrides) -> (GPT, ModelWeights)``."""
    return tiny_gpt


@pytest.fixture
def tokens():
    """A fixed [3, 32] batch of token ids below the tiny vocabulary."""
    return torch.randint(0, TINY["vocab_size"], (3, TINY["seq_len"]), generator=torch.Generator().manual_seed(1))
