"""Typed, validated configuration for megagpt.

This package is the single home of every configuration section. Each section is a frozen
dataclass holding *user inputs only*; derived values are properties; validation happens once,
in ``__post_init__``, raising ``ValueError`` that names the field, the bad value and what is
allowed. ``from_dict`` rejects unknown keys by name. Components receive their own section
(the model gets a ``ModelConfig``), never the whole tree.

The tree (``Config``): ``model``, ``data``, ``optimizer``, ``schedule``, ``batch``, ``parallel``,
``checkpoint``, ``logging``, ``tokenizer``, ``stability``, a ``deepspeed`` pass-through dict and a top-level ``seed``. Checks that
need two sections run in ``Config.__post_init__``; checks that need the world size or the file
system run in ``validate``. ``deepspeed_config`` derives DeepSpeed's JSON from the tree, so the two
can never disagree. This package must not import torch.distributed, deepspeed or build anything.
"""
from megagpt.config.model import ATTENTION_BACKENDS, POSITION_TYPES, ModelConfig, load_model_config, parameter_count
from megagpt.config.sections import (BITSANDBYTES_OPTIMIZERS, LR_DECAY_STYLES, LR_DECAY_UNITS, OPTIMIZER_KINDS, PRECISIONS,
                                     ZERO_STAGES, BatchConfig, CheckpointConfig, DataConfig, LoggingConfig,
                                     OptimizerConfig, ParallelConfig, ScheduleConfig, StabilityConfig,
                                     TokenizerConfig)
from megagpt.config.tree import (DEEPSPEED_OWNED_KEYS, SECTIONS, TOP_LEVEL_KEYS, Config, apply_overrides,
                                 deepspeed_config, format_config, load_config, parse_override, save_resolved,
                                 validate)

__all__ = [
    "ATTENTION_BACKENDS", "POSITION_TYPES", "ModelConfig", "load_model_config", "parameter_count",
    "BITSANDBYTES_OPTIMIZERS", "LR_DECAY_STYLES", "LR_DECAY_UNITS", "OPTIMIZER_KINDS", "PRECISIONS", "ZERO_STAGES", "BatchConfig",
    "CheckpointConfig", "DataConfig", "LoggingConfig", "OptimizerConfig", "ParallelConfig", "ScheduleConfig", "StabilityConfig", "TokenizerConfig",
    "DEEPSPEED_OWNED_KEYS", "SECTIONS", "TOP_LEVEL_KEYS", "Config", "apply_overrides", "deepspeed_config",
    "format_config", "load_config", "parse_override", "save_resolved", "validate",
]
