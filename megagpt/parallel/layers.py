"""Megatron-style tensor-parallel layers and the factory that hands them to the GPT model.

``TensorParallelLayerFactory(group)`` drops into ``GPT(config, layers=...)``: the model asks it for its
linears and vocab embedding exactly as it asks the plain ``LayerFactory``, and builds only
``num_heads // tp_size`` heads per rank. Per block that gives Megatron's two all-reduces in forward
(after the attention and MLP output projections) and two in backward (in front of QKV and the MLP
up-projection).

Initialisation equals the single-rank model's: every parallel layer first builds the FULL layer with
the plain ``LayerFactory`` (so it consumes the global torch RNG exactly as the unsplit model does, in the
same order) and then keeps its slice. A TP model built after ``torch.manual_seed(s)`` therefore holds
exactly the slices of the plain model built after the same seed, whatever the TP size, and later layers'
draws stay aligned too. The price is one full-size temporary per layer at construction time.

Every parameter of these layers carries ``tp_split_dim``: the dim along which it is split into
contiguous, rank-ordered chunks, or None when it is replicated on all TP ranks (a row-parallel bias).
A checkpoint converter can merge or re-split shards from that alone. ``tensor_model_parallel`` (True
when split) is the flag DeepSpeed reads for the same purpose.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megagpt.model.layers import LayerFactory
from megagpt.parallel.tensor_parallel import (
    ProcessGroup, all_reduce_sum, copy_to_tp, gather_from_tp, group_rank, group_size, reduce_from_tp,
)


def _keep_slice(full: torch.Tensor, dim: int | None, group: ProcessGroup | None) -> nn.Parameter:
    """This rank's contiguous chunk of ``full`` along ``dim`` (all of it for None), as a fresh Parameter."""
    if dim is not None:
        size, rank = group_size(group), group_rank(group)
        if full.shape[dim] % size:
            raise ValueError(f"dim {dim} of a {tuple(full.shape)} weight is not divisible by the "
                             f"tensor-parallel size {size}")
        chunk = full.shape[dim] // size
        full = full.narrow(dim, rank * chunk, chunk)
    # clone(): the full tensor is freed once the slice no longer views it.
    param = nn.Parameter(full.detach().clone())
    param.tp_split_dim = dim
    # DeepSpeed's gradient norm (with an mpu) counts a parameter without this flag on TP rank 0 only,
    # since it is a replica there; split parameters must be counted on every rank.
    param.tensor_model_parallel = dim is not None
    return param


class _SharedGroup:
    """A process group that ``copy.deepcopy`` shares instead of copying (a group cannot be copied or
    pickled, and a deep-copied model, e.g. an EMA copy, must still talk to the same ranks)."""

    __slots__ = ("group",)

    def __init__(self, group: ProcessGroup | None):
        self.group = group

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class _TPModule(nn.Module):
    """Base of the parallel layers: the group, this rank and the group size."""

    def __init__(self, group: ProcessGroup | None):
        super().__init__()
        self.tp_size = group_size(group)
        self.tp_rank = group_rank(group)
        self._group = _SharedGroup(group)

    @property
    def group(self) -> ProcessGroup | None:
        return self._group.group


class ColumnParallelLinear(_TPModule):
    """``y = x W^T + b`` with the output features split: weight ``[out/tp, in]``, output stays sharded.

    The input is replicated; ``copy_to_tp`` sums its gradient over the ranks in backward.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, init_std: float,
                 group: ProcessGroup | None):
        super().__init__(group)
        self.in_features, self.out_features = in_features, out_features
        full = LayerFactory._linear(in_features, out_features, bias, init_std)
        self.weight = _keep_slice(full.weight, 0, group)
        self.bias = _keep_slice(full.bias, 0, group) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)


class RowParallelLinear(_TPModule):
    """``y = x W^T + b`` with the input features split: weight ``[out, in/tp]``, input already sharded.

    ``reduce_output=True``: the partial products are all-reduced and the (replicated) bias added once.
    ``reduce_output=False``: returns this rank's PARTIAL output, with the bias added on rank 0 only, so a
    caller can add several partial outputs (the parallel residual's attention + MLP) and reduce once:
    ``sum_r (a_r + [r == 0] b) = a + b``. ``output_is_partial`` tells which one a caller has.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, init_std: float,
                 group: ProcessGroup | None, reduce_output: bool = True):
        super().__init__(group)
        self.in_features, self.out_features = in_features, out_features
        self.reduce_output = reduce_output
        full = LayerFactory._linear(in_features, out_features, bias, init_std)
        self.weight = _keep_slice(full.weight, 1, group)
        self.bias = _keep_slice(full.bias, None, group) if bias else None

    @property
    def output_is_partial(self) -> bool:
        """True when ``forward`` returns a partial sum that the caller must all-reduce (``reduce_from_tp``)."""
        return not self.reduce_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.reduce_output:
            out = reduce_from_tp(out, self.group)
            return out if self.bias is None else out + self.bias
        if self.bias is None:
            return out
        if self.tp_rank == 0:
            return out + self.bias
        # Value exactly 0 but gradient 1: the bias is replicated, so every rank's copy must receive the
        # same gradient (the reduced output's gradient, identical on all ranks) or the copies drift apart.
        return out + (self.bias - self.bias.detach())


class VocabParallelEmbedding(_TPModule):
    """Token embedding with its rows (the vocab) split contiguously over the ranks.

    Each rank looks up only the tokens in its row range and contributes zeros for the others; the
    all-reduce then gives every rank the full embedding. ``weight`` is ``[num_embeddings/tp, dim]``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float, group: ProcessGroup | None):
        super().__init__(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        full = LayerFactory().vocab_embedding(num_embeddings, embedding_dim, init_std=init_std)
        self.weight = _keep_slice(full.weight, 0, group)
        self.vocab_start = self.tp_rank * self.weight.shape[0]
        self.vocab_end = self.vocab_start + self.weight.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        # Row 0 is a valid stand-in index for foreign tokens; their rows are zeroed right after, and the
        # masked_fill also zeroes their gradient, so row 0 learns nothing from them.
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        hidden = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(hidden, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy over vocab-sharded logits ``[N, V/tp]`` (Megatron's algorithm).

    Only three ``[N]``-sized all-reduces cross the ranks (max, sum of exps, target logit), never the
    ``[N, V]`` logits. Works in float32 whatever the logits' dtype: a log-sum-exp over a 50k vocab in
    bf16 loses most of its precision.
    """

    @staticmethod
    def forward(ctx, local_logits, targets, vocab_start, vocab_size_true, ignore_index, group):
        local_vocab = local_logits.shape[-1]
        logits = local_logits.float()  # never written to: it may be the caller's own tensor
        n_real = min(max(vocab_size_true - vocab_start, 0), local_vocab)
        if n_real < local_vocab:
            # Padded-vocab columns are not tokens: -inf keeps them out of the max and the sum of exps,
            # and makes their softmax (hence their gradient) exactly 0.
            padding = torch.arange(local_vocab, device=logits.device) >= n_real
            logits = logits.masked_fill(padding, float("-inf"))
        logits_max = logits.max(dim=-1).values
        if group_size(group) > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        # Subtracting the global max keeps exp() from overflowing; it cancels out of the loss.
        shifted = logits - logits_max.unsqueeze(-1)

        local_target = targets - vocab_start
        mine = (local_target >= 0) & (local_target < n_real) & (targets != ignore_index)
        local_target = local_target.masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        target_logit = all_reduce_sum(target_logit, group)  # exactly one rank holds each target

        exp = shifted.exp_()  # shifted is our own tensor: reuse its memory for the softmax
        sum_exp = all_reduce_sum(exp.sum(dim=-1), group)
        loss = torch.log(sum_exp) - target_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, mine, local_target)
        ctx.input_dtype = local_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, mine, local_target = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(target); the onehot part lives on the target's rank only.
        # Out of place, so that a second backward (retain_graph) still finds the softmax intact.
        grad = softmax * grad_loss.unsqueeze(-1)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), (-grad_loss * mine).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 vocab_size_true: int, group: ProcessGroup | None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of vocab-sharded logits, as ``F.cross_entropy`` on the gathered true-vocab logits.

    ``local_logits`` ``[..., V_local]``: this rank's columns ``[vocab_start, vocab_start + V_local)`` of the
    padded vocab; ``targets`` ``[...]``, identical on all ranks of ``group``. Columns at global index
    ``>= vocab_size_true`` (padding) are excluded. Returns the float32 mean over tokens whose target is not
    ``ignore_index``, the same on every rank (NaN when every token is ignored, like ``F.cross_entropy``).
    """
    logits_2d = local_logits.reshape(-1, local_logits.shape[-1])
    targets_1d = targets.reshape(-1)
    per_token = _VocabParallelCrossEntropy.apply(logits_2d, targets_1d, vocab_start, vocab_size_true,
                                                 ignore_index, group)
    valid = targets_1d != ignore_index
    # where(), not a multiply: an ignored token's loss never reaches the sum, and gets a zero gradient.
    return torch.where(valid, per_token, 0.0).sum() / valid.sum()


class TensorParallelLayerFactory(LayerFactory):
    """Builds the tensor-parallel layers over ``group`` for ``GPT(config, layers=...)``.

    ``vocab_logits`` returns this rank's LOCAL shard of the padded-vocab logits (padding columns included,
    not masked); ``loss`` and ``gather_logits`` then need the true vocab size, which they take from
    ``vocab_size`` if given here, else from the last ``vocab_logits`` call (the model passes its
    ``config.vocab_size`` there), or from their own ``vocab_size`` argument.
    """

    def __init__(self, group: ProcessGroup | None, *, vocab_size: int | None = None):
        self._group = _SharedGroup(group)  # the model keeps the factory; deepcopy must not copy the group
        self.tp_size = group_size(group)
        self.tp_rank = group_rank(group)
        self.vocab_size = vocab_size

    @property
    def group(self) -> ProcessGroup | None:
        return self._group.group

    def column_linear(self, in_features: int, out_features: int, *, bias: bool, init_std: float) -> nn.Module:
        return ColumnParallelLinear(in_features, out_features, bias, init_std, self.group)

    def row_linear(self, in_features: int, out_features: int, *, bias: bool, init_std: float,
                   reduce_output: bool = True) -> nn.Module:
        return RowParallelLinear(in_features, out_features, bias, init_std, self.group, reduce_output)

    def vocab_embedding(self, num_embeddings: int, embedding_dim: int, *, init_std: float) -> nn.Module:
        return VocabParallelEmbedding(num_embeddings, embedding_dim, init_std, self.group)

    def vocab_logits(self, hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Local logits ``[..., padded_vocab / tp]`` of ``hidden`` on this rank's vocab rows ``weight``."""
        if self.vocab_size is not None and self.vocab_size != vocab_size:
            raise ValueError(f"vocab_logits got vocab_size={vocab_size}, the factory has {self.vocab_size}")
        self.vocab_size = vocab_size
        # copy_to_tp: every rank's logits shard depends on the whole (replicated) hidden state.
        return F.linear(copy_to_tp(hidden, self.group), weight)

    def _true_vocab(self, vocab_size: int | None) -> int:
        vocab_size = vocab_size if vocab_size is not None else self.vocab_size
        if vocab_size is None:
            raise ValueError("the true vocab size is unknown: pass vocab_size to the factory or this call, "
                             "or call vocab_logits first")
        return vocab_size

    def gather_logits(self, logits: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """Full logits ``[..., vocab_size]`` on every rank from the local shards (generation, evaluation)."""
        return gather_from_tp(logits, self.group)[..., :self._true_vocab(vocab_size)]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             fused: bool = False, vocab_size: int | None = None) -> torch.Tensor:
        """Mean cross-entropy (float32) of the local logits shards, without gathering them (``fused`` is
        accepted for the model's sake: the vocab-parallel form is kept whatever it says)."""
        vocab_start = self.tp_rank * logits.shape[-1]
        return vocab_parallel_cross_entropy(logits, targets, vocab_start, self._true_vocab(vocab_size),
                                            self.group, ignore_index)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum partial outputs of ``row_linear(..., reduce_output=False)`` layers over the ranks."""
        return reduce_from_tp(partial, self.group)
