"""The schedule a run will follow, read from the trainer's own schedule objects: row length per stage, the
learning rate at its milestones, tokens per step and in total. ``--dry-run`` prints it; the recipe tests
(tests/config/test_recipes.py) check it against the published recipes.

Nothing here is recomputed from the JSON: the learning rates come from stepping the ``LRScheduler`` that
``megagpt.training.build_schedules`` builds, exactly as the training loop steps it (one call per optimizer
step with that step's tokens), and the row lengths from its ``SeqLenWarmup``.
"""
from __future__ import annotations

from dataclasses import dataclass

from megagpt.config import Config
from megagpt.optim import padding_positions


@dataclass(frozen=True)
class Stage:
    """Steps ``first``..``last`` (0-based, inclusive) train on rows of ``seq_len`` tokens."""

    seq_len: int
    first: int
    last: int
    rows_per_step: int  # rows over all ranks, padded rows included
    padding_per_step: int  # positions with an ignored label, over all ranks


@dataclass(frozen=True)
class SchedulePlan:
    """What ``megagpt.training.train`` will do, step by step (``lrs[i]``: the learning rate of step ``i``)."""

    stages: tuple[Stage, ...]
    lrs: tuple[float, ...]
    tokens_per_step: int  # labels trained per optimizer step, all ranks (constant: re-packing drops none)
    warmup_end_step: int  # the step that first trains at the peak LR (0 without warmup)
    decay_end_step: int  # the first step at min_lr (the constant tail's start), train_iters - 1 at the latest
    unit: str
    decay_style: str

    @property
    def total_tokens(self) -> int:
        """Labels trained over the whole run."""
        return self.tokens_per_step * len(self.lrs)

    def seq_len_at(self, step: int) -> int:
        """Row length of step ``step`` (0-based); ValueError past the last step."""
        for stage in self.stages:
            if stage.first <= step <= stage.last:
                return stage.seq_len
        raise ValueError(f"step {step} is not in this run's steps 0..{len(self.lrs) - 1}")

    def milestones(self) -> list[tuple[str, int]]:
        """(name, step) of the points a recipe states: the first step, the end of warmup, the start of the
        constant tail (where the decay reaches min_lr), the last step."""
        last = len(self.lrs) - 1
        tail = self.decay_end_step
        share = 100 * (tail + 1) * self.tokens_per_step / self.total_tokens  # trained once that step is done
        return [("first step", 0), ("end of warmup", self.warmup_end_step),
                (f"min_lr reached, {share:.0f} % of the tokens", tail), ("last step", last)]


def schedule_plan(config: Config) -> SchedulePlan:
    """Step the trainer's schedules through the whole run (fast: no model, no data)."""
    from megagpt.training import build_schedules

    lr_scheduler, warmup = build_schedules(config)
    schedule, seq = lr_scheduler.schedule, warmup.schedule
    tokens, steps = config.tokens_per_step, config.schedule.train_iters
    lrs, warmup_end, decay_end = [], None, None
    for step in range(steps):
        lrs.append(lr_scheduler.step(tokens))  # what the loop does: every step trains on config.tokens_per_step
        if warmup_end is None and lr_scheduler.progress >= schedule.warmup:
            warmup_end = step
        if decay_end is None and lr_scheduler.progress >= schedule.decay_end:
            decay_end = step
    micro, full_len = config.batch.micro_batch, config.model.seq_len
    micro_batches = config.batch.global_batch // micro  # over all ranks
    stages, first = [], 0
    changes = range(1, min(seq.warmup_steps, steps - 1) + 1)  # the length is constant after the warmup
    for step in [*changes, steps]:
        if step == steps or seq.seq_len_at(step) != seq.seq_len_at(first):
            length = seq.seq_len_at(first)
            padding = padding_positions(micro, full_len, length)
            stages.append(Stage(length, first, step - 1, micro_batches * (micro * full_len + padding) // length,
                                micro_batches * padding))
            first = step
    return SchedulePlan(stages=tuple(stages), lrs=tuple(lrs), tokens_per_step=tokens,
                        warmup_end_step=0 if warmup_end is None else warmup_end,
                        decay_end_step=steps - 1 if decay_end is None else decay_end,
                        unit=schedule.unit, decay_style=schedule.decay_style)


def format_plan(plan: SchedulePlan) -> str:
    """The summary ``--dry-run`` prints."""
    steps = len(plan.lrs)
    lines = [f"schedule: {steps:,} steps x {plan.tokens_per_step:,} tokens = {plan.total_tokens:,} tokens "
             f"({plan.total_tokens / 1e9:.2f} B)"]
    for stage in plan.stages:
        padded = (f", {stage.padding_per_step:,} padded positions per step"
                  f" ({100 * stage.padding_per_step / (stage.padding_per_step + plan.tokens_per_step):.1f} %)"
                  if stage.padding_per_step else "")
        lines.append(f"  rows of {stage.seq_len}: steps {stage.first:,}-{stage.last:,} "
                     f"({stage.last - stage.first + 1:,} steps, {stage.rows_per_step:,} rows per step{padded})")
    lines.append(f"  learning rate ({plan.decay_style} decay, counted in {plan.unit}):")
    for name, step in plan.milestones():
        lines.append(f"    step {step:,} ({name}): {plan.lrs[step]:.4g}")
    return "\n".join(lines)
