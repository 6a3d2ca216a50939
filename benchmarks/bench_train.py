#!/usr/bin/env python
"""Training throughput on one device: megagpt under ``deepspeed --num_gpus 1`` against a transformers baseline of the
same shape, in the same run.

Cases, each in its own process of ``benchmarks/bench_train_worker.py`` (so that peak memory, failures and timeouts
stay apart):
  megagpt <shape> <optimizer>  under ``deepspeed --num_gpus 1``: the engine of
      ``megagpt/pretrain.py`` (``build_engine``) for ``configs/<shape>.json`` with bf16, ZeRO-1 and the optimizer
      (adamw: torch fused AdamW; adamw8bit: bitsandbytes, 32-bit embedding state), stepped as ``megagpt/training.py``
      steps it (``micro_loss``, ``engine.backward``, ``engine.step``) on synthetic tokens at the full length;
  hf <shape>  plain ``python``: transformers' ``GPT2LMHeadModel`` with SDPA attention
      and the same d_model, layers, heads, length and padded vocabulary, fp32 weights under bf16 autocast, torch
      ``AdamW(fused=True)``, the same gradient clipping, micro batch and accumulation.
Measured per case: tokens/s over the timed steps (warm-up steps excluded, device synchronised at both ends), model
TFLOP/s per device and MFU (``megagpt.metrics.flops_per_token``: 6N + 12 L d T, the same convention for both models)
against 989 TFLOP/s (H100 SXM dense bf16) and against the bf16 matmul peak measured in the same run, peak memory
(``max_memory_allocated``), and optimizer state in bytes per model parameter: the moments (the wrapped optimizer's
state tensors) and, separately, ZeRO's fp32 master copy. Ratios against the baseline are computed per shape.
Activation checkpointing is off by default (both models fit an H100 without it). ``--set`` overrides the config of
every case (the baseline takes its shape from the same config, and ignores what only megagpt has).

    python benchmarks/bench_train.py --output out/train                # GPU: gpt127 and gpt1b
    python benchmarks/bench_train.py --dry --output /tmp/train         # CPU, toy shapes: proves the script only
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().with_name("bench_train_worker.py")
_spec = importlib.util.spec_from_file_location("bench_train_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)  # the worker script's helpers (write_json, _version), by path
_spec.loader.exec_module(worker)
H100_SXM_BF16_TFLOPS = 989.0
SHAPES = ("gpt127", "gpt1b")
OPTIMIZERS = ("adamw8bit", "adamw")
DRY_NOTE = ("DRY RUN on CPU at toy sizes (Triton interpreter): these figures only show that the benchmark runs and "
            "are NOT GPU figures.")
TARGETS = {"gpt1b": {"mfu_vs_989": 0.50, "tokens_per_sec_vs_hf": 1.5, "adamw8bit_moment_bytes_per_param": 2.1}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), help="configs/<name>.json to take the shapes from")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="run the transformers GPT2LMHeadModel baseline of each shape")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default 20; --dry 1)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 3; --dry 1)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro batches per optimizer step")
    p.add_argument("--micro-batch", type=int, help="default: the config's batch.micro_batch (--dry 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="extra megagpt config override for every megagpt case (repeatable)")
    p.add_argument("--matmul-peak-json", help="a bench_attention.py JSON of this run whose bf16 matmul_peak to use "
                   "(default: measure it here)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per case; the case is killed after it")
    p.add_argument("--dry", action="store_true", help="toy shapes on CPU (Triton interpreter)")
    p.add_argument("--output", required=True, help="directory for train.json and logs/")
    p.add_argument("--print-table", action="store_true", help="print the table of <output>/train.json and exit")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (1 if args.dry else 20)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (1 if args.dry else 3)
    for flag in ("steps", "grad_accum", "micro_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    for shape in args.shapes:
        if not (REPO / "configs" / f"{shape}.json").is_file():
            p.error(f"--shapes: configs/{shape}.json does not exist")
    return args


# ---------------------------------------------------------------------------------------------------- driver


def planned_cases(args) -> list[dict]:
    """Per shape, in ``--shapes`` order: the first optimizer, the baseline, the other optimizers (so that a run cut
    short still has a ratio). ``--dry`` takes the optimizers in turn, one per shape (every code path once: each launch
    costs tens of seconds on a CPU)."""
    cases = []
    for index, shape in enumerate(args.shapes):
        optimizers = [args.optimizers[index % len(args.optimizers)]] if args.dry else args.optimizers
        ours = [{"name": f"megagpt_{shape}_{opt}", "kind": "megagpt", "shape": shape, "optimizer": opt}
                for opt in optimizers]
        baseline = [{"name": f"hf_{shape}", "kind": "hf", "shape": shape, "optimizer": "adamw_fused_torch"}]
        cases += ours[:1] + (baseline if args.baseline else []) + ours[1:]
    return cases


def worker_command(args, kind: str, result: Path, port: int, shape: str = "", optimizer: str = "") -> list[str]:
    """The command of one worker: megagpt under the deepspeed launcher (``python -m deepspeed.launcher.runner`` is
    the ``deepspeed`` script, without depending on where pip put it), the others as plain python."""
    spec = {"kind": kind, "shape": shape, "optimizer": optimizer, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "grad_accum": args.grad_accum, "micro_batch": args.micro_batch,
            "overrides": list(args.overrides), "dry": args.dry, "result": str(result)}
    flags = [str(WORKER), "--spec", json.dumps(spec)]
    if kind == "megagpt":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
                *flags]
    return [sys.executable, *flags]


def run_case(command: list[str], log_path: Path, result_path: Path, timeout_s: float) -> dict:
    """Run one worker in its own session, output to ``log_path``; its result JSON, or a status saying why not."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:  # timed out, or this driver is being stopped (SIGTERM, Ctrl-C): no worker may outlive it
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the launcher's rank too
                process.wait()
    record = {"wall_seconds": round(time.perf_counter() - start, 1), "log": log_path.name}
    if returncode is None:
        return {**record, "status": "timeout", "reason": f"killed after {timeout_s:.0f} s"}
    if returncode != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return {**record, "status": "error", "reason": f"exit status {returncode}: " + " | ".join(tail)}
    return {**record, "status": "ok", **json.loads(result_path.read_text())}


def add_rates(case: dict, args, peak_tflops: float | None) -> None:
    """tokens/s, TFLOP/s, MFU and bytes per parameter of a finished case."""
    if case["status"] != "ok":
        return
    seq, micro = case.get("seq_len") or case["config"]["model"]["seq_len"], case.get("micro_batch")
    micro = micro or case["config"]["batch"]["micro_batch"]
    tokens = args.steps * args.grad_accum * micro * seq
    case["tokens_per_sec"] = tokens / case["seconds"]
    case["tflops_per_device"] = case["tokens_per_sec"] * case["flops_per_token"] / 1e12
    case["mfu_vs_989"] = case["tflops_per_device"] / H100_SXM_BF16_TFLOPS
    case["mfu_vs_measured_peak"] = case["tflops_per_device"] / peak_tflops if peak_tflops else None
    state = case["optimizer_state_bytes"]
    case["moment_bytes_per_param"] = state["moments"] / case["parameters"]
    case["master_bytes_per_param"] = state["fp32_master"] / case["parameters"]
    case["losses_finite"] = all(x == x and abs(x) != float("inf") for x in case["losses"])


def comparisons(cases: list[dict]) -> dict:
    """Per shape and optimizer: tokens/s against the baseline of the shape, and the targets of the issue."""
    by_name = {c["name"]: c for c in cases}
    out = {}
    for case in cases:
        if case["kind"] != "megagpt" or case["status"] != "ok":
            continue
        baseline = by_name.get(f"hf_{case['shape']}")
        row = {"mfu_vs_989": case["mfu_vs_989"], "moment_bytes_per_param": case["moment_bytes_per_param"],
               "tokens_per_sec_vs_hf": None}
        if baseline and baseline["status"] == "ok":
            row["tokens_per_sec_vs_hf"] = case["tokens_per_sec"] / baseline["tokens_per_sec"]
        target = TARGETS.get(case["shape"])
        if target:
            met = {"mfu_vs_989": row["mfu_vs_989"] >= target["mfu_vs_989"]}
            if row["tokens_per_sec_vs_hf"] is not None:
                met["tokens_per_sec_vs_hf"] = row["tokens_per_sec_vs_hf"] >= target["tokens_per_sec_vs_hf"]
            if case["optimizer"] == "adamw8bit":
                met["adamw8bit_moment_bytes_per_param"] = (row["moment_bytes_per_param"]
                                                           <= target["adamw8bit_moment_bytes_per_param"])
            row["targets"], row["target_met"] = target, met
        out[case["name"]] = row
    return out


def format_table(report: dict) -> str:
    lines = [f"training throughput on {report['device']} | {report['note'] or 'one device'}",
             f"{'case':<26}{'status':<7}{'tokens/s':>11}{'TFLOP/s':>11}{'MFU/989':>9}{'MFU/peak':>9}"
             f"{'peak GiB':>9}{'state B/p':>10}{'master B/p':>11}{'vs hf':>7}"]
    for case in report["cases"]:
        row = f"{case['name']:<26}{case['status']:<7}"
        if case["status"] != "ok":
            lines.append(f"{row}{case['reason'][:120]}")
            continue
        mem = f"{case['peak_memory_bytes'] / 2**30:.1f}" if case["peak_memory_bytes"] is not None else "n/a"
        peak = f"{case['mfu_vs_measured_peak']:.3f}" if case["mfu_vs_measured_peak"] is not None else "n/a"
        ratio = report["comparisons"].get(case["name"], {}).get("tokens_per_sec_vs_hf")
        lines.append(f"{row}{case['tokens_per_sec']:>11.4g}{case['tflops_per_device']:>11.4g}"
                     f"{case['mfu_vs_989']:>9.3f}{peak:>9}{mem:>9}{case['moment_bytes_per_param']:>10.3f}"
                     f"{case['master_bytes_per_param']:>11.3f}{(f'{ratio:.2f}x' if ratio else '-'):>7}")
    return "\n".join(lines)


def measured_peak(args, out: Path) -> dict:
    """The bf16 matmul peak of this run: from ``--matmul-peak-json`` when it is a bf16 figure, else measured."""
    if args.matmul_peak_json and Path(args.matmul_peak_json).exists():
        peak = json.loads(Path(args.matmul_peak_json).read_text()).get("matmul_peak") or {}
        if peak.get("dtype") == "bfloat16" and peak.get("tflops"):
            return {**peak, "source": args.matmul_peak_json}
    result = out / "peak.json"
    case = run_case(worker_command(args, "peak", result, 0), out / "logs" / "matmul_peak.log", result, 120)
    return {**case["matmul_peak"], "source": "measured here"} if case["status"] == "ok" else {"tflops": None, **case}


def run_driver(args) -> int:
    """Run every case, write ``<output>/train.json`` (after each case too) and print the table."""
    import torch

    out = Path(args.output)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    # An outer `timeout` sends SIGTERM: unwind through run_case's cleanup instead of dying with a worker running.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu {platform.machine()}"
    report = {"device": device, "device_type": "cuda" if torch.cuda.is_available() else "cpu",
              "note": DRY_NOTE if args.dry else None, "torch": torch.__version__,
              **{name: worker._version(name) for name in ("deepspeed", "bitsandbytes", "transformers")},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "args": vars(args),
              "reference_peak_tflops": H100_SXM_BF16_TFLOPS, "complete": False, "cases": []}
    print("measuring the bf16 matmul peak ...", flush=True)
    report["matmul_peak"] = measured_peak(args, out)
    for index, case in enumerate(planned_cases(args)):
        print(f"{case['name']} ...", flush=True)
        result = out / f"{case['name']}.json"
        result.unlink(missing_ok=True)
        command = worker_command(args, case["kind"], result, 29600 + index, case["shape"], case["optimizer"])
        case.update(run_case(command, out / "logs" / f"{case['name']}.log", result, args.timeout_s))
        add_rates(case, args, report["matmul_peak"].get("tflops"))
        report["cases"].append(case)
        report["comparisons"] = comparisons(report["cases"])
        worker.write_json(report, out / "train.json")
    report["complete"] = True
    worker.write_json(report, out / "train.json")
    print(format_table(report))
    failed = [c for c in report["cases"] if c["status"] != "ok" or not c["losses_finite"]]
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_table:
        print(format_table(json.loads((Path(args.output) / "train.json").read_text())))
        return 0
    return run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
