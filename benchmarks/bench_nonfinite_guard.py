#!/usr/bin/env python
"""Step time with and without the non-finite check (megagpt/stability.py), in the same run.

Trains the same small GPT on the same synthetic data twice per round, ``stability.skip_non_finite`` true and
false, alternating over ``--rounds`` rounds (so load changes on a shared machine hit both), through
megagpt/pretrain.py as a user runs it. Reports the median ``tokens_per_sec`` of each (the first
``--warmup-steps`` logged steps dropped) and the ratio checked / unchecked. The check costs one host sync and one
all-reduce per optimizer step (not per micro batch) plus, under ZeRO-0, a norm over the gradients.
CPU figures here; on a GPU the sync is what matters: run it there with --device cuda.
    python benchmarks/bench_nonfinite_guard.py --output benchmarks/results/nonfinite_guard.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench_preprocess import write_json  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)
from megagpt.data.indexed import IndexedDatasetWriter  # noqa: E402


def make_run(root: Path, args) -> Path:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(root / "data") as writer:
        for _ in range(2000):
            writer.add_document(rng.integers(0, 255, size=int(rng.integers(50, 400))))
    config = {
        "model": {"vocab_size": 256, "seq_len": 128, "d_model": args.d_model, "num_layers": args.layers,
                  "num_heads": 4},
        "data": {"data_path": [str(root / "data")], "split": "100,0,0", "num_workers": 0},
        "optimizer": {"kind": "adamw", "lr": 1e-3},
        "schedule": {"train_iters": args.steps, "warmup_iters": 2},
        "batch": {"micro_batch": 4, "global_batch": 16},
        "parallel": {"zero_stage": args.zero_stage, "precision": args.precision},
        "logging": {"log_interval": 1, "eval_interval": 100000, "eval_iters": 0},
    }
    path = root / "bench.json"
    path.write_text(json.dumps(config))
    return path


def rates(config: Path, checked: bool, args, metrics_dir: Path) -> list[float]:
    # one rank without MASTER_PORT: pretrain.py takes a free port itself
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    subprocess.run([sys.executable, str(REPO / "megagpt" / "pretrain.py"), "--config", str(config), "--device",
                    args.device, "--save", str(metrics_dir), "--save-interval", str(10 ** 9),
                    "--set", f"stability.skip_non_finite={str(checked).lower()}"],
                   check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (metrics_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_sec"] for r in records if "loss" in r][args.warmup_steps:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = make_run(root, args)
        samples = {True: [], False: []}
        for round_ in range(args.rounds):
            for checked in (True, False):
                out = root / f"run{round_}_{checked}"
                samples[checked] += rates(config, checked, args, out)
    on, off = statistics.median(samples[True]), statistics.median(samples[False])
    result = {"device": args.device, "zero_stage": args.zero_stage, "precision": args.precision,
              "d_model": args.d_model, "layers": args.layers, "steps_per_run": args.steps, "rounds": args.rounds,
              "tokens_per_sec_checked": on, "tokens_per_sec_unchecked": off, "step_time_ratio": off / on,
              "note": "CPU figures (2 shared cores), not GPU figures" if args.device == "cpu" else "GPU"}
    print(f"median tokens/s: checked {on:,.0f}, unchecked {off:,.0f}; step time checked / unchecked = "
          f"{off / on:.3f} ({args.device}, ZeRO-{args.zero_stage}, {args.precision})")
    if args.output:
        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
