"""The whole tree: ``Config``, JSON loading with ``--set`` overrides, validation, DeepSpeed derivation, saving."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megagpt.config._fields import read_json_file, _coerce, _did_you_mean, _jsonable
from megagpt.config.model import ModelConfig
from megagpt.config.sections import (BatchConfig, CheckpointConfig, DataConfig, LoggingConfig, OptimizerConfig,
                                     ParallelConfig, ScheduleConfig, StabilityConfig, TokenizerConfig)


# DeepSpeed keys derived from the tree, and the field a user sets instead.
DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "batch.global_batch",
    "train_micro_batch_size_per_gpu": "batch.micro_batch",
    "gradient_accumulation_steps": "batch.global_batch / batch.micro_batch",
    "gradient_clipping": "optimizer.clip_grad",
    "bf16": "parallel.precision",
    "fp16": "parallel.precision",
    "amp": "parallel.precision",
    "optimizer": "the optimizer section",
    "scheduler": "the schedule section",
    "zero_allow_untested_optimizer": "optimizer.kind",
    "zero_optimization.stage": "parallel.zero_stage",
    "data_types.grad_accum_dtype": "parallel.precision (gradients accumulate in fp32)",
    "communication_data_type": "parallel.precision (gradients are reduced in fp32)",
}
SECTIONS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig,
            "schedule": ScheduleConfig, "batch": BatchConfig, "parallel": ParallelConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig, "tokenizer": TokenizerConfig,
            "stability": StabilityConfig}
TOP_LEVEL_KEYS = (*SECTIONS, "deepspeed", "seed")


@dataclass(frozen=True)
class Config:
    """The whole training config. ``__post_init__`` runs every check that needs two sections;
    ``validate`` adds those that need the world size or the file system."""

    model: ModelConfig
    data: DataConfig
    schedule: ScheduleConfig
    batch: BatchConfig
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    stability: StabilityConfig = dataclasses.field(default_factory=StabilityConfig)
    deepspeed: dict[str, Any] = dataclasses.field(default_factory=dict)  # pass-through, see DEEPSPEED_OWNED_KEYS
    seed: int = 1234  # model initialisation and dropout

    def __post_init__(self) -> None:
        model, par, sched = self.model, self.parallel, self.schedule
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.deepspeed, dict):
            raise ValueError(f"deepspeed must be a JSON object, got {type(self.deepspeed).__name__}")
        owned = [key for key in DEEPSPEED_OWNED_KEYS if _has_dotted(self.deepspeed, key)]
        if owned:
            where = "; ".join(f"deepspeed.{key} comes from {DEEPSPEED_OWNED_KEYS[key]}" for key in owned)
            raise ValueError(f"the deepspeed section may not set keys derived from the config: {where}")
        if model.num_heads % par.tp:
            raise ValueError(f"parallel.tp={par.tp} does not divide model.num_heads={model.num_heads}")
        if model.padded_vocab_size % par.tp:
            raise ValueError(f"parallel.tp={par.tp} does not divide the padded vocabulary {model.padded_vocab_size} "
                             f"(model.vocab_size={model.vocab_size} rounded up to model.make_vocab_size_divisible_by="
                             f"{model.make_vocab_size_divisible_by}); make that a multiple of {par.tp}")
        if model.ffn_hidden_size % par.tp:
            raise ValueError(f"parallel.tp={par.tp} does not divide the MLP width {model.ffn_hidden_size} "
                             f"(model.d_model x model.mlp_ratio)")
        if par.pp > model.num_layers:
            raise ValueError(f"parallel.pp={par.pp} is larger than model.num_layers={model.num_layers}")
        if par.pp > 1 and par.zero_stage != 1:
            # >= 2: DeepSpeed's pipeline engine refuses it. 0: its plain fp32 path neither reports a gradient
            # norm nor matched the one-rank run here (4.6e-3 off after 20 steps of the tiny model; ZeRO-1: 5e-7).
            raise ValueError(f"parallel.zero_stage={par.zero_stage} with parallel.pp={par.pp}: pipeline "
                             "parallelism runs with zero_stage=1 (DeepSpeed's pipeline engine refuses ZeRO-2/3, and "
                             "its stage-0 path does not clip like the other layouts)")
        if par.precision == "bf16" and par.zero_stage == 0:
            raise ValueError("parallel.precision='bf16' with parallel.zero_stage=0: DeepSpeed's plain engine "
                             "takes another code path with different numerics; use zero_stage >= 1 for bf16")
        longest = sched.max_seq_len()
        if longest is not None and longest > model.seq_len:
            raise ValueError(f"the sequence-length schedule asks for length {longest} > "
                             f"model.seq_len={model.seq_len}")

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step at the full ``model.seq_len``."""
        return self.batch.global_batch * self.model.seq_len

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Build from a plain dict (parsed JSON); unknown sections and keys raise naming them."""
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a JSON object, got {type(values).__name__}")
        unknown = [key for key in values if key not in TOP_LEVEL_KEYS]
        if unknown:
            raise ValueError(f"unknown top-level key(s) {unknown}{_did_you_mean(unknown[0], TOP_LEVEL_KEYS)}; "
                             f"allowed: {list(TOP_LEVEL_KEYS)}")
        if isinstance(values.get("model"), dict):  # ModelConfig checks values, not JSON types: do that here
            hints = typing.get_type_hints(ModelConfig)
            for name, value in values["model"].items():
                if name in hints:
                    _coerce(f"model.{name}", value, hints[name])
        kwargs: dict[str, Any] = {name: section.from_dict(values[name])
                                  for name, section in SECTIONS.items() if name in values}
        missing = [name for name in ("model", "data", "schedule", "batch") if name not in kwargs]
        if missing:
            raise ValueError(f"missing required section(s) {missing}")
        for key in ("deepspeed", "seed"):
            if key in values:
                kwargs[key] = values[key]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The user inputs as a JSON-serialisable dict (round-trips through ``from_dict``)."""
        out: dict[str, Any] = {name: getattr(self, name).to_dict() for name in SECTIONS}
        out["deepspeed"] = _jsonable(self.deepspeed)
        out["seed"] = self.seed
        return out


def _has_dotted(tree: dict, dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optimizer.lr=3e-4"`` -> ``(["optimizer", "lr"], 0.0003)``.

    The value is read as JSON (numbers, true/false, null, lists, objects); anything that is not
    valid JSON is taken as a plain string, so ``checkpoint.save=out/run1`` needs no quotes.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} must look like section.field=value, e.g. optimizer.lr=3e-4")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """A copy of the raw config dict with each ``section.field=value`` override applied in order."""
    values = json.loads(json.dumps(values))  # deep copy of plain JSON data
    for text in overrides:
        path, value = parse_override(text)
        top = path[0]
        if top not in TOP_LEVEL_KEYS:
            raise ValueError(f"override {text!r}: unknown section {top!r}{_did_you_mean(top, TOP_LEVEL_KEYS)}; "
                             f"sections are {list(TOP_LEVEL_KEYS)}")
        if top == "seed":
            if len(path) != 1:
                raise ValueError(f"override {text!r}: seed is a top-level value; write seed=VALUE")
            values["seed"] = value
            continue
        if len(path) == 1:
            raise ValueError(f"override {text!r}: name a field, e.g. {top}.FIELD=VALUE")
        if top in SECTIONS:
            fields = [f.name for f in dataclasses.fields(SECTIONS[top])]
            if path[1] not in fields:
                raise ValueError(f"override {text!r}: {top} has no field {path[1]!r}"
                                 f"{_did_you_mean(path[1], fields)}; fields are {fields}")
        node = values.setdefault(top, {})
        for depth, part in enumerate(path[1:-1], start=1):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {'.'.join(path[:depth + 1])} is not an object")
            node = child
        node[path[-1]] = value
    return values


def load_config(path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Read a JSON config, apply ``--set`` style overrides (``"optimizer.lr=3e-4"``), build the tree.

    Errors name the file and the key path. World-size and file-system checks are ``validate``'s.
    """
    path = Path(path)
    values = read_json_file(path, "config file")
    try:
        return Config.from_dict(apply_overrides(values, overrides))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def validate(config: Config, world_size: int) -> None:
    """Checks that need the launch: the parallel layout fits ``world_size``, the batch sizes
    divide, every ``data.data_path`` prefix has its ``.bin`` and ``.idx`` files, and their tokenizer (record
    or scanned largest id, megagpt/data/tokenizer_record.py) agrees with the model and the tokenizer section.
    Run it before creating any process group or model; raises ValueError."""
    dp_size = config.parallel.dp_size(world_size)
    config.batch.gradient_accumulation(dp_size)
    for prefix in config.data.prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.exists(prefix + suffix):
                raise ValueError(f"data.data_path: {prefix + suffix} does not exist (prefix {prefix!r}); "
                                 "preprocess it with tools/preprocess_data.py or override the path with "
                                 "--set data.data_path='[\"PREFIX\"]'")
    for path in config.tokenizer.files:
        if not os.path.exists(path):
            raise ValueError(f"tokenizer: {path} does not exist; fix the tokenizer section's file paths")
    from megagpt.data.tokenizer_record import check_data_path  # data and model agree before the first step

    check_data_path(config.data.data_path, config.model.vocab_size, config.tokenizer, config.data.cache_dir)
    init_from = config.checkpoint.init_from
    if init_from is not None and not os.path.exists(init_from):
        raise ValueError(f"checkpoint.init_from: {init_from} does not exist; give a consolidated checkpoint "
                         "(tools/convert_checkpoint.py) or a training checkpoint directory")


def deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config dict, derived from ``config`` and merged with its ``deepspeed`` section."""
    dp_size = config.parallel.dp_size(world_size)
    precision = config.parallel.precision
    derived: dict[str, Any] = {
        "train_batch_size": config.batch.global_batch,
        "train_micro_batch_size_per_gpu": config.batch.micro_batch,
        "gradient_accumulation_steps": config.batch.gradient_accumulation(dp_size),
        "gradient_clipping": config.optimizer.clip_grad,
        "zero_optimization": {"stage": config.parallel.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0 selects dynamic loss scaling
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # DeepSpeed's default for bf16 accumulates and reduces gradients in bf16: summing 128 micro batches
        # (gpt1b on one GPU) rounds each addition to 8 mantissa bits. fp32 for both (bf16 + ZeRO-1 then runs
        # DeepSpeed's BF16_Optimizer, ZeRO-2/3 keep an fp32 accumulation buffer; benchmarks/bench_grad_accum.py).
        "communication_data_type": "fp32",
        "steps_per_print": 10 ** 9,  # our own logger reports; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if config.parallel.zero_stage >= 1:  # DeepSpeed's ZeRO-0 fp16 path accumulates in fp16 only ("unsupported mix")
        derived["data_types"] = {"grad_accum_dtype": "fp32"}
    if config.optimizer.uses_bitsandbytes:
        derived["zero_allow_untested_optimizer"] = True
    return _merge(derived, config.deepspeed)


def _merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in recursively (``extra`` wins on leaves)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def format_config(config: Config) -> str:
    """The resolved config as indented JSON, for printing at start."""
    return json.dumps(config.to_dict(), indent=2)


def save_resolved(config: Config, path: str | Path) -> None:
    """Write the resolved config as JSON to ``path`` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(format_config(config) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
