"""ALiBi flash attention (Triton) against its float64 PyTorch reference, forward and gradients.

Runs compiled on CUDA when present, else in the Triton interpreter (see conftest.py). Tolerances (absolute and
relative, torch.testing.assert_close) per input dtype, for outputs and gradients of O(1) size:
- fp32: 2e-5 — the interpreter's fp32 dots are exact and the GPU path uses input_precision="ieee", so only
  fp32 rounding of the softmax and of the accumulations remains;
- fp16: 1e-2 — outputs are rounded to fp16 (2**-11 relative) and P / dS are cast to fp16 for the tensor-core dots;
- bf16: 5e-2 — the same with bf16's 2**-8 relative rounding.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megagpt.kernels import alibi_attention_reference, alibi_causal_bias, alibi_flash_attention
from megagpt.kernels import alibi_attention as attention_module
from megagpt.kernels.attention_configs import head_chunks

TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ON_GPU = torch.cuda.is_available()


def press_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes of Press et al. (https://github.com/ofirpress/attention_with_linear_biases), fp32 ``[heads]``.

    A geometric sequence starting at ``2**(-8/n)``; for a head count that is not a power of two, the slopes of the
    closest lower power of two followed by every other slope of twice that.
    """

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    if closest != num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def make_inputs(batch, heads, seq_q, seq_k, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, s, head_dim, generator=gen).to(device=device, dtype=dtype)
               for s in (seq_q, seq_k, seq_k))
    return q, k, v, press_slopes(heads).to(device)


def check_against_reference(q, k, v, slopes, softmax_scale=None, backward=True):
    """Run kernel and float64 reference on the same (rounded) inputs; compare output and dq, dk, dv."""
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    out = alibi_flash_attention(q, k, v, slopes, softmax_scale)
    q64, k64, v64 = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    ref = alibi_attention_reference(q64, k64, v64, slopes.double(), softmax_scale)
    tol = TOLERANCE[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    if backward:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
        out.backward(grad_out)
        ref.backward(grad_out.double())
        for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
            assert got.dtype == q.dtype, name
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "batch, heads, seq, head_dim, dtype",
    [
        (1, 1, 1, 32, torch.float32),  # a single token
        (1, 2, 17, 32, torch.float32),  # shorter than one block
        (2, 3, 33, 64, torch.float16),  # 3 heads: Press's non-power-of-two slopes
        (1, 2, 100, 32, torch.float32),  # several blocks, last one partial
        (1, 1, 64, 128, torch.float16),  # a multiple of every interpreter block
        (2, 1, 37, 128, torch.float32),
        (1, 3, 100, 64, torch.float16),
    ],
)
def test_matches_reference(batch, heads, seq, head_dim, dtype, device):
    check_against_reference(*make_inputs(batch, heads, seq, seq, head_dim, dtype, device))


def test_bf16_matches_reference(device):
    # On CPU this runs the interpreter path that upcasts bf16 tiles to fp32 right after loading (the interpreter's
    # bf16 arithmetic is wrong); on a GPU the native bf16 tensor-core path.
    check_against_reference(*make_inputs(2, 2, 45, 45, 64, torch.bfloat16, device))


def test_custom_softmax_scale(device):
    check_against_reference(*make_inputs(1, 2, 50, 50, 32, torch.float32, device), softmax_scale=0.37)


def test_non_contiguous_layout(device):
    # The model's projections give [batch, seq, heads, head_dim]; transposing to SDPA's layout must need no copy.
    q, k, v = (torch.randn(2, 33, 3, 32, generator=torch.Generator().manual_seed(i)).to(device).transpose(1, 2)
               for i in range(3))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, press_slopes(3).to(device))


@pytest.mark.parametrize("seq_q, seq_k", [(1, 37), (5, 40), (17, 100)])
def test_decode_forward_queries_are_last_positions(seq_q, seq_k, device):
    check_against_reference(*make_inputs(1, 2, seq_q, seq_k, 32, torch.float32, device), backward=False)


def test_decode_backward(device):
    # Not needed for generation, but the kernels handle the position offset everywhere, so hold them to it.
    check_against_reference(*make_inputs(1, 2, 21, 50, 32, torch.float32, device))


def test_decode_forward_equals_last_rows_of_full_attention(device):
    q, k, v, slopes = make_inputs(1, 2, 40, 40, 64, torch.float32, device)
    full = alibi_flash_attention(q, k, v, slopes)
    last = alibi_flash_attention(q[:, :, -7:], k, v, slopes)
    torch.testing.assert_close(last, full[:, :, -7:], atol=2e-6, rtol=2e-6)


@pytest.mark.skipif(ON_GPU, reason="interpreter block sizes only; the GPU's come from attention_configs")
@pytest.mark.parametrize("fwd_blocks, dkdv_blocks", [((16, 16), (16, 16)), ((16, 32), (32, 16)), ((32, 32), (32, 32))])
def test_other_block_shapes(fwd_blocks, dkdv_blocks, device, monkeypatch):
    # The GPU configs mix BLOCK_M > BLOCK_N, BLOCK_M < BLOCK_N and equal; the diagonal/off-diagonal split must be
    # right for each. The interpreter lets us pick the blocks directly.
    fwd = {"BLOCK_M": fwd_blocks[0], "BLOCK_N": fwd_blocks[1]}
    monkeypatch.setattr(attention_module._alibi_attn_fwd, "interpreter_config", fwd)
    monkeypatch.setattr(attention_module._alibi_attn_bwd_dq, "interpreter_config", fwd)
    monkeypatch.setattr(attention_module._alibi_attn_bwd_dkdv, "interpreter_config",
                        {"BLOCK_M": dkdv_blocks[0], "BLOCK_N": dkdv_blocks[1]})
    check_against_reference(*make_inputs(1, 1, 45, 45, 32, torch.float32, device))
    check_against_reference(*make_inputs(1, 1, 19, 50, 32, torch.float32, device))  # decode offset


def test_saved_tensors_are_linear_in_sequence(device):
    batch, heads, seq, head_dim = 1, 2, 100, 32
    q, k, v, slopes = make_inputs(batch, heads, seq, seq, head_dim, torch.float32, device)
    q.requires_grad_(True)
    out = alibi_flash_attention(q, k, v, slopes)
    saved = out.grad_fn.saved_tensors
    assert seq * seq > q.numel(), "shape chosen so that an s x s buffer would be the largest tensor"
    assert max(t.numel() for t in saved) <= q.numel(), [tuple(t.shape) for t in saved]
    assert any(t.shape == (batch * heads, seq) and t.dtype == torch.float32 for t in saved), "log-sum-exp missing"


def test_reference_matches_sdpa_with_float_mask():
    # The reference itself, checked against PyTorch's SDPA given the explicit ALiBi bias as an additive mask.
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, s, 16, generator=gen, dtype=torch.float64) for s in (9, 20, 20))
    slopes = press_slopes(3).double()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=alibi_causal_bias(slopes, 9, 20))
    torch.testing.assert_close(alibi_attention_reference(q, k, v, slopes), sdpa, atol=1e-12, rtol=1e-12)


def test_press_slopes_follow_the_paper():
    # Power of two: the geometric sequence 2**(-8/n * i); 3 heads: 2 heads' slopes, then the 1st of 4 heads'.
    torch.testing.assert_close(press_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    torch.testing.assert_close(press_slopes(3), torch.tensor([2.0 ** -4, 2.0 ** -8, 2.0 ** -2]))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v, s: (q[..., :16].repeat(1, 1, 1, 3), k[..., :16].repeat(1, 1, 1, 3),
                             v[..., :16].repeat(1, 1, 1, 3), s), "head_dim"),
        (lambda q, k, v, s: (q, k[:, :, :3], v[:, :, :3], s), "seq_q"),
        (lambda q, k, v, s: (q, k, v, s[:1]), "slopes"),
        (lambda q, k, v, s: (q.half(), k, v, s), "dtype"),
        (lambda q, k, v, s: (q[0], k[0], v[0], s), "batch, heads, seq, head_dim"),
    ],
)
def test_rejects_bad_inputs(change, message, device):
    q, k, v, slopes = make_inputs(1, 2, 5, 5, 32, torch.float32, device)
    with pytest.raises(ValueError, match=message):
        alibi_flash_attention(*change(q, k, v, slopes))


@pytest.mark.skipif(ON_GPU, reason="checks the error for CPU tensors without the interpreter")
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, slopes = make_inputs(1, 1, 4, 4, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        alibi_flash_attention(q, k, v, slopes)


def test_backward_for_every_diagonal_offset(device):
    # Where the diagonal crosses a key block depends on (seq_k - seq_q) modulo the block sizes; an off-by-one in
    # the masked/unmasked split shows only for some offsets, so sweep one full interpreter block of them.
    for offset in range(16):
        check_against_reference(*make_inputs(1, 1, 18, 18 + offset, 16, torch.float32, device, seed=offset))


def test_head_chunked_launches_match_reference(device, monkeypatch):
    # 5 (batch, head) pairs in launches of at most 2 (CUDA's grid-y limit is 65,535): bh_start must offset every
    # tensor and the saved statistics.
    monkeypatch.setattr(attention_module, "head_chunks", lambda n: head_chunks(n, limit=2))
    check_against_reference(*make_inputs(5, 1, 20, 20, 16, torch.float32, device))


def test_int64_offset_path_matches_reference(device, monkeypatch):
    # The path long strided inputs take (attention_configs.needs_int64_offsets), on a small shape.
    monkeypatch.setattr(attention_module, "needs_int64_offsets", lambda *tensors: True)
    check_against_reference(*make_inputs(1, 2, 19, 40, 16, torch.float32, device))
