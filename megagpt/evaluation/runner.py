"""Run a list of evaluation tasks over one or more sequence lengths, and the checkpoint facts a report needs."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from megagpt.evaluation.distributed import Shard
from megagpt.evaluation.tasks import MC_FORMATS, evaluate_lambada, evaluate_multiple_choice
from megagpt.evaluation.text import evaluate_data, evaluate_text

RESULTS_FILE = "eval_results.json"
DEFAULT_SPLIT = "949,50,1"


@dataclass
class EvalTasks:
    """What to evaluate; ``multiple_choice`` holds ``(path, format)`` with format ``auto`` or one of MC_FORMATS."""

    text_files: list[str] = field(default_factory=list)
    data_paths: list[str] = field(default_factory=list)
    lambada: list[str] = field(default_factory=list)
    multiple_choice: list[tuple[str, str]] = field(default_factory=list)

    @property
    def needs_tokenizer(self) -> bool:
        return bool(self.text_files or self.lambada or self.multiple_choice)

    def __post_init__(self) -> None:
        if not (self.text_files or self.data_paths or self.lambada or self.multiple_choice):
            raise ValueError("nothing to evaluate: give --text-file, --data-path, --lambada or --multiple-choice")
        for path, fmt in self.multiple_choice:
            if fmt not in ("auto", *MC_FORMATS):
                raise ValueError(f"--mc-format {fmt!r} for {path} is not one of {['auto', *MC_FORMATS]}")


@dataclass
class EvalSettings:
    """How to evaluate. ``stride`` None: each length's own (non-overlapping windows)."""

    seq_lengths: list[int]
    stride: int | None = None
    batch_size: int = 8
    split: str = DEFAULT_SPLIT
    split_name: str = "valid"
    max_windows: int | None = None  # text / data tasks: score only the first N windows
    limit: int | None = None  # LAMBADA / multiple choice: only the first N examples
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.seq_lengths or any(not isinstance(n, int) or n < 1 for n in self.seq_lengths):
            raise ValueError(f"sequence lengths must be positive integers, got {self.seq_lengths}")
        for name in ("batch_size", "max_windows", "limit", "stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.stride is not None and self.stride > min(self.seq_lengths):
            raise ValueError(f"--stride {self.stride} is longer than the sequence length {min(self.seq_lengths)}: "
                             "tokens would be skipped; give a stride <= every length")


def check_lengths(model_config, seq_lengths: list[int]):
    """The model config to build for ``seq_lengths``: learned positions cannot go past the model's ``seq_len``
    (ValueError); ALiBi or no positions can, with ``seq_len`` raised to the longest length."""
    longest = max(seq_lengths)
    if longest <= model_config.seq_len:
        return model_config
    if model_config.position == "learned":
        raise ValueError(f"sequence length {longest} is longer than the model's seq_len={model_config.seq_len}, "
                         "which learned position embeddings cannot exceed; evaluate at lengths <= "
                         f"{model_config.seq_len}")
    return dataclasses.replace(model_config, seq_len=longest)


def evaluate_model(model, tokenizer, tasks: EvalTasks, settings: EvalSettings, shard: Shard = Shard()) -> list[dict]:
    """Every task at every length of ``settings``: one result dict per (task, length), tasks in the order text,
    data, LAMBADA, multiple choice; identical on every rank of ``shard``."""
    if tasks.needs_tokenizer and tokenizer is None:
        raise ValueError("text, LAMBADA and multiple-choice tasks need a tokenizer: none is recorded in the "
                         "checkpoint's config; give --tokenizer-type and its files")
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} (model.vocab_size): wrong tokenizer for this checkpoint?")
    from megagpt.data.tokenizer_record import check_dataset

    for prefix in tasks.data_paths:  # the dataset's tokenizer record (or scanned ids) against the model
        check_dataset(prefix, model.config.vocab_size)
    s = settings
    progress = s.progress and shard.is_main
    results = []
    for length in s.seq_lengths:
        stride = s.stride or length
        results += [evaluate_text(model, tokenizer, path, length, stride, s.batch_size, shard, s.max_windows,
                                  progress) for path in tasks.text_files]
        results += [evaluate_data(model, prefix, s.split, s.split_name, length, stride, s.batch_size, shard,
                                  s.max_windows, progress) for prefix in tasks.data_paths]
        results += [evaluate_lambada(model, tokenizer, path, length, s.batch_size, shard, s.limit, progress)
                    for path in tasks.lambada]
        results += [evaluate_multiple_choice(model, tokenizer, path, length, s.batch_size, fmt, shard, s.limit,
                                             progress) for path, fmt in tasks.multiple_choice]
    order = {task: i for i, task in enumerate(dict.fromkeys(r["task"] for r in results))}
    return sorted(results, key=lambda r: order[r["task"]])  # stable: each task's lengths stay in order


def checkpoint_home(path: str | Path) -> Path:
    """The directory a checkpoint's results go in by default: the step directory ``latest`` names for a training
    save directory, the directory itself for a step or consolidated directory, the parent of a weights file."""
    from megagpt.convert.readers import resolve_step_dir
    from megagpt.convert.universal import is_universal_dir

    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.is_file():
        return path.parent
    if is_universal_dir(path):
        return path
    return resolve_step_dir(path)


def checkpoint_step(path: str | Path) -> int | None:
    """The training step the checkpoint was saved at; None when it does not say (a bare weights file, or a
    consolidated directory without training state)."""
    from megagpt.convert.universal import STATE_FILE, is_universal_dir

    path = Path(path)
    if path.is_file():
        return None
    if is_universal_dir(path):
        step = json.loads((path / STATE_FILE).read_text()).get("client_state", {}).get("step")
        return int(step) if step is not None else None
    match = re.fullmatch(r"step(\d+)", checkpoint_home(path).name)
    return int(match.group(1)) if match else None
