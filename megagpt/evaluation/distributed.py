"""Data-parallel evaluation: which items (windows, requests) this rank scores, and how the ranks' results meet.

Every rank scores the items ``rank, rank + world_size, ...`` and writes its per-item rows into an otherwise zero
``[items, columns]`` float64 array; one ``all_reduce(SUM)`` then gives every rank the full table. Each entry has
exactly one non-zero contribution, so the table is bit-identical to the one a single process computes (as long as
each item's own value is), and every metric is then summed in item order on every rank: the result does not depend
on the number of ranks.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Shard:
    """This process's share of the work. The default (rank 0 of 1) needs no process group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where the all-reduce runs (CUDA for nccl)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, num_items: int) -> range:
        """Indices of the items this rank scores (round robin, so ranks get similar lengths)."""
        return range(self.rank, num_items, self.world_size)

    def gather(self, local_rows: np.ndarray, num_items: int, columns: int) -> np.ndarray:
        """The full ``[num_items, columns]`` table from each rank's rows for ``mine(num_items)`` (in that order)."""
        local_rows = np.asarray(local_rows, dtype=np.float64).reshape(len(self.mine(num_items)), columns)
        if self.world_size == 1:
            return local_rows
        import torch.distributed as dist

        full = torch.zeros(num_items, columns, dtype=torch.float64, device=self.device)
        if len(local_rows):
            full[self.rank::self.world_size] = torch.from_numpy(local_rows).to(self.device)
        dist.all_reduce(full, op=dist.ReduceOp.SUM)
        return full.cpu().numpy()


def setup_shard(device: str = "auto") -> Shard:
    """Rank and device from the launcher's environment (torchrun, deepspeed, mpirun: ``engine.launch_from_env``);
    with more than one rank, start the process group: gloo on CPU, nccl on CUDA."""
    from megagpt.engine import launch_from_env, start_process_group

    launch = launch_from_env(device)
    if launch.world_size > 1:
        start_process_group(launch)
    return Shard(launch.rank, launch.world_size, launch.device)


def teardown(shard: Shard, failed: bool = False) -> None:
    """Leave the process group ``setup_shard`` started (a no-op for one process). After a failure, skip the
    final barrier: the other ranks may never reach it."""
    if shard.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            if not failed:
                dist.barrier()
            dist.destroy_process_group()


def run_command(command, argv=None) -> int:
    """A data-parallel tool's ``main``: ``command(argv)`` with input errors (ValueError, FileExistsError) printed
    as one line by rank 0 (every rank fails alike) and exit status 1, instead of a traceback per rank."""
    from megagpt.engine import ranks_from_env

    try:
        command(argv)
    except (ValueError, FileExistsError) as err:
        if ranks_from_env()[0] == 0:
            print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


@contextmanager
def shard_session(device: str = "auto"):
    """``setup_shard`` on entry, ``teardown`` on exit (without the final barrier after an exception)."""
    shard = setup_shard(device)
    try:
        yield shard
    except BaseException:
        teardown(shard, failed=True)
        raise
    teardown(shard)
