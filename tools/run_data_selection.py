#!/usr/bin/env python
"""The random-vs-perplexity-filtered experiment in one command: score a corpus with a reference model, select a
random and low / middle / high perplexity subsets at the same token budget, continue pretraining the same initial
checkpoint on each (tools/run_data_experiment.py), evaluate all on the same held-out split.

    python tools/run_data_selection.py --pipeline configs/experiments/data-selection/pipeline.json --device cpu

Steps and the pipeline file: megagpt/selection/pipeline.py and docs/data_selection.md. Re-running resumes: every
finished step is skipped. ``--set`` / ``--launcher`` / ``--nproc`` / ``--eval-max-windows`` go to the
data-experiment runner unchanged; ``--prepare-only`` stops before the training of the variants.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

if __name__ == "__main__":  # run from a checkout without installing: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.selection.pipeline import REPO, check_experiment, free_port_env, load_pipeline, prepare, subset_table  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="pipeline JSON (see megagpt/selection/pipeline.py)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (every step)")
    p.add_argument("--launcher", choices=("python", "deepspeed", "torchrun"), default="python")
    p.add_argument("--nproc", type=int, default=1, help="ranks per variant (deepspeed / torchrun)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every variant alike (tools/run_data_experiment.py --set)")
    p.add_argument("--eval-max-windows", type=int, help="score at most this many windows per held-out set")
    p.add_argument("--prepare-only", action="store_true", help="stop after writing the subsets")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megagpt.experiment import load_experiment

    args = parse_args(argv)
    try:
        pipeline = load_pipeline(args.pipeline)
        check_experiment(pipeline, load_experiment(pipeline.experiment, args.overrides))
        prepare(pipeline, args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as err:  # the step printed its own error
        print(f"error: {err.cmd[1]} exited with status {err.returncode}; fix the cause and re-run the same "
              "command: finished steps are skipped", file=sys.stderr)
        return 1
    table = subset_table(pipeline)
    (pipeline.output / "subsets.md").write_text(table + "\n")
    print(f"\nsubsets ({pipeline.output / 'subsets.md'}):\n{table}\n", flush=True)
    if args.prepare_only:
        return 0
    command = [sys.executable, str(REPO / "tools" / "run_data_experiment.py"), "--experiment", str(pipeline.experiment),
               "--output", str(pipeline.output / "runs"), "--device", args.device, "--launcher", args.launcher,
               "--nproc", str(args.nproc)]
    for override in args.overrides:
        command += ["--set", override]
    if args.eval_max_windows is not None:
        command += ["--eval-max-windows", str(args.eval_max_windows)]
    status = subprocess.run(command, env=free_port_env()).returncode
    if status == 0:
        evaluate_initial(pipeline, args)
    return status


def evaluate_initial(pipeline, args) -> None:
    """The baseline row: the initial (reference) checkpoint on the same held-out sets with the same settings."""
    import importlib.util
    import json

    from megagpt.experiment import comparison_table, load_experiment

    spec = importlib.util.spec_from_file_location("run_data_experiment", REPO / "tools" / "run_data_experiment.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    experiment = load_experiment(pipeline.experiment, args.overrides)
    eval_spec = dict(experiment.eval)
    if args.eval_max_windows is not None:
        eval_spec["max_windows"] = args.eval_max_windows
    output = pipeline.output / "runs" / "initial_eval.json"
    if not output.exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"),
                        *runner._eval_args(eval_spec, pipeline.reference, output, args.device)],
                       check=True, env=free_port_env())
    results = {name: json.loads((pipeline.output / "runs" / name / "eval.json").read_text())["results"]
               for name in experiment.configs}
    table = comparison_table({"initial (no training)": json.loads(output.read_text())["results"], **results})
    (pipeline.output / "comparison_with_initial.md").write_text(table + "\n")
    print(f"\nwith the initial checkpoint ({pipeline.output / 'comparison_with_initial.md'}):\n{table}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
