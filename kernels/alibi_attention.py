"""Causal flash attention with ALiBi (forward and backward) in Triton; the plain reference is
``alibi_attention_reference.py``.

Layout: ``q`` ``[batch, heads, seq_q, head_dim]``, ``k`` and ``v`` ``[batch, heads, seq_k, head_dim]`` (as
PyTorch's SDPA), ``seq_q <= seq_k``; query row ``r`` sits at absolute position ``i = seq_k - seq_q + r`` (KV-cache
decoding; training has ``seq_q == seq_k``). For key ``j <= i``::

    score[i, j] = q_i . k_j * softmax_scale - slope_h * (i - j)

FlashAttention-2 (Dao, 2023, https://arxiv.org/abs/2307.08691), as in Triton's fused-attention tutorial:

- forward: grid (query blocks, batch * heads); each program streams key blocks with an online softmax. Key blocks
  wholly left of the diagonal run without any mask; only the blocks crossing it are masked, and blocks right of
  it are never visited. Scores live in the log2 domain (``log2(e)`` folded into the scale and the slope) so the
  softmax uses ``exp2``. Only the per-row log-sum-exp (log2 domain, fp32, ``[batch * heads, seq_q]``) is saved;
  memory is O(seq), never O(seq^2).
- backward: ``delta = rowsum(dO * O)``; one kernel per key block walks the query blocks below it for dK and dV,
  another per query block walks the key blocks for dQ, recomputing P from the log-sum-exp. No atomics.

Block sizes on a GPU come from ``attention_configs.select_config``: a fixed rule checked against the compiled
kernel's shared memory, never timing, so the same shape on the same GPU model always runs the same blocks (and a
resumed run repeats the uninterrupted one). Launches cover at most 65,535 (batch, head) pairs each (CUDA's grid-y
limit), and per-row offsets switch to int64 when they could pass 2**31.

The ALiBi bias is rebuilt from block indices in the kernels; no bias tensor exists. Dots run on the input dtype
(fp16/bf16 tensor cores; fp32 with ``input_precision="ieee"``) with fp32 accumulation; softmax statistics are fp32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_device, check_same_device, triton_kernel, upcast_after_load
from .attention_configs import gpu_launch_meta, head_chunks, needs_int64_offsets, row_block_name

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Interpreter: small, unequal blocks so that short test sequences still cross several blocks. On a GPU the
# blocks come from attention_configs.select_config (a rule, not timing: resumed runs repeat).
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}


@triton_kernel(interpreter_config=_INTERPRETER_BLOCKS)
def _alibi_attn_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, slopes_log2_ptr,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    bh_start, num_heads, seq_q, seq_k, qk_scale_log2,
    HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = (bh_start + tl.program_id(1)).to(tl.int64)  # launches cover at most 65,535 (batch, head) pairs each
    b = bh // num_heads
    h = bh % num_heads
    slope_log2 = tl.load(slopes_log2_ptr + h)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    if INT64_OFFSETS:  # row * row_stride would wrap in int32 (attention_configs.needs_int64_offsets)
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    pos_q = offs_m + (seq_k - seq_q)  # absolute query positions
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=offs_m[:, None] < seq_q, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Pass 0: key blocks ending at or before the block's first query position, with no mask and no bounds
    # check. Pass 1: the key blocks crossing the diagonal, up to the block's last query position.
    unmasked_end = ((start_m + seq_k - seq_q + 1) // BLOCK_N) * BLOCK_N
    diagonal_end = tl.minimum(start_m + BLOCK_M, seq_q) + (seq_k - seq_q)
    for on_diagonal in tl.static_range(2):
        lo = 0 if on_diagonal == 0 else unmasked_end
        hi = unmasked_end if on_diagonal == 0 else diagonal_end
        for start_n in range(lo, hi, BLOCK_N):
            keys = start_n + offs_n
            if on_diagonal == 0:
                k_t = tl.load(k_base + keys[None, :] * stride_ks + offs_d[:, None])
                v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :])
            else:
                k_t = tl.load(k_base + keys[None, :] * stride_ks + offs_d[:, None], mask=keys[None, :] < seq_k,
                              other=0.0)
                v = tl.load(v_base + keys[:, None] * stride_vs + offs_d[None, :], mask=keys[:, None] < seq_k,
                            other=0.0)
            if UPCAST:
                k_t = k_t.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale_log2
            s += slope_log2 * (keys[None, :] - pos_q[:, None]).to(tl.float32)
            if on_diagonal == 1:
                s = tl.where(keys[None, :] <= pos_q[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    acc = acc / l_i[:, None]
    row_ok = offs_m < seq_q
    tl.store(lse_ptr + bh * seq_q + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton_kernel
def _alibi_attn_bwd_preprocess(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_os, stride_dob, stride_doh, stride_dos,
    bh_start, num_heads, seq_q,
    HEAD_DIM: tl.constexpr, INT64_OFFSETS: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64_OFFSETS:
        offs_m = offs_m.to(tl.int64)
    bh = (bh_start + tl.program_id(1)).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < seq_q
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=row_ok, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=row_ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh * seq_q + offs_m, tl.sum(o * do, axis=1), mask=offs_m < seq_q)


@triton_kernel(interpreter_config={"BLOCK_M": 16, "BLOCK_N": 32})
def _alibi_attn_bwd_dkdv(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, slopes_log2_ptr,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
    bh_start, num_heads, seq_q, seq_k, qk_scale_log2, softmax_scale,
    HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bh = (bh_start + tl.program_id(1)).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    slope_log2 = tl.load(slopes_log2_ptr + h)
    offset = seq_k - seq_q
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if INT64_OFFSETS:
        offs_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n[:, None] < seq_k
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=key_ok, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=key_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = q_ptr + b * stride_qb + h * stride_qh
    do_base = do_ptr + b * stride_dob + h * stride_doh
    stats_base = bh * seq_q
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query rows before first_row see none of these keys; rows from full_row on see all of them.
    first_row = tl.maximum(start_n - offset, 0)
    full_row = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - offset, first_row), seq_q)
    unmasked_start = first_row + tl.cdiv(full_row - first_row, BLOCK_M) * BLOCK_M
    # Pass 0 walks the query blocks wholly below the diagonal, pass 1 the ones crossing it (causal mask).
    # Padded rows load dO = 0 and lse = +inf, so they add exactly nothing.
    for on_diagonal in tl.static_range(2):
        lo = unmasked_start if on_diagonal == 0 else first_row
        hi = seq_q if on_diagonal == 0 else unmasked_start
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            if INT64_OFFSETS:
                offs_m = offs_m.to(tl.int64)
            row_ok = offs_m < seq_q
            q_t = tl.load(q_base + offs_m[None, :] * stride_qs + offs_d[:, None], mask=row_ok[None, :], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            if UPCAST:
                q_t = q_t.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(lse_ptr + stats_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + stats_base + offs_m, mask=row_ok, other=0.0)
            s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale_log2
            s_t += slope_log2 * (offs_n[:, None] - (offs_m[None, :] + offset)).to(tl.float32)
            p_t = tl.exp2(s_t - lse[None, :])
            if on_diagonal == 1:
                p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + offset, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)

    dk *= softmax_scale
    tl.store(dk_ptr + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=key_ok)
    tl.store(dv_ptr + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=key_ok)


@triton_kernel(interpreter_config=_INTERPRETER_BLOCKS)
def _alibi_attn_bwd_dq(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, slopes_log2_ptr,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos, stride_dqb, stride_dqh, stride_dqs,
    bh_start, num_heads, seq_q, seq_k, qk_scale_log2, softmax_scale,
    HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, INT64_OFFSETS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = (bh_start + tl.program_id(1)).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    slope_log2 = tl.load(slopes_log2_ptr + h)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    if INT64_OFFSETS:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    pos_q = offs_m + (seq_k - seq_q)
    row_ok = offs_m < seq_q
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + bh * seq_q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh * seq_q + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Same two passes as the forward: key blocks left of the diagonal unmasked, then those crossing it.
    unmasked_end = ((start_m + seq_k - seq_q + 1) // BLOCK_N) * BLOCK_N
    diagonal_end = tl.minimum(start_m + BLOCK_M, seq_q) + (seq_k - seq_q)
    for on_diagonal in tl.static_range(2):
        lo = 0 if on_diagonal == 0 else unmasked_end
        hi = unmasked_end if on_diagonal == 0 else diagonal_end
        for start_n in range(lo, hi, BLOCK_N):
            keys = start_n + offs_n
            if on_diagonal == 0:
                k_t = tl.load(k_base + keys[None, :] * stride_ks + offs_d[:, None])
                v_t = tl.load(v_base + keys[None, :] * stride_vs + offs_d[:, None])
            else:
                key_ok = keys[None, :] < seq_k
                k_t = tl.load(k_base + keys[None, :] * stride_ks + offs_d[:, None], mask=key_ok, other=0.0)
                v_t = tl.load(v_base + keys[None, :] * stride_vs + offs_d[:, None], mask=key_ok, other=0.0)
            if UPCAST:
                k_t = k_t.to(tl.float32)
                v_t = v_t.to(tl.float32)
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale_log2
            s += slope_log2 * (keys[None, :] - pos_q[:, None]).to(tl.float32)
            p = tl.exp2(s - lse[:, None])
            if on_diagonal == 1:
                p = tl.where(keys[None, :] <= pos_q[:, None], p, 0.0)
            dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)

    dq *= softmax_scale
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and sequence strides of a ``[batch, heads, seq, head_dim]`` tensor with unit last stride."""
    assert t.stride(3) == 1, "kernels index head_dim contiguously"
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    # tl.dot on fp32 would silently use TF32 on a GPU; "ieee" keeps fp32 attention exact to fp32 rounding.
    return {
        "HEAD_DIM": q.shape[-1],
        "UPCAST": upcast_after_load(q.dtype),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "INT64_OFFSETS": needs_int64_offsets(q, k, v),
    }


def _launch_per_head_chunk(kernel, name: str, grid_rows: int, args_before, args_after, launch_args: dict,
                           batch_heads: int) -> None:
    """Launch ``kernel`` over ``grid_rows`` rows (in blocks of its row block) for every (batch, head) pair.

    ``args_before`` and ``args_after`` surround the ``bh_start`` argument; the pairs are split into launches of
    at most 65,535 (CUDA's grid-y limit).
    """
    meta = gpu_launch_meta(kernel, name, (*args_before, 0, *args_after), launch_args, grid_rows)
    row_block = row_block_name(name)

    def grid_for(count):
        return lambda m: (triton.cdiv(grid_rows, m[row_block]), count)

    for first, count in head_chunks(batch_heads):
        kernel[grid_for(count)](*args_before, first, *args_after, **launch_args, **meta)


class _AlibiFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, softmax_scale):
        batch, heads, seq_q, head_dim = q.shape
        seq_k = k.shape[2]
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((batch * heads, seq_q), dtype=torch.float32, device=q.device)
        slopes_log2 = slopes * LOG2E
        _launch_per_head_chunk(
            _alibi_attn_fwd, "fwd", seq_q,
            (q, k, v, o, lse, slopes_log2, *_strides(q), *_strides(k), *_strides(v), *_strides(o)),
            (heads, seq_q, seq_k, softmax_scale * LOG2E), _launch_args(q, k, v), batch * heads,
        )
        ctx.save_for_backward(q, k, v, o, lse, slopes_log2)
        ctx.softmax_scale = softmax_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, slopes_log2 = ctx.saved_tensors
        batch, heads, seq_q, head_dim = q.shape
        seq_k = k.shape[2]
        if do.stride(3) != 1:
            do = do.contiguous()
        launch_args = _launch_args(q, k, v)
        wide = launch_args["INT64_OFFSETS"] or needs_int64_offsets(do)
        launch_args["INT64_OFFSETS"] = wide
        delta = torch.empty_like(lse)
        preprocess_rows = 64
        for first, count in head_chunks(batch * heads):
            _alibi_attn_bwd_preprocess[(triton.cdiv(seq_q, preprocess_rows), count)](
                o, do, delta, *_strides(o), *_strides(do), first, heads, seq_q,
                HEAD_DIM=head_dim, INT64_OFFSETS=wide, BLOCK_M=preprocess_rows,
            )
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        scale = ctx.softmax_scale
        common = (heads, seq_q, seq_k, scale * LOG2E, scale)
        _launch_per_head_chunk(
            _alibi_attn_bwd_dkdv, "dkdv", seq_k,
            (q, k, v, do, dk, dv, lse, delta, slopes_log2,
             *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv)),
            common, launch_args, batch * heads,
        )
        _launch_per_head_chunk(
            _alibi_attn_bwd_dq, "dq", seq_q,
            (q, k, v, do, dq, lse, delta, slopes_log2,
             *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq)),
            common, launch_args, batch * heads,
        )
        return dq, dk, dv, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_device(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be one of {SUPPORTED_DTYPES}, got {t.dtype}")
    check_same_device(q=q, k=k, v=v, slopes=slopes)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, heads, seq_q, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        raise ValueError(f"k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, heads and head_dim")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    seq_k = k.shape[2]
    if seq_q < 1 or seq_q > seq_k:
        raise ValueError(f"need 1 <= seq_q <= seq_k (queries are the last seq_q of seq_k positions), "
                         f"got seq_q={seq_q}, seq_k={seq_k}")
    if slopes.shape != (heads,) or not slopes.is_floating_point():
        raise ValueError(f"slopes must be a float tensor of shape ({heads},), one per head, got "
                         f"{slopes.dtype} {tuple(slopes.shape)}")


def alibi_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention with ALiBi: ``softmax(q k^T * softmax_scale - slope_h * (i - j), j <= i) @ v``.

    ``q`` is ``[batch, heads, seq_q, head_dim]``, ``k``/``v`` ``[batch, heads, seq_k, head_dim]`` with
    ``seq_q <= seq_k`` (queries are the last ``seq_q`` positions, e.g. KV-cache decoding), all fp16, bf16 or fp32;
    head_dim 16, 32, 64 or 128; ``slopes`` ``[heads]`` (used in fp32, never differentiated);
    ``softmax_scale`` defaults to ``1 / sqrt(head_dim)``. Returns ``[batch, heads, seq_q, head_dim]`` in the input
    dtype, differentiable in q, k and v.
    """
    _check_inputs(q, k, v, slopes)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
    slopes = slopes.detach().to(torch.float32).contiguous()
    return _AlibiFlashAttention.apply(q, k, v, slopes, scale)
