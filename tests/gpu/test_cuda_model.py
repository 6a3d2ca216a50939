"""The GPT on CUDA with the Triton attention backend, in bf16 as DeepSpeed trains it: logits, loss and every
parameter gradient against the same weights in float64 (reference attention), and KV-cached decoding.

Skipped without CUDA; ``MEGAGPT_GPU_CHECK_DRY=1`` runs them at toy sizes in the Triton interpreter (conftest.py).
A whole bf16 model differs from float64 by bf16 rounding in every matmul, so the Triton model is judged beside a
peer: the same bf16 model with PyTorch's SDPA attention must not be much closer to float64 than ours (a wrong
kernel is off by O(1); rounding differences between two right ones stay within a small factor).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from megagpt.config import ModelConfig
from megagpt.generate import KVCache
from megagpt.model import GPT

ON_GPU = torch.cuda.is_available()
DRY = os.environ.get("MEGAGPT_GPU_CHECK_DRY") == "1"
pytestmark = pytest.mark.skipif(not (ON_GPU or DRY), reason="needs CUDA (or MEGAGPT_GPU_CHECK_DRY=1)")

# gpt127/gpt1b use head_dim 128 and parallel residual with ALiBi; 1000 is not a multiple of any block size.
SHAPE = (dict(vocab_size=1000, seq_len=1000, d_model=256, num_layers=2, num_heads=2, head_dim=128) if ON_GPU
         else dict(vocab_size=97, seq_len=40, d_model=64, num_layers=2, num_heads=2, head_dim=64))
PEER_FACTOR, ABSOLUTE_SLACK = 2.0, 1e-2


def build(backend: str, dtype: torch.dtype, device: str) -> GPT:
    config = ModelConfig(**SHAPE, position="alibi", parallel_residual=True, attention_backend=backend)
    return GPT(config, init_seed=7).to(device=device, dtype=dtype)  # same init_seed: the same weights


def forward_backward(model: GPT, tokens: torch.Tensor, plain_loss: bool = False):
    """(logits, loss, {parameter name: gradient}); ``plain_loss``: float64 cross-entropy instead of the model's own
    loss path (which may use fused kernels that take no float64)."""
    logits = model(tokens[:, :-1])
    if plain_loss:
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    else:
        loss = model.loss(logits, tokens[:, 1:])
    loss.backward()
    return logits.detach(), loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_bf16_triton_model_is_as_close_to_float64_as_sdpa(device, relative_error):
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, SHAPE["seq_len"] + 1),
                           generator=torch.Generator().manual_seed(0)).to(device)
    # The float64 truth runs on the CPU with plain PyTorch attention: no kernel of ours, on any device.
    truth = forward_backward(build("reference", torch.float64, "cpu"), tokens.cpu(), plain_loss=True)
    results = {backend: forward_backward(build(backend, torch.bfloat16, device), tokens)
               for backend in ("triton", "sdpa")}
    names = ["logits", "loss"] + list(truth[2])
    errors = {backend: [relative_error(r[0], truth[0]), relative_error(r[1], truth[1])]
              + [relative_error(r[2][n], truth[2][n]) for n in truth[2]] for backend, r in results.items()}
    for name, triton_err, sdpa_err in zip(names, errors["triton"], errors["sdpa"]):
        assert triton_err <= max(PEER_FACTOR * sdpa_err, ABSOLUTE_SLACK), (
            f"{name}: triton bf16 model error {triton_err:.3e} vs sdpa bf16 model {sdpa_err:.3e} (both against "
            "float64)")


def test_kv_cached_decoding_matches_the_full_forward(device, assert_relative_error):
    model = build("triton", torch.bfloat16, device).eval()
    seq = SHAPE["seq_len"]
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(1)).to(device)
    prompt = seq - 5
    with torch.no_grad():
        full = model(tokens).float()
        cache = KVCache(SHAPE["num_layers"], seq)
        pieces = [model(tokens[:, :prompt], kv_cache=cache)[:, -1:]]
        for position in range(prompt, seq):  # one token at a time: seq_q = 1 against a growing seq_k
            pieces.append(model(tokens[:, position:position + 1], kv_cache=cache))
    decoded = torch.cat(pieces, dim=1).float()
    assert_relative_error("decoded logits", decoded, full[:, prompt - 1:], 5e-2)
