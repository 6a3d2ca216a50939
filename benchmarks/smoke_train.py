"""The training path end to end on one device, stopped and resumed: the first thing a lent GPU must show.

megagpt's loop has never run on a GPU (docs/gpu.md). This trains a tiny ALiBi GPT through ``megagpt/pretrain.py``
(the real CLI, engine, loop, evaluation and checkpoints; on CUDA the Triton attention, the fused LayerNorm and
cross-entropy) on a small learnable dataset it writes itself, three times:

* ``whole``: 20 steps in one go, evaluating and saving every 5;
* ``split``: the same command stopped at step 10 (``--exit-interval``), then run again: it resumes from ``latest``.

It passes when both runs finish, the loss falls, and the resumed run logs exactly the numbers of the whole one
(losses, gradient norms, learning rates, validation losses): the bit-for-bit resume promise on this device. The
report (JSON) and both runs' metrics are written under ``--output``.

    python benchmarks/smoke_train.py --output $OUT/smoke [--device cuda] [--precision bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMPARED = ("step", "loss", "lr", "grad_norm", "seq_len", "tokens", "valid_loss")


def write_dataset(prefix: Path) -> None:
    """Documents counting up modulo 60 from random starts: a model that learns the rule drives the loss down."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from megagpt.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix) as writer:
        for _ in range(400):
            length, start = int(rng.integers(20, 120)), int(rng.integers(0, 60))
            writer.add_document((start + np.arange(length)) % 60)


def write_config(path: Path, prefix: Path, precision: str) -> None:
    config = {
        "model": {"vocab_size": 64, "seq_len": 64, "d_model": 64, "num_layers": 2, "num_heads": 2,
                  "make_vocab_size_divisible_by": 64},
        "data": {"data_path": [str(prefix)], "split": "90,10,0", "num_workers": 0},
        "optimizer": {"kind": "adamw", "lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"train_iters": 20, "warmup_iters": 2, "seq_len_stages": [[32, 5]]},
        "batch": {"micro_batch": 4, "global_batch": 8},
        # bf16 needs ZeRO >= 1 (the plain engine's bf16 path has other numerics: shared/PITFALLS.md)
        "parallel": {"zero_stage": 1, "precision": precision},
        "checkpoint": {"save_interval": 5, "keep_last": 2},
        "logging": {"log_interval": 1, "eval_interval": 5, "eval_iters": 2},
    }
    path.write_text(json.dumps(config, indent=1))


def pretrain(config: Path, save: Path, device: str, log: Path, *extra: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, str(REPO / "megagpt" / "pretrain.py"), "--config", str(config), "--save", str(save),
               "--device", device, *extra]
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        return subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def logged(save: Path) -> list[dict]:
    path = save / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in COMPARED if k in r} for r in records]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="a new folder for the runs, logs and smoke.json")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args(argv)
    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        parser.error(f"--output {out} is not empty: give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    write_dataset(out / "counting")
    write_config(out / "config.json", out / "counting", args.precision)
    config, log = out / "config.json", out / "smoke.log"

    codes = {"whole": pretrain(config, out / "whole", args.device, log),
             "split_first": pretrain(config, out / "split", args.device, log, "--exit-interval", "10"),
             "split_resumed": pretrain(config, out / "split", args.device, log)}
    whole, split = logged(out / "whole"), logged(out / "split")
    losses = [r["loss"] for r in whole if "loss" in r]
    mismatches = [(a, b) for a, b in zip(whole, split) if a != b]
    report = {
        "device": args.device, "precision": args.precision, "exit_codes": codes,
        "steps_logged": {"whole": len(losses), "split": sum("loss" in r for r in split)},
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "resume_identical": bool(whole) and len(whole) == len(split) and not mismatches,
        "first_mismatches": mismatches[:3],
    }
    report["ok"] = (all(c == 0 for c in codes.values()) and len(losses) == 20 and losses[-1] < losses[0]
                    and report["resume_identical"])
    (out / "smoke.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
