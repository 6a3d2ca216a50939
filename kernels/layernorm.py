"""Fused LayerNorm (forward and backward) in Triton; the plain reference is ``layernorm_reference.py``.

Layout: ``x`` is ``[..., hidden]``, normalised over ``hidden``; ``weight`` and ``bias`` are ``[hidden]``.
Statistics and all arithmetic are fp32 whatever the input dtype; outputs keep the input dtypes.

Forward: one program per row holds the whole row in registers (hence the hidden-size limit) and saves the
row's mean and reciprocal standard deviation (fp32, ``[rows]``) for the backward.

Backward (as Liger-Kernel's, deterministic, no atomics): a fixed number of programs each walk a strided set of
rows, write dX for each row and keep running dW/dB sums in fp32 registers; the per-program partial sums
``[programs, hidden]`` are then added up with ``torch.sum``. Per row, with ``xhat = (x - mean) * rstd`` and
``g = dy * weight``::

    dx = rstd * (g - mean(g * xhat) * xhat - mean(g))
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_same_device, num_persistent_programs, triton_kernel

# Whole rows live in registers; 64 KiB of row per program is where Triton's own LayerNorm tutorial stops too.
_MAX_ROW_BYTES = 65536


@triton_kernel
def _layer_norm_fwd(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    x_row_stride, y_row_stride, hidden, eps,
    HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * hidden may pass 2**31
    cols = tl.arange(0, BLOCK_H)
    in_row = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / hidden
    centred = tl.where(in_row, x - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / hidden
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    y = centred * rstd * w
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=in_row)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton_kernel
def _layer_norm_bwd(
    x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, dw_partial_ptr, db_partial_ptr,
    x_row_stride, dy_row_stride, dx_row_stride, n_rows, hidden,
    HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    in_row = cols < hidden
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
    dw_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    db_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    for row in range(pid, n_rows, num_programs):
        row64 = tl.cast(row, tl.int64)  # int64: rows * hidden may pass 2**31
        x = tl.load(x_ptr + row64 * x_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row64 * dy_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row64)
        rstd = tl.load(rstd_ptr + row64)
        xhat = tl.where(in_row, (x - mean) * rstd, 0.0)
        g = dy * w
        c_xhat = tl.sum(g * xhat, axis=0) / hidden
        c_mean = tl.sum(g, axis=0) / hidden
        dx = (g - (xhat * c_xhat + c_mean)) * rstd
        tl.store(dx_ptr + row64 * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_row)
        dw_sum += dy * xhat
        if HAS_BIAS:
            db_sum += dy
    tl.store(dw_partial_ptr + pid * hidden + cols, dw_sum, mask=in_row)
    if HAS_BIAS:
        tl.store(db_partial_ptr + pid * hidden + cols, db_sum, mask=in_row)


def _num_warps(block_h: int) -> int:
    return min(max(block_h // 256, 1), 16)


def _as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """``[..., hidden]`` as a ``[rows, hidden]`` view with unit column stride (copying only if needed)."""
    rows = t.reshape(-1, hidden)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class _FusedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        hidden = x.shape[-1]
        x_rows = _as_rows(x, hidden)
        n_rows = x_rows.shape[0]
        y = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_h = triton.next_power_of_2(hidden)
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        if n_rows > 0:
            _layer_norm_fwd[(n_rows,)](
                x_rows, y, weight, bias if bias is not None else weight, mean, rstd,
                x_rows.stride(0), y.stride(0), hidden, eps,
                HAS_BIAS=bias is not None, BLOCK_H=block_h, num_warps=_num_warps(block_h),
            )
        ctx.save_for_backward(x_rows, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_rows, weight, mean, rstd = ctx.saved_tensors
        n_rows, hidden = x_rows.shape
        dy_rows = _as_rows(dy, hidden)
        dx = torch.empty_like(x_rows)
        block_h = triton.next_power_of_2(hidden)
        programs = max(1, min(n_rows, num_persistent_programs(x_rows.device)))
        dw_partial = torch.zeros((programs, hidden), dtype=torch.float32, device=x_rows.device)
        db_partial = torch.zeros_like(dw_partial) if ctx.has_bias else dw_partial
        if n_rows > 0:
            _layer_norm_bwd[(programs,)](
                x_rows, dy_rows, dx, weight, mean, rstd, dw_partial, db_partial,
                x_rows.stride(0), dy_rows.stride(0), dx.stride(0), n_rows, hidden,
                HAS_BIAS=ctx.has_bias, BLOCK_H=block_h, num_warps=_num_warps(block_h),
            )
        dw = dw_partial.sum(dim=0).to(weight.dtype)
        db = db_partial.sum(dim=0).to(ctx.bias_dtype) if ctx.has_bias else None
        return dx.view(ctx.x_shape), dw, db, None


def fused_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm of ``x`` (``[..., hidden]``) over its last dimension, differentiable in x, weight and bias.

    Same result as ``torch.nn.functional.layer_norm(x, (hidden,), weight, bias, eps)`` up to rounding, with fp32
    statistics. Hidden sizes up to 16384 (fp32) / 32768 (fp16, bf16) elements are supported.
    """
    check_device("x", x)
    if x.dim() == 0:
        raise ValueError("x must have a hidden dimension, got a 0-d tensor")
    hidden = x.shape[-1]
    if weight is None or weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},) to match x's last dimension, got "
                         f"{None if weight is None else tuple(weight.shape)}")
    if bias is not None and bias.shape != (hidden,):
        raise ValueError(f"bias must have shape ({hidden},) to match x's last dimension, got {tuple(bias.shape)}")
    check_same_device(x=x, weight=weight, **({"bias": bias} if bias is not None else {}))
    max_hidden = _MAX_ROW_BYTES // x.element_size()
    if hidden < 1 or hidden > max_hidden:
        raise ValueError(f"fused_layer_norm supports hidden sizes 1..{max_hidden} for {x.dtype}, got {hidden}; "
                         f"use torch.nn.functional.layer_norm for larger rows")
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    return _FusedLayerNorm.apply(x, weight, bias, float(eps))
