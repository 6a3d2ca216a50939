"""Fused cross-entropy over the vocabulary in Triton; the plain reference is ``cross_entropy_reference.py``.

Layout: ``logits`` ``[..., vocab]`` (any float dtype), ``targets`` ``[...]`` integers. The naive
``F.cross_entropy(logits.float(), ...)`` materialises fp32 copies of the whole ``[tokens, vocab]`` logits (the
upcast, the softmax, the gradient); here nothing of that size exists except the input and the gradient, both
in the input dtype:

- forward: one program per row streams the row in ``BLOCK_V`` blocks with an online log-sum-exp in fp32 and
  saves only the row's log-sum-exp (``[tokens]`` fp32) beside the loss;
- backward: one program per row streams the row again and writes
  ``dlogits = g * (softmax(x) * (1 + 2 * z_loss * lse) - onehot(target))`` in the input dtype.

Rows are launched in chunks of at most ``max_rows_per_launch`` so that the kernels' int32 element offsets
(``row * row_stride + column``) never pass 2**31: e.g. 32k tokens of a 128k vocabulary are 2**32 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_same_device, triton_kernel
from .cross_entropy_reference import REDUCTIONS

_INT32_OFFSET_LIMIT = 2**31 - 1


def _block_v(vocab: int) -> int:
    # Interpreter tests use small vocabularies; on a GPU 4096 columns (16 KiB of fp32) per step keeps loads wide.
    return min(4096, max(16, triton.next_power_of_2(vocab)))


@triton_kernel
def _cross_entropy_fwd(
    logits_ptr, targets_ptr, loss_ptr, lse_ptr,
    row_stride, vocab, ignore_index, z_loss,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    running_max = tl.full([], float("-inf"), tl.float32)
    running_sum = tl.zeros([], dtype=tl.float32)
    for start in range(0, vocab, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # While every logit so far is -inf (masked vocabulary entries), new_max is -inf and x - new_max would be
        # -inf - -inf = nan; shifting by 0 instead gives exp(-inf) = 0, the right (empty) contribution.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(targets_ptr + row)
    keep = target != ignore_index
    # Out-of-range targets are never read from (the host side asserts on them without a sync): their loss is nan.
    in_vocab = (target >= 0) & (target < vocab)
    target_logit = tl.load(row_ptr + target, mask=keep & in_vocab, other=float("nan")).to(tl.float32)
    loss = tl.where(keep, lse - target_logit + z_loss * lse * lse, 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton_kernel
def _cross_entropy_bwd(
    logits_ptr, targets_ptr, lse_ptr, grad_ptr, dlogits_ptr,
    row_stride, dlogits_row_stride, grad_stride, vocab, ignore_index, z_loss,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row * row_stride
    out_ptr = dlogits_ptr + row * dlogits_row_stride
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    # grad_stride is 0 for a reduced loss: every row reads the same scalar.
    grad = tl.load(grad_ptr + row * grad_stride).to(tl.float32)
    grad = tl.where(target != ignore_index, grad, 0.0)
    softmax_coef = 1.0 + 2.0 * z_loss * lse
    for start in range(0, vocab, BLOCK_V):
        in_vocab = start + cols < vocab
        x = tl.load(row_ptr + start + cols, mask=in_vocab, other=0.0).to(tl.float32)
        d = tl.exp(x - lse) * softmax_coef - tl.where(start + cols == target, 1.0, 0.0)
        tl.store(out_ptr + start + cols, (d * grad).to(dlogits_ptr.dtype.element_ty), mask=in_vocab)


def _row_chunks(n_rows: int, row_stride: int, max_rows_per_launch: int | None):
    rows_in_int32 = max(1, _INT32_OFFSET_LIMIT // max(row_stride, 1))
    chunk = min(rows_in_int32, max_rows_per_launch or rows_in_int32)
    for start in range(0, n_rows, chunk):
        yield start, min(start + chunk, n_rows)


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_rows, targets_rows, ignore_index, z_loss, reduction, max_rows_per_launch):
        n_rows, vocab = logits_rows.shape
        loss = torch.empty(n_rows, dtype=torch.float32, device=logits_rows.device)
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits_rows.device)
        block_v = _block_v(vocab)
        for start, end in _row_chunks(n_rows, logits_rows.stride(0), max_rows_per_launch):
            _cross_entropy_fwd[(end - start,)](
                logits_rows[start:end], targets_rows[start:end], loss[start:end], lse[start:end],
                logits_rows.stride(0), vocab, ignore_index, z_loss,
                BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
            )
        n_kept = (targets_rows != ignore_index).sum()
        ctx.save_for_backward(logits_rows, targets_rows, lse, n_kept)
        ctx.ignore_index, ctx.z_loss, ctx.reduction = ignore_index, z_loss, reduction
        ctx.max_rows_per_launch = max_rows_per_launch
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        return loss.sum() / n_kept  # nan when every token is ignored, like F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        logits_rows, targets_rows, lse, n_kept = ctx.saved_tensors
        n_rows, vocab = logits_rows.shape
        if ctx.reduction == "none":
            grad = grad_loss.reshape(-1)
            grad_stride = grad.stride(0)
        else:
            grad = (grad_loss / n_kept if ctx.reduction == "mean" else grad_loss).float().reshape(1)
            grad_stride = 0
        dlogits = torch.empty_like(logits_rows)
        block_v = _block_v(vocab)
        for start, end in _row_chunks(n_rows, max(logits_rows.stride(0), dlogits.stride(0)), ctx.max_rows_per_launch):
            _cross_entropy_bwd[(end - start,)](
                logits_rows[start:end], targets_rows[start:end], lse[start:end],
                grad[start:end] if grad_stride else grad, dlogits[start:end],
                logits_rows.stride(0), dlogits.stride(0), grad_stride, vocab, ctx.ignore_index, ctx.z_loss,
                BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
            )
        return dlogits, None, None, None, None, None


def _check_targets_in_vocab(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Refuse targets outside ``[0, vocab)`` (other than ``ignore_index``).

    On CUDA the check runs on the GPU (``torch._assert_async``, a device-side assert as ``F.cross_entropy``'s
    own) so that the training step never waits for the host; on CPU it raises ValueError naming the first one.
    """
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    message = f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}"
    if targets.device.type == "cuda":
        torch._assert_async(~bad.any(), message)
        return
    if bool(bad.any()):
        raise ValueError(f"{message}; found {targets[bad].flatten()[0].item()}")


def fused_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    reduction: str = "mean",
    max_rows_per_launch: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``[..., vocab]`` against integer ``targets`` ``[...]``, plus optional z-loss.

    Per token: ``logsumexp(x) - x[target] + z_loss * logsumexp(x)**2``; tokens with ``target == ignore_index``
    give 0. ``reduction``: ``"mean"`` over the tokens not ignored (nan if there are none, as in
    ``F.cross_entropy``), ``"sum"``, or ``"none"`` (shape of ``targets``). The loss is fp32; the gradient for
    ``logits`` has the dtype of ``logits``. ``max_rows_per_launch`` caps the rows per kernel launch (by default
    only the int32 offset limit does).
    """
    check_device("logits", logits)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., vocab] with vocab >= 1, got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits without the vocab "
                         f"dimension), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    check_same_device(logits=logits, targets=targets)
    if max_rows_per_launch is not None and max_rows_per_launch < 1:
        raise ValueError(f"max_rows_per_launch must be a positive row count or None, got {max_rows_per_launch}")
    vocab = logits.shape[-1]
    _check_targets_in_vocab(targets, vocab, ignore_index)
    logits_rows = logits.reshape(-1, vocab)
    if logits_rows.stride(-1) != 1:
        logits_rows = logits_rows.contiguous()
    targets_rows = targets.reshape(-1).contiguous()
    loss = _FusedCrossEntropy.apply(
        logits_rows, targets_rows, int(ignore_index), float(z_loss), reduction, max_rows_per_launch
    )
    return loss.view(targets.shape) if reduction == "none" else loss
