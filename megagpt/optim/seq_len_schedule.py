"""Sequence-length warmup: train on short rows first, cut from the full-length samples.

Two forms: explicit stages ``[(length, steps), ...]`` (e.g. 128, 192, 256, 384, 512 over the first
30 % of training), or a linear ramp from ``start`` to the full length in multiples of 8 over
``ramp_steps`` steps. After the warmup every step uses the full length.

Re-packing (``repack``): a micro batch of ``m`` samples of ``full_len + 1`` tokens holds ``m * full_len``
(input, label) pairs. They are laid end to end, in order, and cut into rows of ``seq_len`` pairs; the last
row is filled up with ignored labels (``IGNORE_INDEX``) when ``seq_len`` does not divide ``m * full_len``.
Every pair is trained on exactly once, whatever the length (no token is dropped), and every micro batch
keeps exactly its own samples' ``m * full_len`` labels, so the mean loss of each micro batch, averaged over
micro batches and ranks, weighs every label alike, as at full length. Lengths that divide ``full_len``
(128 or 256 of 512) cut each sample into whole rows; others (192, 384; most ramp values) let a row run on
from one sample's end into the next sample's start: those positions then see the other sample as context,
as packed documents see the one before them. Padding costs compute, never data: under one row per micro
batch (``padding_positions``; 8 samples of 512 at 192 pad 128 of 4,224 positions, 3 %).
Attention context is shorter in a cut row, which is the point of the warmup.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SEQ_LEN_MULTIPLE = 8  # tensor-core friendly row lengths
IGNORE_INDEX = -100  # the label the model's loss skips (F.cross_entropy's default ignore_index)


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


def padding_positions(samples: int, full_len: int, seq_len: int) -> int:
    """Positions ``repack`` fills with ignored labels in a micro batch of ``samples`` samples."""
    pairs = samples * full_len
    return -pairs % seq_len


def repack(batch_tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a micro batch of samples ``[m, full_len + 1]`` into rows: ``(inputs, labels)``, both
    ``[ceil(m * full_len / seq_len), seq_len]``.

    The rows hold the samples' (input, label) pairs ``(tokens[i, p], tokens[i, p + 1])`` in order of ``i``,
    then ``p``; the positions after the last pair have input 0 and label ``IGNORE_INDEX`` (module doc).
    At ``seq_len == full_len`` this is ``(tokens[:, :-1], tokens[:, 1:])``.
    """
    if batch_tokens.ndim != 2:
        raise ValueError(f"repack expects tokens [batch, full_len + 1], got shape {tuple(batch_tokens.shape)}")
    full_len = batch_tokens.shape[1] - 1
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= full_len:
        raise ValueError(f"repack seq_len must be an integer in [1, {full_len}] (the samples' length), "
                         f"got {seq_len!r}")
    inputs, labels = batch_tokens[:, :-1], batch_tokens[:, 1:]
    if seq_len == full_len:
        return inputs, labels
    inputs, labels = inputs.reshape(-1), labels.reshape(-1)
    padding = padding_positions(batch_tokens.shape[0], full_len, seq_len)
    if padding:
        inputs = torch.cat([inputs, inputs.new_zeros(padding)])
        labels = torch.cat([labels, labels.new_full((padding,), IGNORE_INDEX)])
    return inputs.view(-1, seq_len), labels.view(-1, seq_len)


class SeqLenWarmup:
    """Step counter over a ``SeqLenSchedule`` that re-packs each step's micro batches and checkpoints its
    position."""

    def __init__(self, schedule: SeqLenSchedule):
        self.schedule = schedule
        self.step_count = 0
        self.padding_positions = 0  # summed over this rank's steps, for the logs

    @property
    def seq_len(self) -> int:
        """Row length of the next step."""
        return self.schedule.seq_len_at(self.step_count)

    def next_step(self, micro_batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Re-pack one step's micro batches of samples ``[m, full_len + 1]`` into ``(inputs, labels)`` rows of
        the current length, one pair per micro batch (``repack``), and advance a step."""
        full_len, seq_len = self.schedule.full_len, self.seq_len
        packed = []
        for micro in micro_batches:
            if micro.ndim != 2 or micro.shape[1] != full_len + 1:
                raise ValueError(f"seq-len warmup expects micro batches [batch, {full_len + 1}] "
                                 f"(full_len + 1), got {tuple(micro.shape)}")
            packed.append(repack(micro, seq_len))
            self.padding_positions += padding_positions(micro.shape[0], full_len, seq_len)
        self.step_count += 1
        return packed

    def state_dict(self) -> dict:
        """Step, the length in force at that step, and the padding count."""
        return {"step": self.step_count, "seq_len": self.seq_len, "padding_positions": self.padding_positions}

    def load_state_dict(self, state: dict) -> None:
        """Restore; ValueError if this schedule gives another length at the saved step than the
        checkpoint recorded (the schedule was changed between save and resume)."""
        missing = {"step", "seq_len"} - set(state)
        if missing:
            raise ValueError(f"seq-len warmup state is missing {sorted(missing)}; got keys {sorted(state)}")
        expected = self.schedule.seq_len_at(int(state["step"]))
        if expected != state["seq_len"]:
            raise ValueError(f"the checkpoint was at step {state['step']} with seq_len {state['seq_len']}, but "
                             f"the configured seq-len warmup gives {expected} at that step; restore the "
                             "warmup settings the run was started with")
        step = int(state["step"])
        if "padding_positions" not in state:  # written when re-packing dropped each sample's remainder
            full_len = self.schedule.full_len
            changed = sorted({self.schedule.seq_len_at(s) for s in range(step, self.schedule.warmup_steps)
                              if full_len % self.schedule.seq_len_at(s)})
            if changed:
                raise ValueError(f"the checkpoint at step {step} was written when the sequence-length warmup dropped "
                                 f"the last full_len % length labels of each sample; the rest of its warmup has "
                                 f"lengths {changed} that do not divide {full_len}, where re-packing now trains every "
                                 "label, so the resumed run would not repeat the original: finish the warmup with "
                                 "the megagpt version that wrote it, or start a new run")
        self.step_count = step
        self.padding_positions = int(state.get("padding_positions", 0))
