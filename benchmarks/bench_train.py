#!/usr/bin/env python
"""Training throughput on one device: megagpt under ``deepspeed --num_gpus 1`` against a transformers baseline of the
same shape, in the same run.

Cases, each in its own process (so that peak memory, failures and timeouts stay apart):
  megagpt <shape> <optimizer>  ``deepspeed --num_gpus 1 benchmarks/bench_train.py --worker megagpt``: the engine of
      ``megagpt/pretrain.py`` (``build_engine``) for ``configs/<shape>.json`` with bf16, ZeRO-1 and the optimizer
      (adamw: torch fused AdamW; adamw8bit: bitsandbytes, 32-bit embedding state), stepped as ``megagpt/training.py``
      steps it (``micro_loss``, ``engine.backward``, ``engine.step``) on synthetic tokens at the full length;
  hf <shape>  ``python benchmarks/bench_train.py --worker hf``: transformers' ``GPT2LMHeadModel`` with SDPA attention
      and the same d_model, layers, heads, length and padded vocabulary, fp32 weights under bf16 autocast, torch
      ``AdamW(fused=True)``, the same gradient clipping, micro batch and accumulation.
Measured per case: tokens/s over the timed steps (warm-up steps excluded, device synchronised at both ends), model
TFLOP/s per device and MFU (``megagpt.metrics.flops_per_token``: 6N + 12 L d T, the same convention for both models)
against 989 TFLOP/s (H100 SXM dense bf16) and against the bf16 matmul peak measured in the same run, peak memory
(``max_memory_allocated``), and optimizer state in bytes per model parameter: the moments (the wrapped optimizer's
state tensors) and, separately, ZeRO's fp32 master copy. Ratios against the baseline are computed per shape.
Activation checkpointing is off by default (both models fit an H100 without it); ``--set`` overrides megagpt's config.

    python benchmarks/bench_train.py --output out/train                # GPU: gpt127 and gpt1b
    python benchmarks/bench_train.py --dry --output /tmp/train         # CPU, toy shapes: proves the script only
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
H100_SXM_BF16_TFLOPS = 989.0
SHAPES = ("gpt127", "gpt1b")
OPTIMIZERS = ("adamw8bit", "adamw")
# --dry: every config shrinks to this (head_dim set so that heads x head_dim = d_model, as GPT-2 needs).
DRY_MODEL = {"d_model": 64, "num_heads": 2, "head_dim": 32, "num_layers": 2, "seq_len": 32, "vocab_size": 500}
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
    p.add_argument("--worker", choices=["megagpt", "hf", "peak"], help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--optimizer", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
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


# ---------------------------------------------------------------------------------------------------- shared


def load_shape_config(args, shape: str, optimizer: str = "adamw"):
    """``configs/<shape>.json`` as this benchmark trains it: bf16, ZeRO-1, ``optimizer``, full length from step 1,
    no activation checkpointing, ``micro_batch x grad_accum`` sequences per step on one rank, then ``--set``."""
    from megagpt.config import load_config

    overrides = {"optimizer.kind": optimizer, "parallel.zero_stage": 1, "parallel.precision": "bf16",
                 "parallel.activation_checkpointing": False, "schedule.seq_len_stages": None,
                 "schedule.seq_len_ramp": None, "checkpoint.save": None, "parallel.tp": 1, "parallel.pp": 1}
    if args.dry:
        overrides.update({f"model.{k}": v for k, v in DRY_MODEL.items()})
        overrides["model.attention_backend"] = "triton"  # the interpreter on CPU: the GPU path's code
        overrides["model.make_vocab_size_divisible_by"] = 64
    config = load_config(REPO / "configs" / f"{shape}.json", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    micro = args.micro_batch or (2 if args.dry else config.batch.micro_batch)
    batch = [f"batch.micro_batch={micro}", f"batch.global_batch={micro * args.grad_accum}"]
    return load_config(REPO / "configs" / f"{shape}.json",
                       [f"{k}={json.dumps(v)}" for k, v in overrides.items()] + batch + list(args.overrides))


def optimizer_state_bytes(optimizer) -> dict:
    """Bytes of optimizer state: ``moments`` (every tensor in the state of the innermost torch optimizer, found
    through DeepSpeed's ``.optimizer`` wrappers: Adam's moments, bitsandbytes' 8-bit states with their absmax and
    quantile maps, step counters) by dtype, and ``fp32_master`` (ZeRO's fp32 partitions of bf16 weights; 0 for a
    plain optimizer, whose fp32 parameters are the weights themselves). DeepSpeed's fp32 gradient buffers are not
    optimizer state: they show in the peak memory."""
    import torch

    base, hops = optimizer, 0
    while not isinstance(base, torch.optim.Optimizer):
        base, hops = getattr(base, "optimizer", None), hops + 1
        if base is None or hops > 4:
            raise TypeError(f"no torch optimizer inside {type(optimizer).__name__}")
    by_dtype: dict[str, int] = {}
    for state in base.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                key = str(value.dtype).removeprefix("torch.")
                by_dtype[key] = by_dtype.get(key, 0) + value.numel() * value.element_size()
    # DeepSpeed's ZeRO-1/2 optimizer and its BF16_Optimizer (bf16 + ZeRO-1 with fp32 gradient accumulation) name
    # their fp32 partitions differently.
    masters = (getattr(optimizer, "single_partition_of_fp32_groups", None)
               or getattr(optimizer, "fp32_groups_flat_partition", None) or [])
    return {"moments": sum(by_dtype.values()), "moments_by_dtype": by_dtype,
            "fp32_master": sum(t.numel() * t.element_size() for t in masters), "optimizer": type(base).__name__}


def gpt2_flops_per_token(num_parameters: int, position_parameters: int, num_layers: int, width: int,
                         seq_len: int) -> float:
    """``megagpt.metrics.flops_per_token``'s convention for GPT-2: 6 x (parameters in matmuls: all but the position
    table; the tied token table counts once, as the head) + 12 L d T for the attention scores."""
    return float(6 * (num_parameters - position_parameters) + 12 * num_layers * width * seq_len)


class Clock:
    """Wall time between two device-synchronised readings."""

    def __init__(self, device):
        import torch

        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def now(self) -> float:
        self._sync()
        return time.perf_counter()


def synthetic_batches(vocab_size: int, micro_batch: int, seq_len: int, device, count: int = 4) -> list:
    """``count`` random token batches ``[micro_batch, seq_len + 1]`` on the device, drawn once (not timed)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (micro_batch, seq_len + 1), generator=gen).to(device) for _ in range(count)]


def timed_training(args, run_micro_step, optimizer_step, batches, clock) -> tuple[float, list[float]]:
    """Run ``warmup_steps + steps`` optimizer steps of ``grad_accum`` micro steps; (seconds of the timed steps,
    the last micro loss of every step)."""
    losses, start = [], None
    for step in range(args.warmup_steps + args.steps):
        if step == args.warmup_steps:
            start = clock.now()
        for micro in range(args.grad_accum):
            loss = run_micro_step(batches[(step * args.grad_accum + micro) % len(batches)])
        optimizer_step()
        losses.append(loss.detach())
    seconds = clock.now() - start
    return seconds, [float(x) for x in losses]


def memory_figures(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"peak_memory_bytes": None, "peak_reserved_bytes": None}
    return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}


def write_json(data: dict, path: str | Path) -> None:
    """Write ``data`` to ``path`` under a temporary name, then rename (a partial file never looks finished)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- workers


def megagpt_worker(args) -> dict:
    """One megagpt case in this (deepspeed-launched) process."""
    import torch

    from megagpt.engine import build_engine, build_process_groups, init_distributed, launch_from_env
    from megagpt.metrics import flops_per_token
    from megagpt.training import micro_loss

    config = load_shape_config(args, args.shape, args.optimizer)
    launch = launch_from_env("auto")
    init_distributed(launch)
    engine = build_engine(config, launch, build_process_groups(config, launch))
    model, device = config.model, launch.device
    batches = synthetic_batches(model.vocab_size, config.batch.micro_batch, model.seq_len, device)

    def micro_step(rows):
        loss = micro_loss(engine, rows, device)
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer on the last micro batch of each step only
        return loss

    seconds, losses = timed_training(args, micro_step, lambda: None, batches, Clock(device))
    return {"parameters": sum(p.numel() for p in engine.module.parameters()),
            "flops_per_token": flops_per_token(model, model.seq_len), "seconds": seconds, "losses": losses,
            "optimizer_state_bytes": optimizer_state_bytes(engine.optimizer), **memory_figures(device),
            "config": config.to_dict()}


def hf_worker(args) -> dict:
    """The transformers baseline of one shape in this process."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    config = load_shape_config(args, args.shape)
    model_cfg, batch = config.model, config.batch
    if model_cfg.attention_width != model_cfg.d_model:
        raise ValueError(f"{args.shape}: num_heads x head_dim = {model_cfg.attention_width} != d_model "
                         f"{model_cfg.d_model}; GPT2LMHeadModel cannot take that shape")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    hf_config = GPT2Config(vocab_size=model_cfg.padded_vocab_size, n_positions=model_cfg.seq_len,
                           n_embd=model_cfg.d_model, n_layer=model_cfg.num_layers, n_head=model_cfg.num_heads,
                           n_inner=model_cfg.ffn_hidden_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    with torch.device(device):  # initialised where it trains (a 1B model's init on the CPU takes long)
        model = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
    model = model.to(device).train()
    opt = config.optimizer
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, fused=True)
    batches = synthetic_batches(model_cfg.vocab_size, batch.micro_batch, model_cfg.seq_len, device)

    def micro_step(rows):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=rows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        (loss / args.grad_accum).backward()
        return loss

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, losses = timed_training(args, micro_step, optimizer_step, batches, Clock(device))
    n = sum(p.numel() for p in model.parameters())
    flops = gpt2_flops_per_token(n, model.transformer.wpe.weight.numel(), model_cfg.num_layers, model_cfg.d_model,
                                 model_cfg.seq_len)
    return {"parameters": n, "flops_per_token": flops, "seconds": seconds, "losses": losses,
            "attn_implementation": model.config._attn_implementation, "transformers": _version("transformers"),
            "optimizer_state_bytes": optimizer_state_bytes(optimizer), **memory_figures(device),
            "micro_batch": batch.micro_batch, "seq_len": model_cfg.seq_len}


def peak_worker(args) -> dict:
    """The bf16 matmul peak of this device, measured by bench_attention.py's own function."""
    import importlib.util
    from types import SimpleNamespace

    import torch

    spec = importlib.util.spec_from_file_location("bench_attention", REPO / "benchmarks" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timing = SimpleNamespace(matmul_size=256 if args.dry else 8192, seed=0, warmup_ms=25.0, rep_ms=100.0,
                             cpu_repeats=3)
    return {"matmul_peak": bench.measure_matmul_peak(device, torch.bfloat16, timing)}


def run_worker(args) -> int:
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    result = {"megagpt": megagpt_worker, "hf": hf_worker, "peak": peak_worker}[args.worker](args)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(result, args.result)
    return 0


def _version(package: str):
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None

# ---------------------------------------------------------------------------------------------------- driver


def planned_cases(args) -> list[dict]:
    """Per shape: each megagpt optimizer, then the baseline. ``--dry`` takes the optimizers in turn, one per shape
    (every code path once: each launch costs tens of seconds on a CPU)."""
    cases = []
    for index, shape in enumerate(args.shapes):
        optimizers = [args.optimizers[index % len(args.optimizers)]] if args.dry else args.optimizers
        cases += [{"name": f"megagpt_{shape}_{opt}", "kind": "megagpt", "shape": shape, "optimizer": opt}
                  for opt in optimizers]
        if args.baseline:
            cases.append({"name": f"hf_{shape}", "kind": "hf", "shape": shape, "optimizer": "adamw_fused_torch"})
    return cases


def worker_command(args, kind: str, result: Path, port: int, shape: str = "", optimizer: str = "") -> list[str]:
    """The command of one worker: megagpt under the deepspeed launcher (``python -m deepspeed.launcher.runner`` is
    the ``deepspeed`` script, without depending on where pip put it), the others as plain python."""
    flags = ["--output", args.output, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
             "--grad-accum", str(args.grad_accum), "--worker", kind, "--result", str(result), "--shapes", *args.shapes]
    flags += ["--shape", shape, "--optimizer", optimizer] if shape else []
    flags += ["--micro-batch", str(args.micro_batch)] if args.micro_batch else []
    flags += ["--dry"] if args.dry else []
    for override in args.overrides:
        flags += ["--set", override]
    if kind == "megagpt":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
                str(Path(__file__).resolve()), *flags]
    return [sys.executable, str(Path(__file__).resolve()), *flags]


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
              "note": DRY_NOTE if args.dry else None, "torch": torch.__version__, "deepspeed": _version("deepspeed"),
              "bitsandbytes": _version("bitsandbytes"), "transformers": _version("transformers"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "args": {k: v for k, v in vars(args).items() if k not in ("worker", "shape", "optimizer", "result")},
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
        write_json(report, out / "train.json")
    report["complete"] = True
    write_json(report, out / "train.json")
    print(format_table(report))
    failed = [c for c in report["cases"] if c["status"] != "ok" or not c["losses_finite"]]
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_table:
        print(format_table(json.loads((Path(args.output) / "train.json").read_text())))
        return 0
    return run_worker(args) if args.worker else run_driver(args)


if __name__ == "__main__":
    sys.exit(main())
