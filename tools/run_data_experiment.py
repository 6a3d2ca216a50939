#!/usr/bin/env python
"""Vary only the data: train the same architecture on each variant of an experiment, evaluate all of them on the
same held-out sets, and print one comparison table.

    python tools/run_data_experiment.py --experiment configs/experiments/shakespeare-vs-gcide.json \\
        --output out/data-experiment [--launcher deepspeed --nproc 2] [--set schedule.train_iters=100]

For each variant V: ``OUTPUT/V/config.json`` (the base config with V's data section; megagpt/experiment.py refuses
variants that change anything else), training into ``OUTPUT/V/run`` (re-running the command resumes unfinished
runs and skips finished ones), ``tools/evaluate.py`` into ``OUTPUT/V/eval.json``. Then ``OUTPUT/comparison.md`` /
``.json`` (the table) and ``OUTPUT/comparison_loss.png`` (the loss curves against tokens). ``--set`` overrides apply
to every variant alike. ``--dry-run`` checks the experiment and prints the plan.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # run from a checkout without installing: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.checkpoint_dir import latest_tag  # noqa: E402
from megagpt.config import Config, validate  # noqa: E402
from megagpt.experiment import comparison_table, load_experiment  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="experiment JSON (see megagpt/experiment.py)")
    p.add_argument("--output", required=True, help="directory for the variants' configs, runs and results")
    p.add_argument("--launcher", choices=("python", "deepspeed", "torchrun"), default="python")
    p.add_argument("--nproc", type=int, default=1, help="ranks per variant (deepspeed / torchrun)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every variant alike (not data.*)")
    p.add_argument("--device", default="auto", help="training and evaluation device (cpu, cuda, auto)")
    p.add_argument("--eval-max-windows", type=int, default=None,
                   help="score at most this many windows per held-out set (a quick look; the same for every variant)")
    p.add_argument("--dry-run", action="store_true", help="check the experiment and print the plan only")
    return p.parse_args(argv)


def _launch(args, script: str, script_args: list[str]) -> list[str]:
    if args.launcher == "python" or args.nproc == 1:
        return [sys.executable, script, *script_args]
    if args.launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(args.nproc), "--master_port", str(args.master_port), script,
                *script_args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port",
            str(args.master_port), script, *script_args]


def _write_json(path: Path, value) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _finished(run_dir: Path, train_iters: int) -> bool:
    tag = latest_tag(run_dir) if run_dir.exists() else None
    return tag is not None and int(tag.removeprefix("step")) >= train_iters


def _eval_args(spec: dict, run_dir: Path, output: Path, device: str) -> list[str]:
    args = ["--load", str(run_dir), "--output", str(output), "--overwrite", "--quiet", "--device", device]
    for prefix in spec.get("data_path", []):
        args += ["--data-path", prefix]
    for text_file in spec.get("text_file", []):
        args += ["--text-file", text_file]
    if "split" in spec:
        args += ["--split", spec["split"]]
    args += ["--split-name", spec.get("split_name", "test")]
    if spec.get("seq_lengths"):
        args += ["--seq-lengths", ",".join(str(n) for n in spec["seq_lengths"])]
    for key in ("stride", "batch_size", "max_windows"):
        if key in spec:
            args += [f"--{key.replace('_', '-')}", str(spec[key])]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        experiment = load_experiment(args.experiment, args.overrides)
        output = Path(args.output)
        world = args.nproc if args.launcher != "python" else 1
        for name, values in experiment.configs.items():
            values.setdefault("checkpoint", {})["save"] = str(output / name / "run")
            try:  # data files exist, the batch divides: checked for every variant before any training
                validate(Config.from_dict(values), world)
            except ValueError as err:
                if not args.dry_run:
                    raise ValueError(f"variant {name!r}: {err}") from None
                print(f"note: variant {name!r} cannot start yet: {err}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"experiment {experiment.path}: {len(experiment.configs)} variants ({', '.join(experiment.configs)}), "
          f"the same model, optimizer, schedule and seed; {experiment.token_budget:,} training tokens each")
    for name, values in experiment.configs.items():
        print(f"  {name}: data.data_path={values['data']['data_path']}")
    if args.dry_run:
        return 0
    results = {}
    for name, values in experiment.configs.items():
        variant_dir = output / name
        variant_dir.mkdir(parents=True, exist_ok=True)
        config_path = variant_dir / "config.json"
        _write_json(config_path, values)
        run_dir = variant_dir / "run"
        if _finished(run_dir, values["schedule"]["train_iters"]):
            print(f"== {name}: already trained ({run_dir})", flush=True)
        else:
            print(f"== {name}: training into {run_dir}", flush=True)
            subprocess.run(_launch(args, str(REPO / "megagpt" / "pretrain.py"),
                                   ["--config", str(config_path), "--device", args.device]), check=True)
        print(f"== {name}: evaluating", flush=True)
        eval_path = variant_dir / "eval.json"
        spec = dict(experiment.eval)
        if args.eval_max_windows is not None:
            spec["max_windows"] = args.eval_max_windows
        subprocess.run(_launch(args, str(REPO / "tools" / "evaluate.py"),
                               _eval_args(spec, run_dir, eval_path, args.device)), check=True)
        results[name] = json.loads(eval_path.read_text())["results"]
    table = comparison_table(results)
    (output / "comparison.md.tmp").write_text(table + "\n")
    os.replace(output / "comparison.md.tmp", output / "comparison.md")
    _write_json(output / "comparison.json", {"experiment": str(experiment.path), "token_budget": experiment.token_budget,
                                             "results": results})
    from plot_metrics import plot_metrics  # tools/ is on the path when this file runs as a script

    plot_metrics([output / name / "run" / "metrics.jsonl" for name in experiment.configs],
                 output / "comparison_loss.png", overwrite=True, labels=list(experiment.configs))
    print(f"\n{table}\n\nwrote {output / 'comparison.md'}, comparison.json and comparison_loss.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
