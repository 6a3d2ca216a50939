"""Tensor parallelism (Megatron-style): autograd collectives over an explicit process group, and the
column-/row-parallel linears, vocab-parallel embedding and cross-entropy behind ``TensorParallelLayerFactory``."""
from megagpt.parallel.layers import (
    ColumnParallelLinear, RowParallelLinear, TensorParallelLayerFactory, VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from megagpt.parallel.tensor_parallel import (
    copy_to_tp, gather_from_tp, group_rank, group_size, reduce_from_tp, scatter_to_tp,
)

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "TensorParallelLayerFactory",
    "vocab_parallel_cross_entropy", "copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_tp",
    "group_size", "group_rank",
]
