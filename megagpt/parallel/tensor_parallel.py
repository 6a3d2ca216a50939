"""Autograd-aware collectives for Megatron-style tensor parallelism.

Each function takes the tensor-parallel process group explicitly: with data or pipeline parallelism
beside it, the world group is the wrong set of ranks, and a collective over it would silently mix
unrelated shards (or hang).

The four functions come in conjugate pairs, because the backward of a collective is the collective
that undoes its effect on the gradient:

    copy_to_tp     forward identity          backward all-reduce (sum)
    reduce_from_tp forward all-reduce (sum)  backward identity
    gather_from_tp forward all-gather (last) backward split (last)
    scatter_to_tp  forward split (last)      backward all-gather (last)

Reductions always use SUM: gloo has no AVG, and the tensor-parallel maths needs sums anyway (partial
products of a split matmul add up to the full product). With a group of one rank every function is
the identity, so the same code runs unsplit.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def _check_group(group: ProcessGroup | None) -> bool:
    """True when ``group`` is None in a single, non-distributed process (no group, one rank)."""
    if group is not None:
        return False
    if dist.is_initialized():
        # None would mean the world group to torch.distributed: refuse it rather than guess.
        raise ValueError("pass the tensor-parallel process group explicitly (group=None is only "
                         "allowed when torch.distributed is not initialised)")
    return True


def group_size(group: ProcessGroup | None) -> int:
    """Ranks in ``group``; 1 for ``group=None`` without torch.distributed."""
    return 1 if _check_group(group) else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank inside ``group``; 0 for ``group=None`` without torch.distributed."""
    return 0 if _check_group(group) else dist.get_rank(group)


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum over the group into a new tensor; never writes into ``tensor``, which autograd may still need."""
    if group_size(group) == 1:
        return tensor
    out = tensor.contiguous().clone()  # all_reduce works in place
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _split_last(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return tensor
    if tensor.shape[-1] % size:
        raise ValueError(f"last dim {tensor.shape[-1]} is not divisible by the tensor-parallel size {size}")
    chunk = tensor.shape[-1] // size
    # contiguous(): a narrow of the last dim is strided, and later views/collectives need dense memory.
    return tensor.narrow(-1, group_rank(group) * chunk, chunk).contiguous()


def _gather_last(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    # The input is replicated on every rank and each rank uses it for its own shard of a split
    # computation, so its true gradient is the sum of the ranks' partial gradients.
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    # The summed output is replicated, so every rank receives the same output gradient; each partial
    # term's gradient is exactly that (d sum / d term = 1), and summing it again would count it tp times.
    @staticmethod
    def forward(ctx, tensor, group):
        return all_reduce_sum(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    # Each rank contributed only its slice of the gathered tensor, so it only keeps its slice of the gradient.
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _gather_last(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToTP(torch.autograd.Function):
    # The input was replicated; its gradient must be whole again on every rank, hence a gather.
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _split_last(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


def copy_to_tp(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce (sum) of the gradient in backward."""
    return _CopyToTP.apply(tensor, group)


def reduce_from_tp(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Leave a region whose ranks hold partial sums: all-reduce (sum) forward, identity backward."""
    return _ReduceFromTP.apply(tensor, group)


def gather_from_tp(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate the ranks' last-dim shards (rank order); backward keeps this rank's gradient slice."""
    return _GatherFromTP.apply(tensor, group)


def scatter_to_tp(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's contiguous last-dim chunk of a replicated tensor; backward all-gathers the gradient."""
    return _ScatterToTP.apply(tensor, group)
