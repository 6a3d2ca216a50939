"""Pretrain a GPT: ``deepspeed [--num_gpus N] megagpt/pretrain.py --config configs/tiny.json [options]``.

Also runs under ``torchrun`` and as plain ``python`` (one process). Megatron/NeoX flag names map onto
config overrides; ``--set section.field=value`` sets anything else (explicit flags win over ``--set``).
``--dry-run`` prints the resolved config, parameter count, a per-device memory estimate, the parallel
layout and the schedule (row length per stage, LR at its milestones, total tokens), and exits without starting
a process group. Config errors exit non-zero before any process
group starts, naming the field. Re-running the same command resumes from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# Run as a script, sys.path[0] is megagpt/ itself, whose module names (config, data, model, ...) would
# shadow top-level packages of the same name: put the repository root there instead.
if __name__ == "__main__" and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(sys.path[0])

from megagpt.config import Config, format_config, load_config, parameter_count, validate  # noqa: E402

# flag -> the config field it overrides
FLAG_OVERRIDES = {
    "train_iters": "schedule.train_iters", "save": "checkpoint.save", "load": "checkpoint.load",
    "save_interval": "checkpoint.save_interval", "log_interval": "logging.log_interval",
    "eval_interval": "logging.eval_interval", "seed": "seed", "strict_resume": "checkpoint.strict_resume",
}
GIB = 1024 ** 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON config, e.g. configs/tiny.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config value (repeatable), e.g. --set optimizer.lr=3e-4")
    parser.add_argument("--data-path", nargs="+", help="data.data_path: PREFIX or W1 PREFIX1 W2 PREFIX2 ...")
    parser.add_argument("--train-iters", type=int)
    parser.add_argument("--save")
    parser.add_argument("--load")
    parser.add_argument("--save-interval", type=int)
    parser.add_argument("--log-interval", type=int)
    parser.add_argument("--eval-interval", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--strict-resume", action="store_true", default=None,
                        help="refuse to start when the newest checkpoint is damaged, instead of resuming the newest "
                             "intact one with a warning")
    parser.add_argument("--exit-interval", type=int,
                        help="save and exit at the first step that is a multiple of this (Megatron's flag)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit; starts nothing")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is read instead
    args = parser.parse_args(argv)
    if args.exit_interval is not None and args.exit_interval <= 0:
        parser.error(f"--exit-interval must be a positive integer, got {args.exit_interval}")
    return args


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides followed by those of the named flags (so the flags win)."""
    overrides = list(args.overrides)
    if args.data_path is not None:
        overrides.append(f"data.data_path={json.dumps(args.data_path)}")
    for flag, field in FLAG_OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{field}={json.dumps(value)}")
    return overrides


def memory_estimate(config: Config, world_size: int) -> dict[str, float]:
    """Bytes per device for weights, gradients and optimizer state (fp32 master copy included) under the
    configured precision, ZeRO stage and tp x pp split. Activations, buffers and fragmentation are NOT included."""
    # tensor and pipeline parallelism split the weights roughly evenly (embedding/norm copies ignored)
    n = parameter_count(config.model) / (config.parallel.tp * config.parallel.pp)
    dp = config.parallel.dp_size(world_size)
    stage = config.parallel.zero_stage
    low_precision = config.parallel.precision in ("bf16", "fp16")
    weight_bytes = 2 if low_precision else 4
    master = 4 * n if low_precision else 0
    # ZeRO >= 1 accumulates gradients in fp32 (config/tree.py deepspeed_config): DeepSpeed's BF16_Optimizer
    # (ZeRO-1) keeps fp32 gradients of the whole model, ZeRO-2/3 their rank's partition
    gradient_bytes = 4 if stage >= 1 else weight_bytes
    if config.optimizer.uses_bitsandbytes:
        embedding = config.model.padded_vocab_size * config.model.d_model / config.parallel.tp
        optimizer = 2 * (n - embedding) + 8 * embedding  # 8-bit moments, 32-bit for the embedding
    else:
        optimizer = 8 * n
    return {"weights": weight_bytes * n / (dp if stage >= 3 else 1),
            "gradients": gradient_bytes * n / (dp if stage >= 2 else 1),
            "optimizer": (master + optimizer) / (dp if stage >= 1 else 1)}


def dry_run_report(config: Config, world_size: int) -> str:
    """The text ``--dry-run`` prints (missing data files are reported, not fatal: a plan needs no data)."""
    par, batch = config.parallel, config.batch
    dp = par.dp_size(world_size)
    n = parameter_count(config.model)
    memory = memory_estimate(config, world_size)
    lines = [format_config(config), "",
             f"parameters: {n:,} ({n / 1e9:.3f} B)",
             f"parallel layout: world size {world_size} = tp {par.tp} x pp {par.pp} x dp {dp}; "
             f"ZeRO stage {par.zero_stage}; precision {par.precision}",
             f"batch: micro {batch.micro_batch} x dp {dp} x grad accumulation "
             f"{batch.gradient_accumulation(dp)} = global {batch.global_batch} sequences of {config.model.seq_len} "
             f"tokens ({config.tokens_per_step:,} tokens per step)",
             "memory per device (no activations): " + ", ".join(
                 f"{name} {value / GIB:.2f} GiB" for name, value in memory.items())
             + f"; total {sum(memory.values()) / GIB:.2f} GiB"]
    from megagpt.schedule_plan import format_plan, schedule_plan
    lines.append(format_plan(schedule_plan(config)))
    missing = [prefix + suffix for prefix in config.data.prefixes for suffix in (".bin", ".idx")
               if not os.path.exists(prefix + suffix)]
    if missing:
        lines.append(f"data: MISSING {', '.join(missing)} (training would stop here; see tools/preprocess_data.py)")
    return "\n".join(lines)


def _config_error(err: ValueError) -> int:
    """Report a config error (once: every rank of a launch fails the same way) and return exit status 2."""
    from megagpt.engine import ranks_from_env

    if ranks_from_env()[0] == 0:
        print(f"config error: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Parse, validate, then dry-run or train. Returns the exit status."""
    args = parse_args(argv)
    from megagpt.engine import ranks_from_env

    world_size = ranks_from_env()[1]  # before any process group: torchrun/deepspeed/mpirun variables
    try:
        config = load_config(args.config, overrides_from_args(args))
        if args.dry_run:  # plan on a machine without the data: check the layout, report missing files
            config.batch.gradient_accumulation(config.parallel.dp_size(world_size))
        else:
            validate(config, world_size)
    except ValueError as err:
        return _config_error(err)
    if args.dry_run:
        print(dry_run_report(config, world_size))
        return 0

    from megagpt.engine import (build_engine, build_process_groups, check_device_support, init_distributed,
                                launch_from_env)
    from megagpt.checkpoint import NonFiniteWeights
    from megagpt.checkpoint_dir import DamagedCheckpoint
    from megagpt.stability import TrainingDiverged
    from megagpt.training import resume_directory, train

    try:
        launch = launch_from_env(args.device)
        check_device_support(config, launch.device)
    except ValueError as err:
        return _config_error(err)
    init_distributed(launch)
    if launch.is_main:
        print(format_config(config), flush=True)
    groups = build_process_groups(config, launch)
    engine = build_engine(config, launch, groups, init_weights=resume_directory(config) is None)
    try:
        state = train(config, engine, launch, groups, exit_interval=args.exit_interval)
    except (TrainingDiverged, NonFiniteWeights) as err:  # every rank agreed on it: one message, exit status 3
        if launch.is_main:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 3
    except DamagedCheckpoint as err:
        if launch.is_main:
            print(f"checkpoint error: {err}", file=sys.stderr, flush=True)
        return 2
    if launch.is_main:
        print(f"done: step {state.step}, {state.tokens:,} tokens", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
