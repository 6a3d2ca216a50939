"""megagpt's Triton kernels compiled for CUDA, against their float64 references: ALiBi flash attention forward and
backward (bf16 and fp16, head dims 64 and 128, odd lengths up to 8,192, KV-cache shapes), fused LayerNorm and
fused cross-entropy.

Skipped without CUDA; ``MEGAGPT_GPU_CHECK_DRY=1`` runs them at toy sizes in the Triton interpreter (conftest.py).
The references run in float64 on the same device, on the same (rounded) inputs. Tolerances are on
``max |error| / max |reference|`` per tensor: far above rounding (the kernels round P and dS to the input dtype for
the tensor-core dots, 2**-8 relative in bf16, 2**-11 in fp16, and the outputs once more), far below what a wrong mask,
bias or scale gives (O(1)). Attention tensors are O(1) by construction (standard normal q, k, v, dO), so their
denominator is at least 1: dq of a single token is exactly zero in float64 and rounding-sized in the kernel.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from megagpt.kernels import (alibi_attention_reference, alibi_flash_attention, cross_entropy_reference,
                             fused_cross_entropy, fused_layer_norm, layer_norm_reference)
from megagpt.model.alibi import alibi_slopes

ON_GPU = torch.cuda.is_available()
DRY = os.environ.get("MEGAGPT_GPU_CHECK_DRY") == "1"
pytestmark = pytest.mark.skipif(not (ON_GPU or DRY), reason="needs CUDA (or MEGAGPT_GPU_CHECK_DRY=1)")

TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# (batch, heads, seq): one token, shorter than a block, just under a power of two, odd lengths across many blocks,
# and 8,192 (the longest the benchmark runs). Long sequences get fewer heads: the float64 reference keeps
# several [batch, heads, seq, seq] tensors (1 GiB each at 2 x 8192^2).
ATTENTION_SHAPES = ([(2, 3, 1), (2, 3, 17), (2, 3, 127), (1, 4, 1000), (1, 2, 2049), (1, 2, 4095), (1, 2, 8192)]
                    if ON_GPU else [(2, 3, 1), (1, 3, 17), (1, 2, 70)])
KV_CACHE_SHAPES = [(1, 1000), (7, 1000), (129, 2049)] if ON_GPU else [(1, 40), (7, 40)]


def random_tensor(shape, dtype, device, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def attention_against_reference(batch, heads, seq_q, seq_k, head_dim, dtype, device, backward, check):
    """Kernel vs float64 reference on the same inputs; output and (``backward``) dq, dk, dv."""
    q = random_tensor((batch, heads, seq_q, head_dim), dtype, device, 1)
    k, v = (random_tensor((batch, heads, seq_k, head_dim), dtype, device, seed) for seed in (2, 3))
    slopes = alibi_slopes(heads).to(device)
    q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
    out = alibi_flash_attention(q, k, v, slopes)
    q64, k64, v64 = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    ref = alibi_attention_reference(q64, k64, v64, slopes.double())
    assert out.dtype == dtype and out.shape == q.shape
    tol = TOLERANCE[dtype]
    check("out", out, ref, tol, 1.0)
    if backward:
        grad_out = random_tensor(out.shape, dtype, device, 4)
        got = torch.autograd.grad(out, (q, k, v), grad_out)
        want = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            assert g.dtype == dtype, name
            check(name, g, w, tol, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch, heads, seq", ATTENTION_SHAPES, ids=lambda x: str(x))
def test_alibi_attention_forward_and_backward(batch, heads, seq, head_dim, dtype, device, assert_relative_error):
    attention_against_reference(batch, heads, seq, seq, head_dim, dtype, device, True, assert_relative_error)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_q, seq_k", KV_CACHE_SHAPES, ids=lambda x: str(x))
def test_alibi_attention_kv_cache_queries(seq_q, seq_k, dtype, device, assert_relative_error):
    # Decoding: the queries are the last seq_q of seq_k positions (seq_q = 1 is one generated token).
    attention_against_reference(2, 4, seq_q, seq_k, 128, dtype, device, False, assert_relative_error)


def test_alibi_attention_model_layout_strides(device, assert_relative_error):
    # The model hands the kernel q, k, v as views of one fused QKV projection ([b, s, h, 3, d] permuted, as in
    # megagpt/model/gpt.py): non-contiguous batch/head/sequence strides, unit head_dim stride.
    batch, seq, heads, head_dim = 2, (1000 if ON_GPU else 40), 4, 64
    qkv = random_tensor((batch, seq, heads, 3, head_dim), torch.bfloat16, device, 5)
    q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
    assert not q.is_contiguous()
    slopes = alibi_slopes(heads).to(device)
    out = alibi_flash_attention(q, k, v, slopes)
    ref = alibi_attention_reference(q.double(), k.double(), v.double(), slopes.double())
    assert_relative_error("out", out, ref, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(4096, 2048), (333, 1024), (7, 4097)] if ON_GPU else [(33, 64), (5, 97)])
def test_fused_layer_norm_forward_and_backward(rows, hidden, dtype, device, assert_relative_error):
    x = random_tensor((rows, hidden), dtype, device, 6, scale=3.0).requires_grad_()
    weight = (1 + random_tensor((hidden,), dtype, device, 7, scale=0.1)).requires_grad_()
    bias = random_tensor((hidden,), dtype, device, 8, scale=0.1).requires_grad_()
    out = fused_layer_norm(x, weight, bias)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    ref = layer_norm_reference(x64, w64, b64)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    assert_relative_error("out", out, ref, tol)
    grad_out = random_tensor(out.shape, dtype, device, 9)
    got = torch.autograd.grad(out, (x, weight, bias), grad_out)
    want = torch.autograd.grad(ref, (x64, w64, b64), grad_out.double())
    for name, g, w in zip(("dx", "dweight", "dbias"), got, want):
        assert_relative_error(name, g, w, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, vocab", [(4096, 50304), (1023, 50257)] if ON_GPU else [(17, 300), (9, 1000)])
def test_fused_cross_entropy_forward_and_backward(rows, vocab, dtype, device, assert_relative_error):
    logits = random_tensor((rows, vocab), dtype, device, 10, scale=4.0).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(11)).to(device)
    targets[::5] = -100  # ignored positions (padding) must add nothing and not count in the mean
    loss = fused_cross_entropy(logits, targets, z_loss=1e-4)
    logits64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(logits64, targets, z_loss=1e-4)
    # The loss is accumulated in fp32 from rounded logits: fp32-sized error relative to a loss of ~10.
    assert_relative_error("loss", loss, ref, 1e-4)
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_ref,) = torch.autograd.grad(ref, logits64)
    assert grad.dtype == dtype
    assert_relative_error("dlogits", grad, grad_ref, TOLERANCE[dtype])
    assert math.isfinite(loss.item())
