"""Sequence-length warmup: train on short rows first, cut from the full-length samples.

Two forms: explicit stages ``[(length, steps), ...]`` (e.g. 128, 192, 256, 384, 512 over the first
30 % of training), or a linear ramp from ``start`` to the full length in multiples of 8 over
``ramp_steps`` steps. After the warmup every step uses the full length.

Re-packing policy (``repack``): a sample of ``full_len + 1`` tokens is cut into
``full_len // seq_len`` rows of ``seq_len + 1`` tokens, consecutive rows sharing one token
(row r = ``tokens[r*L : r*L + L + 1]``), so every (input, label) pair of a row is a pair of the
full sample and no pair is used twice. When ``seq_len`` does not divide ``full_len`` the last
``full_len % seq_len`` label positions of each sample are DROPPED and counted
(``dropped_positions``; the stateful ``SeqLenWarmup`` sums them for the logs and checkpoints).
Lengths that divide ``full_len`` (as in the staged example) drop nothing; ramp values are multiples
of 8 and generally do not divide, e.g. 72 into 512 drops 8 of 512 positions (1.6 %).
Attention context is shorter in a cut row, which is the point of the warmup.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SEQ_LEN_MULTIPLE = 8  # tensor-core friendly row lengths


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"seq_len_warmup.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SeqLenSchedule:
    """Row length per step. Build with ``from_stages`` or ``linear_ramp``; ``full_len`` is the
    dataset's sequence length (samples hold ``full_len + 1`` tokens)."""

    full_len: int
    stages: tuple[tuple[int, int], ...] = ()  # (length, steps), used in order
    ramp_start: int | None = None
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        _check_int("full_len", self.full_len, 1)
        if self.stages and self.ramp_start is not None:
            raise ValueError("seq_len_warmup: give either stages or a linear ramp, not both")
        previous = 0
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, tuple) or len(stage) != 2:
                raise ValueError(f"seq_len_warmup.stages[{i}] must be a (length, steps) pair, got {stage!r}")
            length, steps = stage
            _check_int(f"stages[{i}].length", length, 1)
            _check_int(f"stages[{i}].steps", steps, 1)
            if length > self.full_len:
                raise ValueError(f"seq_len_warmup.stages[{i}].length={length} is longer than the "
                                 f"full sequence length {self.full_len}")
            if length < previous:
                raise ValueError(f"seq_len_warmup.stages[{i}].length={length} is shorter than the stage "
                                 f"before it ({previous}); stage lengths must not decrease")
            previous = length
        if self.ramp_start is not None:
            _check_int("start", self.ramp_start, SEQ_LEN_MULTIPLE)
            _check_int("ramp_steps", self.ramp_steps, 1)
            if self.ramp_start % SEQ_LEN_MULTIPLE:
                raise ValueError(f"seq_len_warmup.start={self.ramp_start} is not a multiple of {SEQ_LEN_MULTIPLE}")
            if self.ramp_start > self.full_len:
                raise ValueError(f"seq_len_warmup.start={self.ramp_start} is longer than the full "
                                 f"sequence length {self.full_len}")

    @classmethod
    def from_stages(cls, full_len: int, stages) -> "SeqLenSchedule":
        """Stages ``[(length, steps), ...]`` in order, then ``full_len``."""
        return cls(full_len=full_len, stages=tuple(tuple(s) if isinstance(s, list) else s for s in stages))

    @classmethod
    def linear_ramp(cls, full_len: int, start: int, ramp_steps: int) -> "SeqLenSchedule":
        """From ``start`` up to ``full_len`` over ``ramp_steps`` steps, rounded down to multiples of 8."""
        return cls(full_len=full_len, ramp_start=start, ramp_steps=ramp_steps)

    @classmethod
    def constant(cls, full_len: int) -> "SeqLenSchedule":
        """No warmup: always ``full_len``."""
        return cls(full_len=full_len)

    @property
    def warmup_steps(self) -> int:
        """Steps before the full length is reached."""
        return self.ramp_steps if self.ramp_start is not None else sum(steps for _, steps in self.stages)

    def seq_len_at(self, step: int) -> int:
        """Row length of step ``step`` (0-based)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        if self.ramp_start is not None:
            if step >= self.ramp_steps:
                return self.full_len
            exact = self.ramp_start + (self.full_len - self.ramp_start) * step / self.ramp_steps
            return max(self.ramp_start, int(exact) // SEQ_LEN_MULTIPLE * SEQ_LEN_MULTIPLE)
        stage_end = 0
        for length, steps in self.stages:
            stage_end += steps
            if step < stage_end:
                return length
        return self.full_len


def dropped_positions(full_len: int, seq_len: int) -> int:
    """Label positions of one sample that ``repack`` leaves out (``full_len % seq_len``)."""
    return full_len % seq_len


def repack(batch_tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut ``[b, full_len + 1]`` samples into ``[b * (full_len // seq_len), seq_len + 1]`` rows.

    Row ``i * k + r`` (``k = full_len // seq_len``) is ``batch_tokens[i, r*L : r*L + L + 1]``:
    inputs ``row[:-1]`` and labels ``row[1:]`` are exactly the full sample's pairs at positions
    ``r*L .. r*L + L - 1``. The trailing ``full_len % seq_len`` positions are dropped (module doc).
    """
    if batch_tokens.ndim != 2:
        raise ValueError(f"repack expects tokens [batch, full_len + 1], got shape {tuple(batch_tokens.shape)}")
    full_len = batch_tokens.shape[1] - 1
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= full_len:
        raise ValueError(f"repack seq_len must be an integer in [1, {full_len}] (the samples' length), "
                         f"got {seq_len!r}")
    rows_per_sample = full_len // seq_len
    if rows_per_sample == 1:
        return batch_tokens[:, : seq_len + 1]
    # unfold makes overlapping windows of size L+1 with stride L; windows start at 0, L, 2L, ...
    windows = batch_tokens[:, : rows_per_sample * seq_len + 1].unfold(1, seq_len + 1, seq_len)
    return windows.reshape(-1, seq_len + 1)


class SeqLenWarmup:
    """Step counter over a ``SeqLenSchedule`` that re-packs batches and checkpoints its position."""

    def __init__(self, schedule: SeqLenSchedule):
        self.schedule = schedule
        self.step_count = 0
        self.dropped_tokens = 0

    @property
    def seq_len(self) -> int:
        """Row length of the next step."""
        return self.schedule.seq_len_at(self.step_count)

    def next_batch(self, batch_tokens: torch.Tensor) -> torch.Tensor:
        """Re-pack one step's samples ``[b, full_len + 1]`` for the current length and advance a step."""
        if batch_tokens.ndim != 2 or batch_tokens.shape[1] != self.schedule.full_len + 1:
            raise ValueError(f"seq-len warmup expects batches [batch, {self.schedule.full_len + 1}] "
                             f"(full_len + 1), got {tuple(batch_tokens.shape)}")
        seq_len = self.seq_len
        rows = repack(batch_tokens, seq_len)
        self.dropped_tokens += batch_tokens.shape[0] * dropped_positions(self.schedule.full_len, seq_len)
        self.step_count += 1
        return rows

    def state_dict(self) -> dict:
        """Step, the length in force at that step, and the dropped-token count."""
        return {"step": self.step_count, "seq_len": self.seq_len, "dropped_tokens": self.dropped_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Restore; ValueError if this schedule gives another length at the saved step than the
        checkpoint recorded (the schedule was changed between save and resume)."""
        missing = {"step", "seq_len", "dropped_tokens"} - set(state)
        if missing:
            raise ValueError(f"seq-len warmup state is missing {sorted(missing)}; got keys {sorted(state)}")
        expected = self.schedule.seq_len_at(int(state["step"]))
        if expected != state["seq_len"]:
            raise ValueError(f"the checkpoint was at step {state['step']} with seq_len {state['seq_len']}, but "
                             f"the configured seq-len warmup gives {expected} at that step; restore the "
                             "warmup settings the run was started with")
        self.step_count = int(state["step"])
        self.dropped_tokens = int(state["dropped_tokens"])
