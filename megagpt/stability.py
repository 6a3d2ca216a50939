"""Divergence handling: a step whose loss or gradients are not finite is skipped on every rank, and too many
in a row stop the run (Megatron's ``--check-for-nan-in-loss-and-grad``, without losing the run's state).

How a step is skipped without DeepSpeed knowing: the guard wraps the torch optimizer DeepSpeed steps (the
client optimizer under ZeRO-0, the one inside ZeRO-1/2's wrapper), and that ``step`` returns without touching
weights or moments when the guard decided to skip. The decision is taken once per optimizer step, before the
last micro batch's ``engine.step()``: this rank's losses (accumulated on the device, no sync per micro batch)
and, under ZeRO-0, its reduced gradients are checked, then one all-reduce over every rank makes all agree.
ZeRO-1/2 check their gradient partitions themselves (DeepSpeed's ``check_grad_overflow``) and skip the step;
the guard counts those skips too (``engine.skipped_steps``). The training loop restores the LR and
sequence-length schedules of a skipped step. fp16 keeps DeepSpeed's dynamic loss scaler: its overflow skips
are part of normal training, so the guard stays out of the way.

Loss-spike recovery (``stability.spike_recovery``, off by default): ``SpikeDetector`` compares each step's
loss (averaged over ranks: one host sync per step while it is on) with the previous ``spike_window`` losses; on a
spike the training loop rolls back to the newest checkpoint and skips the samples of the ``spike_skip_batches``
steps up to the spike, as the operators of OPT, BLOOM and PaLM did by hand. Each recovery is appended to
``{save}/recoveries.json`` before the rollback (``append_recovery``), and the skipped ranges are part of the
loader's checkpointed state, so a run killed during or after a recovery resumes exactly as the uninterrupted one.

Pipeline engines (``train_batch``) run every micro batch and the optimizer step inside DeepSpeed, and always
with ZeRO-1, whose partition check skips non-finite gradients. The loss is only known on the last stage; the
guard wraps the engine's optimizer-step instruction, which every stage runs once per step after its last
backward and its gradient reductions: there it checks the last stage's summed micro-batch losses
(``engine.total_loss``) and the same all-reduce over every rank decides, so a non-finite loss with finite
gradients is skipped on every stage.
"""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Callable

import torch

from megagpt.engine import is_pipeline_engine
from megagpt.optim.optimizers import find_wrapped

RECOVERIES = "recoveries.json"  # in the save directory: every spike recovery, so resumes skip the same samples


class TrainingDiverged(RuntimeError):
    """Raised when ``max_consecutive_skips`` steps in a row were not finite; names the step and the last good
    checkpoint."""


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that DeepSpeed finally steps (inside ZeRO's wrapper, or the client optimizer)."""
    optimizer = find_wrapped(engine.optimizer, lambda o: isinstance(o, torch.optim.Optimizer))
    if optimizer is None:
        raise TypeError(f"cannot find the torch optimizer inside {type(engine.optimizer).__name__}")
    return optimizer


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor on the tensors' device: every element finite (no host sync)."""
    norms = torch._foreach_norm([t.float() if t.dtype not in (torch.float32, torch.float64) else t for t in tensors])
    return torch.isfinite(torch.stack(norms)).all()


class NonFiniteGuard:
    """Skip-and-count of non-finite steps for one engine. Per optimizer step: ``observe_loss`` for every micro
    batch, ``decide`` before the last ``engine.step()``, ``finish_step`` after it (whether the step was skipped),
    then ``raise_if_diverged`` (``TrainingDiverged`` after too many in a row)."""

    def __init__(self, engine, max_consecutive_skips: int, any_rank: Callable[[bool | torch.Tensor], bool], enabled: bool = True):
        self.engine = engine
        self.max_consecutive_skips = max_consecutive_skips
        self.any_rank = any_rank
        self.enabled = enabled and not engine.fp16_enabled()
        # ZeRO-1/2 flatten gradients into partitions inside engine.step(); module .grad is only whole under ZeRO-0
        self.check_module_grads = not engine.zero_optimization()
        self.skipped_total = 0
        self.consecutive = 0
        self._loss_ok: torch.Tensor | None = None
        self._skip = False
        self._deepspeed_skips = engine.skipped_steps
        if self.enabled:
            self._wrap(base_optimizer(engine))
            if is_pipeline_engine(engine):
                self._wrap_pipeline_step(engine)

    def _wrap(self, optimizer: torch.optim.Optimizer) -> None:
        step = optimizer.step

        def guarded_step(*args, **kwargs):
            if self._skip:  # weights and moments stay as they were
                return None
            return step(*args, **kwargs)

        optimizer.step = guarded_step

    def _wrap_pipeline_step(self, engine) -> None:
        from deepspeed.runtime.pipe.schedule import OptimizerStep

        # The engine runs each instruction of its schedule through _INSTRUCTION_MAP (a class attribute of plain
        # functions it binds per call), so that map, not the bound method, is what must change: a copy on this
        # engine only.
        instructions = getattr(engine, "_INSTRUCTION_MAP", None)
        if not isinstance(instructions, dict) or OptimizerStep not in instructions:
            raise RuntimeError(f"{type(engine).__name__} has no _INSTRUCTION_MAP entry for OptimizerStep: this "
                               "DeepSpeed's pipeline engine cannot be guarded against non-finite losses; use the "
                               "DeepSpeed version of requirements/cpu.lock or set stability.skip_non_finite=false")
        exec_step = instructions[OptimizerStep]

        def guarded_exec_step(pipeline_engine, *args, **kwargs):
            # every stage runs this once per step, after its last backward and its gradient reductions, in the
            # same order: the all-reduce in decide() meets on every rank
            total_loss = getattr(pipeline_engine, "total_loss", None)  # summed losses; None off the last stage
            if total_loss is not None:
                self.observe_loss(total_loss if torch.is_tensor(total_loss) else torch.stack(list(total_loss)))
            self.decide()
            return exec_step(pipeline_engine, *args, **kwargs)

        engine._INSTRUCTION_MAP = {**instructions, OptimizerStep: guarded_exec_step}

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Remember whether one micro batch's loss was finite (on the device: no sync)."""
        if self.enabled:
            ok = torch.isfinite(loss.detach()).all()
            self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def decide(self) -> bool:
        """Before the step's last ``engine.step()``: True (on every rank) when any rank saw a non-finite loss or,
        under ZeRO-0, a non-finite gradient. One host sync and one all-reduce per optimizer step."""
        if not self.enabled:
            return False
        ok = self._loss_ok if self._loss_ok is not None else torch.ones((), dtype=torch.bool)
        if self.check_module_grads:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            if grads:
                ok = ok.to(grads[0].device) & _all_finite(grads)
        self._loss_ok = None
        self._skip = self.any_rank(~ok)  # reduced on the device: the only host sync is the answer's
        return self._skip

    def finish_step(self) -> bool:
        """After the step: whether it was skipped (by the guard, or by DeepSpeed's own gradient check)."""
        deepspeed_skipped = self.engine.skipped_steps != self._deepspeed_skips
        self._deepspeed_skips = self.engine.skipped_steps
        skipped = self.enabled and (self._skip or deepspeed_skipped)
        self._skip = False
        self.consecutive = self.consecutive + 1 if skipped else 0
        self.skipped_total += skipped
        return skipped

    def raise_if_diverged(self, step: int, last_good: str | None) -> None:
        """``TrainingDiverged`` once ``max_consecutive_skips`` steps in a row were skipped."""
        if self.consecutive >= self.max_consecutive_skips:
            raise TrainingDiverged(
                f"training diverged: the loss or gradient norm was not finite for {self.consecutive} steps in a row "
                f"(steps {step - self.consecutive + 1}-{step}; stability.max_consecutive_skips="
                f"{self.max_consecutive_skips}); nothing more was saved. Last good checkpoint: "
                f"{last_good or 'none (no checkpoint was saved before the divergence)'}. Lower optimizer.lr, raise "
                "warmup, or check the data, then resume from it")


class SpikeDetector:
    """Is a loss a spike against the previous ``window`` (finite) losses: above ``mean + std * stdev``, or above
    ``ratio * mean`` when ``ratio`` is set. Says no until the window is full."""

    def __init__(self, window: int, std: float, ratio: float | None = None):
        self.window, self.std, self.ratio = window, std, ratio
        self.recent: list[float] = []

    def is_spike(self, loss: float) -> bool:
        if len(self.recent) < self.window:
            return False
        mean = statistics.fmean(self.recent)
        if self.ratio is not None:
            return loss > self.ratio * mean
        return loss > mean + self.std * statistics.pstdev(self.recent)

    def add(self, loss: float) -> None:
        self.recent = (self.recent + [float(loss)])[-self.window:]

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.recent = [float(x) for x in state["recent"]][-self.window:]


def read_recoveries(save_dir: str | os.PathLike | None) -> list[dict]:
    """The spike recoveries recorded in ``save_dir`` (oldest first); [] when none."""
    path = Path(save_dir) / RECOVERIES if save_dir is not None else None
    if path is None or not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
        return [dict(r, skipped_samples=[int(x) for x in r["skipped_samples"]]) for r in records]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is unreadable ({err}): it lists the samples skipped after loss spikes; restore "
                         "it, or delete it to train on those samples again") from None


def append_recovery(save_dir: str | os.PathLike, record: dict) -> None:
    """Add one recovery to ``save_dir/recoveries.json`` (atomically; rank 0 only)."""
    from megagpt.checkpoint_dir import atomic_write_text

    records = read_recoveries(save_dir) + [record]
    atomic_write_text(Path(save_dir) / RECOVERIES, json.dumps(records, indent=1))


__all__ = ["NonFiniteGuard", "SpikeDetector", "TrainingDiverged", "append_recovery", "base_optimizer",
           "read_recoveries"]
