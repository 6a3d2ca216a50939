"""The checkpoints of one run that TracInCP sums over, and the learning rate each was trained at.

``list_checkpoints`` accepts training ``--save`` directories (every ``step<N>`` in them, or the ``--steps`` asked
for), single step directories, and consolidated (universal) directories, and refuses checkpoints of different
shapes or from different runs, naming them. ``load_checkpoint`` reads one (any tp/pp/dp layout, through
``convert.consolidate``) with its weights, its fp32 Adam moments when asked, and its learning rate: the LR schedule
of its own config at the progress its scheduler state records (the rate of the last step before it was saved).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megagpt.checkpoint_dir import step_tags, tag_step
from megagpt.config import Config, ModelConfig
from megagpt.convert.readers import param_layout
from megagpt.convert.universal import CONFIG_FILE, STATE_FILE, consolidate, is_universal_dir, load_universal
from megagpt.convert.weights import ModelWeights

# Config parts that identify a run: checkpoints that differ in them were not saved by one training run.
RUN_IDENTITY = ("seed", "data", "tokenizer")


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint not yet read: its directory, training step and saved config."""

    path: str
    step: int
    config: dict


@dataclass
class LoadedCheckpoint:
    """One checkpoint read for scoring."""

    ref: CheckpointRef
    weights: ModelWeights
    lr: float
    moments: dict[str, dict[str, torch.Tensor]]  # empty unless asked for
    optimizer_step: float
    optimizer: str  # "torch", "bitsandbytes" or "none"


def _is_step_dir(path: Path) -> bool:
    try:
        tag_step(path.name)
        return True
    except ValueError:
        return False


def _step_ref(step_dir: Path) -> CheckpointRef:
    config_path = step_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"checkpoint {step_dir} is incomplete (no {CONFIG_FILE}: its save was interrupted); leave it "
                         "out with --steps")
    return CheckpointRef(str(step_dir), tag_step(step_dir.name),
                         json.loads(config_path.read_text()))


def _universal_ref(path: Path) -> CheckpointRef:
    state = json.loads((path / STATE_FILE).read_text())
    step = int(state.get("client_state", {}).get("step", state["optimizer"]["step"]))
    return CheckpointRef(str(path), step, json.loads((path / CONFIG_FILE).read_text()))


def parse_steps(text: str | None) -> list[int] | None:
    """``--steps``: None or "all" for every checkpoint, else comma-separated step numbers."""
    if text is None or text.strip() == "all":
        return None
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--steps {text!r}: give 'all' or comma-separated step numbers, e.g. 100,200") from None
    if not steps or len(set(steps)) != len(steps):
        raise ValueError(f"--steps {text!r}: give distinct step numbers")
    return steps


def list_checkpoints(paths: list[str], steps: list[int] | None = None) -> list[CheckpointRef]:
    """The checkpoints in ``paths`` (save, step or consolidated directories), ordered by step, filtered by
    ``steps``; refuses different shapes or runs (``check_same_run``)."""
    refs = []
    for text in paths:
        path = Path(text)
        if is_universal_dir(path):
            refs.append(_universal_ref(path))
        elif path.is_dir() and _is_step_dir(path):
            refs.append(_step_ref(path))
        elif path.is_dir():
            found = [path / tag for tag in step_tags(path)]  # oldest first
            if not found:
                raise ValueError(f"--checkpoints {path}: no step<N> checkpoint directories in it, and it is neither "
                                 "a step nor a consolidated checkpoint")
            wanted = None if steps is None else set(steps)
            refs += [_step_ref(p) for p in found if wanted is None or tag_step(p.name) in wanted]
        else:
            raise ValueError(f"--checkpoints {path} is not a checkpoint directory")
    if steps is not None:
        missing = sorted(set(steps) - {r.step for r in refs})
        if missing:
            raise ValueError(f"--steps {missing} not found; the checkpoints hold steps {sorted({r.step for r in refs})}")
        refs = [r for r in refs if r.step in set(steps)]
    refs.sort(key=lambda r: r.step)
    check_same_run(refs)
    return refs


def check_same_run(refs: list[CheckpointRef]) -> None:
    """Refuse checkpoints of different parameter shapes, from different runs, or two of one step."""
    if not refs:
        raise ValueError("no checkpoints to score with")
    first = refs[0]
    shapes = {n: tuple(s) for n, (s, _) in param_layout(ModelConfig.from_dict(first.config["model"])).items()}
    for ref in refs[1:]:
        theirs = {n: tuple(s) for n, (s, _) in param_layout(ModelConfig.from_dict(ref.config["model"])).items()}
        if theirs != shapes:
            differ = sorted(n for n in set(shapes) | set(theirs) if shapes.get(n) != theirs.get(n))
            raise ValueError(f"checkpoints of different shapes: {first.path} and {ref.path} differ in {differ[:3]} "
                             "(TracInCP sums over the checkpoints of one run)")
        other = [k for k in RUN_IDENTITY if first.config.get(k) != ref.config.get(k)]
        if first.config.get("optimizer", {}).get("kind") != ref.config.get("optimizer", {}).get("kind"):
            other.append("optimizer.kind")
        if other:
            raise ValueError(f"checkpoints from different runs: {first.path} and {ref.path} differ in {other} "
                             "(TracInCP sums over the checkpoints of one run)")
    steps = [r.step for r in refs]
    if len(set(steps)) != len(steps):
        twice = sorted({s for s in steps if steps.count(s) > 1})
        raise ValueError(f"several checkpoints of step(s) {twice}: "
                         f"{[r.path for r in refs if r.step in twice]}; give each step once")


def learning_rate(config: dict, client_state: dict, where: str) -> float:
    """The LR of the last step before the checkpoint: the config's schedule at the saved scheduler progress."""
    from megagpt.training import build_schedules

    counts = client_state.get("lr_scheduler")
    if not counts:
        raise ValueError(f"{where} holds no learning-rate scheduler state (not saved by megagpt's trainer?): "
                         "its learning rate is unknown")
    scheduler, _ = build_schedules(Config.from_dict(config))
    scheduler.load_state_dict(counts)
    return scheduler.schedule.lr_at(scheduler.progress)


def load_checkpoint(ref: CheckpointRef, with_moments: bool = False, progress: bool = False) -> LoadedCheckpoint:
    """Read ``ref``: full fp32 weights, its learning rate and (``with_moments``) the optimizer moments."""
    if is_universal_dir(ref.path):
        universal = load_universal(ref.path)
    else:
        universal = consolidate(ref.path, progress=progress, weights_only=not with_moments)
    if with_moments and universal.optimizer == "none":
        raise ValueError(f"checkpoint {ref.path} holds weights only: --adam needs its optimizer state")
    weights = ModelWeights(universal.config, universal.weights, f"checkpoint {ref.path}")
    return LoadedCheckpoint(ref, weights, learning_rate(universal.config, universal.client_state, ref.path),
                            universal.moments if with_moments else {}, universal.step, universal.optimizer)


__all__ = ["CheckpointRef", "LoadedCheckpoint", "check_same_run", "learning_rate", "list_checkpoints",
           "load_checkpoint", "parse_steps"]
