"""Learning-rate schedule: linear warmup -> cosine or linear decay to ``min_lr`` -> ``min_lr`` held to the end.

``progress`` is counted in optimizer steps or in tokens (``unit``). Counting tokens keeps the
schedule tied to how much data has been seen when the tokens per step change, as they do during
sequence-length warmup with a fixed number of samples per step.

Convention: the learning rate of a step is ``lr_at(progress after that step's batch)``, so the
first step already has a non-zero rate (``LRScheduler.step`` does this).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megagpt.config.sections import LR_DECAY_STYLES

LR_UNITS = ("steps", "tokens")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LRSchedule:
    """``peak_lr`` reached at ``warmup`` (progress units), down to ``min_lr`` along a cosine or a straight
    line (``decay_style``) at ``total * (1 - constant_fraction)``, then ``min_lr`` until ``total`` and beyond."""

    peak_lr: float
    min_lr: float
    warmup: int
    total: int
    constant_fraction: float = 0.0
    unit: str = "steps"
    decay_style: str = "cosine"  # one of LR_DECAY_STYLES

    def __post_init__(self) -> None:
        s = "lr_schedule"
        if self.unit not in LR_UNITS:
            raise ValueError(f"{s}.unit={self.unit!r} is not one of {list(LR_UNITS)}")
        if self.decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"{s}.decay_style={self.decay_style!r} is not one of {list(LR_DECAY_STYLES)}")
        if not _is_number(self.peak_lr) or self.peak_lr <= 0:
            raise ValueError(f"{s}.peak_lr must be a number > 0, got {self.peak_lr!r}")
        if not _is_number(self.min_lr) or not 0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"{s}.min_lr must be in [0, peak_lr={self.peak_lr}], got {self.min_lr!r}")
        for name in ("warmup", "total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{s}.{name} must be an integer >= 0 ({self.unit}), got {value!r}")
        if self.total <= 0:
            raise ValueError(f"{s}.total must be > 0 ({self.unit}), got {self.total!r}")
        if not _is_number(self.constant_fraction) or not 0 <= self.constant_fraction < 1:
            raise ValueError(f"{s}.constant_fraction must be in [0, 1), got {self.constant_fraction!r}")
        if self.warmup > self.decay_end:
            raise ValueError(
                f"{s}.warmup={self.warmup} ends after the decay ends at total * (1 - constant_fraction)"
                f" = {self.decay_end} {self.unit}; shorten warmup or constant_fraction")

    @property
    def decay_end(self) -> float:
        """Progress at which the decay reaches ``min_lr`` and the constant tail starts."""
        return self.total * (1.0 - self.constant_fraction)

    def lr_at(self, progress: float) -> float:
        """The learning rate after ``progress`` steps or tokens (a pure function)."""
        if progress < 0:
            raise ValueError(f"progress must be >= 0 {self.unit}, got {progress!r}")
        if progress < self.warmup:
            return self.peak_lr * progress / self.warmup
        if progress >= self.decay_end:
            return self.min_lr
        decay_length = self.decay_end - self.warmup  # > 0 here: warmup <= progress < decay_end
        done = (progress - self.warmup) / decay_length
        remaining = 1.0 - done if self.decay_style == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
        return self.min_lr + (self.peak_lr - self.min_lr) * remaining


class LRScheduler:
    """Counts steps and tokens, sets the optimizer's learning rate, and checkpoints the counts."""

    def __init__(self, schedule: LRSchedule):
        self.schedule = schedule
        self.steps = 0
        self.tokens = 0

    @property
    def progress(self) -> int:
        """Steps or tokens consumed so far, in the schedule's unit."""
        return self.steps if self.schedule.unit == "steps" else self.tokens

    def step(self, tokens: int, optimizer=None) -> float:
        """Account for one optimizer step that trains on ``tokens`` tokens (labels, all ranks);
        return its learning rate, also written into every group of ``optimizer`` when given."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens per step must be an integer >= 0, got {tokens!r}")
        self.steps += 1
        self.tokens += tokens
        lr = self.schedule.lr_at(self.progress)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        """The counts (the schedule itself comes from the config, so a run can be extended)."""
        return {"steps": self.steps, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counts saved by ``state_dict``."""
        missing = {"steps", "tokens"} - set(state)
        if missing:
            raise ValueError(f"LR scheduler state is missing {sorted(missing)}; got keys {sorted(state)}")
        self.steps = int(state["steps"])
        self.tokens = int(state["tokens"])
