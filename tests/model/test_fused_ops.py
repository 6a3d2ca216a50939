"""The model with the fused LayerNorm and cross-entropy (megagpt/model/fused_ops.py) against the plain model.

Without a GPU the fused kernels run in the Triton interpreter (tests/model/conftest.py sets TRITON_INTERPRET):
the tests widen ``fused_kernels_run_on`` to CPU tensors, which the model never does by itself. Tolerance for the
fp32 loss and gradients: 1e-5 absolute and relative (fp32 rounding of a few layers; the kernels keep fp32
statistics, the plain ops do too).
"""
import dataclasses

import pytest
import torch
from torch import nn

import megagpt.kernels as kernels
from megagpt.config import ModelConfig
from megagpt.model import GPT, LayerNorm, language_model_loss
from megagpt.model import fused_ops

TINY = ModelConfig(vocab_size=300, seq_len=16, d_model=32, num_layers=2, num_heads=2, attention_backend="sdpa")
FP32 = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Run the fused kernels (interpreted) for CPU tensors, and count their calls."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fused_ops, "fused_kernels_run_on", lambda device: True)
    calls = {"layer_norm": 0, "cross_entropy": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(kernels, "fused_layer_norm", counting("layer_norm", kernels.fused_layer_norm))
    monkeypatch.setattr(kernels, "fused_cross_entropy", counting("cross_entropy", kernels.fused_cross_entropy))
    return calls


def loss_and_grads(model: GPT, tokens: torch.Tensor):
    model.zero_grad()
    loss = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("shared_layernorm", [False, True])
def test_fused_model_matches_plain_model(shared_layernorm, fused_on_cpu):
    config = dataclasses.replace(TINY, shared_layernorm=shared_layernorm)
    torch.manual_seed(0)
    fused = GPT(config)
    plain = GPT(dataclasses.replace(config, fused_kernels=False))
    plain.load_state_dict(fused.state_dict())
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_len), generator=torch.Generator().manual_seed(1))
    fused_loss, fused_grads = loss_and_grads(fused, tokens)
    layer_norms = sum(isinstance(m, LayerNorm) for m in fused.modules())
    assert fused_on_cpu == {"layer_norm": layer_norms, "cross_entropy": 1}  # the fused path really ran
    plain_loss, plain_grads = loss_and_grads(plain, tokens)
    assert fused_on_cpu == {"layer_norm": layer_norms, "cross_entropy": 1}  # the plain model never calls it
    torch.testing.assert_close(fused_loss, plain_loss, **FP32)
    assert fused_grads.keys() == plain_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], **FP32, msg=lambda m: f"{name}: {m}")


def test_fused_loss_handles_padded_vocab_and_ignored_targets(fused_on_cpu):
    # The model's logits are a [..., :vocab_size] slice of the padded projection: strided rows, no copy needed.
    gen = torch.Generator().manual_seed(2)
    padded = torch.randn(2, 5, 384, generator=gen)
    logits = padded[..., :300].requires_grad_()
    targets = torch.randint(0, 300, (2, 5), generator=gen)
    targets[0, 1] = -100
    fused = language_model_loss(logits, targets, fused=True)
    assert fused_on_cpu["cross_entropy"] == 1
    (fused_grad,) = torch.autograd.grad(fused, logits)
    plain = language_model_loss(logits, targets, fused=False)
    (plain_grad,) = torch.autograd.grad(plain, logits)
    torch.testing.assert_close(fused, plain, **FP32)
    torch.testing.assert_close(fused_grad, plain_grad, **FP32)


def test_cpu_tensors_keep_the_plain_ops_by_default(monkeypatch):
    # Only CUDA tensors take the fused path: CPU training, evaluation and tests keep nn.LayerNorm and F.cross_entropy.
    monkeypatch.setattr(kernels, "fused_layer_norm", None)  # would fail if called
    monkeypatch.setattr(kernels, "fused_cross_entropy", None)
    model = GPT(TINY)
    tokens = torch.randint(0, TINY.vocab_size, (1, 8))
    model.loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    assert not fused_ops.fused_kernels_run_on(torch.device("cpu"))
    assert fused_ops.fused_kernels_run_on(torch.device("cuda", 1))


def test_layer_norm_keeps_nn_layernorm_state_and_type():
    norm = LayerNorm(16, eps=1e-6, bias=False, fused=True)
    assert isinstance(norm, nn.LayerNorm) and set(norm.state_dict()) == {"weight"}
    assert "fused=True" in repr(norm)
    x = torch.randn(3, 16)
    torch.testing.assert_close(norm(x), nn.functional.layer_norm(x, (16,), norm.weight, None, 1e-6))


def test_fused_kernels_config_switch():
    assert TINY.fused_kernels is True
    with pytest.raises(ValueError, match="model.fused_kernels must be true or false"):
        dataclasses.replace(TINY, fused_kernels="yes")
