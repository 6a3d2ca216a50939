"""Where a rank sits in the tensor x pipeline x data-parallel grid, and its process groups.

Rank order follows Megatron and DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data,
model): tensor-parallel ranks are adjacent (they exchange activations every layer, so they should share
a node), then data-parallel, then pipeline stages::

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

``build_process_groups`` creates every group on every rank (``torch.distributed.new_group`` is
collective: all ranks must create all groups in the same order) and keeps this rank's. The result
doubles as the ``mpu`` object DeepSpeed asks for, so its gradient reduction, gradient-norm and
checkpoint naming agree with our layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """A (tp, pp, dp) layout of ``tp * pp * dp`` ranks."""

    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of global ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]


class ProcessGroups:
    """This rank's tensor-, data- and pipeline-parallel groups; also DeepSpeed's ``mpu`` interface
    (``get_model_parallel_*`` is the tensor-parallel group, as in Megatron)."""

    def __init__(self, topology: Topology, rank: int):
        self.topology = topology
        self.rank = rank
        self.pp_rank, self.dp_rank, self.tp_rank = topology.coords(rank)
        self.tp_group = self._mine(topology.tp_groups())
        self.dp_group = self._mine(topology.dp_groups())
        self.pp_group = self._mine(topology.pp_groups())

    def _mine(self, groups: list[list[int]]):
        found = None
        for ranks in groups:  # every rank creates every group, in the same order
            group = dist.new_group(ranks)
            if self.rank in ranks:
                found = group
        return found

    # DeepSpeed's mpu interface
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.topology.tp

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.topology.dp

    def get_data_parallel_group(self):
        return self.dp_group

    # Megatron-style names DeepSpeed also looks for
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
