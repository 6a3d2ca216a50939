"""Optimizer construction and the training schedules (learning rate, sequence-length warmup)."""
from megagpt.optim.lr_schedule import LR_UNITS, LRSchedule, LRScheduler
from megagpt.optim.optimizers import (OPTIMIZER_KINDS, build_optimizer, keep_embedding_state_32bit,
                                      restore_paged_state)
from megagpt.optim.param_groups import build_param_groups, classify_parameters, param_group_by_name
from megagpt.optim.seq_len_schedule import IGNORE_INDEX, SeqLenSchedule, SeqLenWarmup, padding_positions, repack

__all__ = [
    "build_param_groups", "classify_parameters", "param_group_by_name",
    "build_optimizer", "keep_embedding_state_32bit", "restore_paged_state", "OPTIMIZER_KINDS",
    "LRSchedule", "LRScheduler", "LR_UNITS",
    "SeqLenSchedule", "SeqLenWarmup", "repack", "padding_positions", "IGNORE_INDEX",
]
