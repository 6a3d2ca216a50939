"""Resumable, data-parallel batches of samples: the position is one integer, ``consumed_samples``.

Step ``s`` consumes global samples ``[s * global_batch, (s + 1) * global_batch)`` of the (already shuffled)
dataset, whatever the data-parallel layout, as Megatron's ``MegatronPretrainingSampler`` does: micro batch ``m``
of the step takes the ``micro_batch * dp_size`` samples after the previous micro batches, and data-parallel rank
``r`` takes its ``micro_batch`` slice of them. So

- the samples of a step — and, with gradients averaged over ranks and micro batches, the update — do not depend
  on ``dp_size``: a run may resume with another data-parallel size;
- resuming is O(1): set ``consumed_samples`` and read on, no replay of the loader.
"""
from __future__ import annotations

import numpy as np


def step_sample_indices(consumed_samples: int, micro_batch: int, global_batch: int, dp_size: int,
                        dp_rank: int) -> np.ndarray:
    """Sample indices ``[grad_accum, micro_batch]`` that ``dp_rank`` reads for the step starting at
    ``consumed_samples``."""
    if global_batch % (micro_batch * dp_size):
        raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x "
                         f"data-parallel size {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    grad_accum = global_batch // (micro_batch * dp_size)
    micro = np.arange(grad_accum)[:, None] * (micro_batch * dp_size)
    within = dp_rank * micro_batch + np.arange(micro_batch)[None, :]
    return consumed_samples + micro + within


class PretrainingLoader:
    """Yields, per optimizer step, this rank's micro batches as ``np.int64 [micro_batch, seq_len + 1]`` arrays."""

    def __init__(self, dataset, micro_batch: int, global_batch: int, dp_size: int = 1, dp_rank: int = 0,
                 consumed_samples: int = 0):
        self.dataset = dataset
        self.micro_batch, self.global_batch = int(micro_batch), int(global_batch)
        self.dp_size, self.dp_rank = int(dp_size), int(dp_rank)
        self.consumed_samples = int(consumed_samples)
        self.skipped: list[tuple[int, int]] = []  # sample ranges never read (loss-spike recovery)
        step_sample_indices(0, self.micro_batch, self.global_batch, self.dp_size, self.dp_rank)  # validate

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def skip(self, start: int, end: int) -> None:
        """Never read samples ``[start, end)`` (whole global batches): the position jumps over them."""
        if start % self.global_batch or end % self.global_batch or not start < end:
            raise ValueError(f"skipped samples [{start}, {end}) must be whole global batches of {self.global_batch}")
        self.skipped = sorted(set(self.skipped) | {(start, end)})

    def next_step(self) -> list[np.ndarray]:
        """The micro batches of the next step for this rank; advances the position by one global batch."""
        for start, end in self.skipped:  # sorted: one pass jumps over overlapping and adjacent ranges too
            if start <= self.consumed_samples < end:
                self.consumed_samples = end
        indices = step_sample_indices(self.consumed_samples, self.micro_batch, self.global_batch, self.dp_size,
                                      self.dp_rank)
        end = self.consumed_samples + self.global_batch
        if end > len(self.dataset):
            raise IndexError(f"the dataset holds {len(self.dataset)} samples but step ending at sample {end} needs "
                             f"more: build it with num_samples >= train_iters x global_batch")
        batches = [np.stack([np.asarray(self.dataset[int(i)], dtype=np.int64) for i in row]) for row in indices]
        self.consumed_samples = end
        return batches

    def state_dict(self) -> dict:
        state = {"consumed_samples": self.consumed_samples}
        if self.skipped:
            state["skipped_samples"] = [list(r) for r in self.skipped]
        return state

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        if consumed % self.global_batch:
            raise ValueError(f"checkpoint position {consumed} samples is not a whole number of global batches of "
                             f"{self.global_batch}: the global batch must not change on resume")
        self.consumed_samples = consumed
        self.skipped = []
        for start, end in state.get("skipped_samples", []):
            self.skip(int(start), int(end))
