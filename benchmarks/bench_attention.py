#!/usr/bin/env python
"""Causal ALiBi attention speed: forward and forward+backward TFLOP/s, peak memory and accuracy per backend.

Backends (all causal with ALiBi slopes from ``megagpt.model.alibi``):
  triton  ``megagpt.kernels.alibi_flash_attention``
  flex    FlexAttention with an ALiBi ``score_mod`` and a causal block mask (``megagpt.model.attention``;
          compiled on CUDA, eager and forward-only on CPU)
  sdpa    ``scaled_dot_product_attention`` with a materialised ``[1, h, s, s]`` ALiBi + causal bias, built once per
          shape outside the timed call (a model shares it across layers); its bytes count in the memory column
  flash   flash-attn's ``flash_attn_func(..., causal=True, alibi_slopes=...)`` when the package is installed

FLOPs follow FlashAttention: a causal forward is ``2*b*h*s^2*d`` (half of ``4*b*h*s^2*d``), forward+backward 3.5x
that. Timing: ``triton.testing.do_bench`` (CUDA events, median, warm-up excluded, L2 flushed) on CUDA, over
``--input-sets`` random input sets used in turn; ``time.perf_counter`` median on CPU. The device's own matmul peak
(square ``--matmul-size`` matmul in the same dtype) is measured in the same run and every figure is also given as a
fraction of it. Before timing, every backend's output (and dq, dk, dv for fwd_bwd) is checked against a float64
reference on the same inputs; the tolerance (on max error / max |reference|) catches wrong results, not rounding.
Peak memory (CUDA): ``max_memory_allocated`` after ``reset_peak_memory_stats`` over one call, above what was
allocated before it (so q, k, v, dO are excluded, an SDPA bias is included); the raw total is kept too.
A backend that cannot run (flex backward on CPU, flash-attn not installed) is recorded as "unsupported" with the
reason, an out-of-memory as "oom", anything else as "error" (exit status 1); the run always goes on.
On CPU (Triton interpreter, tiny shapes) it only checks that everything runs: those figures are not GPU figures.
    python benchmarks/bench_attention.py                       # GPU: s = 512..8192, d = 64, 128, bf16
    python benchmarks/bench_attention.py --device cpu          # a quick check that it runs
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from megagpt.model import attention as model_attention
from megagpt.model.alibi import alibi_slopes

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = ("triton", "flex", "sdpa", "flash")
# Max error / max |reference| allowed per input dtype: far above rounding (TF32 included), far below a wrong kernel.
TOLERANCE = {"fp32": 2e-3, "fp16": 1e-2, "bf16": 5e-2}
GPU_DEFAULTS = dict(seq_lens=[512, 1024, 2048, 4096, 8192], head_dims=[64, 128], tokens=16384, heads=16,
                    dtype="bf16", input_sets=3, matmul_size=8192)
CPU_DEFAULTS = dict(seq_lens=[64, 128], head_dims=[32, 64], tokens=128, heads=2, dtype="fp32", input_sets=1,
                    matmul_size=256)
CPU_NOTE = ("CPU RUN: these figures time PyTorch's CPU path and the Triton *interpreter* on tiny shapes; they only "
            "show that the benchmark runs and are NOT GPU figures.")
PEAK_MEMORY_MEANING = ("peak_mem_bytes: peak bytes one call allocates above what was allocated before it (q, k, v, dO "
                       "excluded), plus the per-shape state a backend keeps (SDPA's bias); peak_mem_total_bytes: raw "
                       "max_memory_allocated after reset_peak_memory_stats. CUDA only: null on CPU.")
FLOPS_CONVENTION = "causal forward = 2*b*h*s^2*d FLOPs, forward+backward = 3.5x forward (FlashAttention)"


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line; unset shape/dtype flags take GPU or CPU defaults by the resolved device."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", help=f"GPU default {GPU_DEFAULTS['seq_lens']}")
    p.add_argument("--head-dims", type=int, nargs="+", help=f"GPU default {GPU_DEFAULTS['head_dims']}")
    p.add_argument("--tokens", type=int, help="batch * seq (batch = max(1, tokens // seq)); GPU default 16384")
    p.add_argument("--heads", type=int, help="GPU default 16")
    p.add_argument("--dtype", choices=list(DTYPES), help="GPU default bf16, CPU default fp32")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--mode", choices=["fwd", "fwd_bwd", "both"], default="both")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare each backend with a float64 reference before timing (--no-check skips it)")
    p.add_argument("--input-sets", type=int, help="random input sets used in turn while timing (GPU default 3)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (CUDA)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time (CUDA)")
    p.add_argument("--cpu-repeats", type=int, default=1, help="timed calls per entry on CPU, after one warm-up")
    p.add_argument("--matmul-size", type=int, help="n of the n x n x n matmul peak measurement (GPU default 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=None, help="names the default --output (default: the device name)")
    p.add_argument("--output", default=None, help="JSON results (default benchmarks/results/attention_<tag>.json)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (use --device cpu or auto)")
    for key, value in (GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in ("seq_lens", "head_dims"):
        if min(getattr(args, flag)) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("tokens", "heads", "input_sets", "cpu_repeats", "matmul_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.tag is None:
        args.tag = re.sub(r"[^a-z0-9]+", "-", device_name(args.device).lower()).strip("-") or args.device
    if args.output is None:
        args.output = str(REPO / "benchmarks" / "results" / f"attention_{args.tag}.json")
    return args


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, mode: str) -> float:
    """FLOPs of one causal attention call in the FlashAttention convention (see the module docstring)."""
    forward = 2.0 * batch * heads * seq * seq * head_dim
    return forward if mode == "fwd" else 3.5 * forward


# ---------------------------------------------------------------------------------------------------- timing


def time_ms(call, device: str, args, cpu_warmup: bool = True, cpu_repeats: int | None = None) -> float:
    """Median milliseconds of ``call()``, warm-up excluded (on CPU ``cpu_warmup=False`` when the caller warmed up)."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(call, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))
    if cpu_warmup:
        call()
    times = []
    for _ in range(cpu_repeats or args.cpu_repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure_matmul_peak(device: str, dtype: torch.dtype, args) -> dict:
    """TFLOP/s of an n x n x n matmul on this device in the benchmark's dtype: the yardstick for every row."""
    n = args.matmul_size
    gen = torch.Generator(device=device).manual_seed(args.seed)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
    ms = time_ms(lambda: a @ b, device, args, cpu_repeats=max(5, args.cpu_repeats))  # cheap: steady it
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms": ms, "tflops": 2.0 * n**3 / (ms * 1e-3) / 1e12}


# ---------------------------------------------------------------------------------------------------- backends


class Inputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor  # the upstream gradient of fwd_bwd


def make_inputs(batch, heads, seq, head_dim, dtype, device, seed) -> Inputs:
    """Random normal q, k, v, dO that do not require grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return Inputs(*(torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=gen)
                    for _ in range(4)))


def inputs_for_mode(inp: Inputs, mode: str) -> Inputs:
    """fwd_bwd differentiates q, k, v: leaves sharing their storage. The forward gets plain tensors, because
    FlexAttention on CPU refuses inputs that require grad even under ``torch.no_grad``."""
    if mode == "fwd":
        return inp
    return Inputs(*(t.detach().requires_grad_() for t in inp[:3]), inp.do)


def make_backend(name: str, slopes: torch.Tensor, seq: int, dtype: torch.dtype, device: str, scale: float):
    """``(attn(q, k, v) -> out, state_bytes)``; ``state_bytes`` is what the backend keeps per shape (SDPA's bias)."""
    if name == "sdpa":
        # Built in fp32, then cast (as the model does): bf16 would round the large far-off biases first.
        bias = model_attention.causal_bias(slopes, seq, seq, torch.device(device), torch.float32).to(dtype)[None]
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale),
                bias.numel() * bias.element_size())
    if name == "flex":
        # One compiled flex function serves every shape; a fresh Dynamo cache per shape keeps it under the recompile
        # limit (beyond it Dynamo would silently run the slow eager path) and avoids a known Inductor error.
        torch._dynamo.reset()
    backend = {"triton": model_attention.triton_attention, "flex": model_attention.flex_attention_backend,
               "flash": model_attention.flash_attention}[name]
    if name == "triton":
        model_attention.check_backend_installed("triton")
    return (lambda q, k, v: backend(q, k, v, slopes, scale)), 0


def make_step(attn, mode: str):
    """One benchmarked call on an ``Inputs``: the forward (no autograd graph), or forward + backward to q, k, v."""
    if mode == "fwd":
        def step(inp: Inputs) -> dict:
            with torch.no_grad():
                return {"out": attn(inp.q, inp.k, inp.v)}
    else:
        def step(inp: Inputs) -> dict:
            out = attn(inp.q, inp.k, inp.v)
            dq, dk, dv = torch.autograd.grad(out, (inp.q, inp.k, inp.v), inp.do)
            return {"out": out, "dq": dq, "dk": dk, "dv": dv}
    return step


def reference_results(inp: Inputs, slopes: torch.Tensor, scale: float, with_grads: bool) -> dict:
    """Float64 output (and dq, dk, dv) on CPU, computed in chunks of heads so that ``s x s`` scores fit."""
    batch, heads, seq, _ = inp.q.shape
    # ~4 live float64 s x s tensors per head (bias, scores, probabilities, their gradient); ~2 GiB per chunk.
    heads_per_chunk = max(1, min(heads, (2 << 30) // (4 * 8 * seq * seq)))
    names = ("out", "dq", "dk", "dv") if with_grads else ("out",)
    result = {name: torch.empty(inp.q.shape, dtype=torch.float64) for name in names}
    for b in range(batch):
        for h0 in range(0, heads, heads_per_chunk):
            part = (slice(b, b + 1), slice(h0, h0 + heads_per_chunk))
            q, k, v = (t.detach()[part].double().requires_grad_(with_grads) for t in (inp.q, inp.k, inp.v))
            out = model_attention.reference_attention(q, k, v, slopes[part[1]], scale)
            tensors = [out]
            if with_grads:
                tensors += torch.autograd.grad(out, (q, k, v), inp.do[part].double())
            for name, t in zip(names, tensors):
                result[name][part] = t.detach().cpu()
    return result


def compare(got: dict, ref: dict, dtype_name: str) -> dict:
    """Max abs error per tensor, overall, relative to max |reference|, and pass/fail against TOLERANCE."""
    errors = {name: (got[name].detach().cpu().double() - ref[name]).abs().max().item() for name in got}
    rel = max(errors[name] / max(ref[name].abs().max().item(), 1e-30) for name in errors)
    ok = math.isfinite(rel) and rel <= TOLERANCE[dtype_name]
    return {"max_abs_err": max(errors.values()), "errors": errors, "rel_err": rel,
            "tolerance": TOLERANCE[dtype_name], "check": "pass" if ok else "FAIL"}


# ---------------------------------------------------------------------------------------------------- one entry


def run_entry(entry: dict, backend: str, mode: str, input_sets: list, slopes, reference, args) -> None:
    """Fill ``entry`` for one (backend, head_dim, seq, mode): first call, memory + check call, then the timing."""
    device, dtype = args.device, DTYPES[args.dtype]
    seq, head_dim = entry["seq_len"], entry["head_dim"]
    scale = 1.0 / math.sqrt(head_dim)
    attn, state_bytes = make_backend(backend, slopes, seq, dtype, device, scale)
    step = make_step(attn, mode)
    entry["phase"] = "first call"  # compiles / autotunes; unsupported backends fail here
    step(input_sets[0])
    entry["phase"] = "memory and check call"
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    got = step(input_sets[0])
    if device == "cuda":
        torch.cuda.synchronize()
        entry["peak_mem_total_bytes"] = torch.cuda.max_memory_allocated()
        entry["peak_mem_bytes"] = entry["peak_mem_total_bytes"] - before + state_bytes
    if isinstance(reference, dict):
        entry.update(compare(got, reference, args.dtype))
    else:
        entry["check"] = reference  # why there is no check
    del got
    entry["phase"] = "timing"
    counter = itertools.count()
    # On CPU the two calls above were the warm-up (the Triton interpreter is slow enough without a third).
    entry["ms"] = time_ms(lambda: step(input_sets[next(counter) % len(input_sets)]), device, args, cpu_warmup=False)
    entry["tflops"] = entry["flops"] / (entry["ms"] * 1e-3) / 1e12
    entry["status"] = "ok"
    del entry["phase"]


def run_entry_recording_failures(entry: dict, backend: str, mode: str, input_sets: list, slopes, reference,
                                 args) -> None:
    """``run_entry``, with "unsupported" / "oom" / "error" recorded in ``entry`` instead of raised."""
    try:
        run_entry(entry, backend, mode, input_sets, slopes, reference, args)
    except torch.OutOfMemoryError:
        entry.update(status="oom", reason=f"out of memory in {entry.pop('phase', 'setup')}")
    except (NotImplementedError, ValueError) as err:  # how backends refuse what they cannot do
        entry.update(status="unsupported", reason=f"unsupported on {args.device} "
                     f"({entry.pop('phase', 'setup')}): {type(err).__name__}: {err}")
    except Exception as err:  # noqa: BLE001 - one broken backend must not end a long GPU run; exit status says it
        traceback.print_exc()
        entry.update(status="error", reason=f"{entry.pop('phase', 'setup')}: {type(err).__name__}: {err}")
    # Out of the except blocks the traceback (and the tensors its frames hold) is gone: now memory can be returned.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- report


def format_table(report: dict) -> str:
    """The results as a fixed-width text table (one row per entry), with the CPU note when there is one."""
    peak = report["matmul_peak"]
    lines = [f"attention benchmark on {report['device']} | {report['args']['dtype']} | heads {report['args']['heads']}"
             f" | {FLOPS_CONVENTION}",
             f"matmul peak: {peak['tflops']:.3f} TFLOP/s ({peak['dtype']}, n={peak['n']})"]
    if report["note"]:
        lines.append(f"*** {report['note']} ***")
    header = (f"{'backend':<8}{'d':>5}{'seq':>7}{'batch':>6} {'mode':<8}{'ms':>10}{'TFLOP/s':>10}{'%peak':>7}"
              f"{'mem MiB':>10}{'max err':>10}  check / status")
    lines += [header, "-" * len(header)]
    for e in report["results"]:
        row = f"{e['backend']:<8}{e['head_dim']:>5}{e['seq_len']:>7}{e['batch']:>6} {e['mode']:<8}"
        if e["status"] != "ok":
            lines.append(f"{row}{'':>47}  {e['status']}: {e['reason']}")
            continue
        mem = f"{e['peak_mem_bytes'] / 2**20:.1f}" if e.get("peak_mem_bytes") is not None else "n/a"
        err = f"{e['max_abs_err']:.2e}" if "max_abs_err" in e else "-"
        lines.append(f"{row}{e['ms']:>10.3f}{e['tflops']:>10.4g}{100 * e['frac_of_matmul_peak']:>6.1f}%"
                     f"{mem:>10}{err:>10}  {e['check']}")
    if report["note"]:
        lines.append(f"*** {report['note']} ***")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    """Atomically (temp name, then rename) write the report."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.partial"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def _version(package: str):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None) -> int:
    """Run the benchmark; print the table, write the JSON. Returns 1 if a check failed or a backend errored."""
    args = parse_args(argv)
    previous_interpret = os.environ.get("TRITON_INTERPRET")
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported below; megagpt's kernels read it per launch
    try:
        return _run(args)
    finally:
        if args.device == "cpu":  # leave the environment of an in-process caller as it was
            if previous_interpret is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous_interpret


def _run(args) -> int:
    dtype, device = DTYPES[args.dtype], args.device
    modes = ["fwd", "fwd_bwd"] if args.mode == "both" else [args.mode]
    report = {
        "device": device_name(device), "device_type": device, "torch": torch.__version__,
        "triton": _version("triton"), "cuda": torch.version.cuda, "flash_attn": _version("flash-attn"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args), "note": CPU_NOTE if device == "cpu" else None, "flops_convention": FLOPS_CONVENTION,
        "tolerance_rel_to_max_abs_ref": TOLERANCE, "peak_memory": PEAK_MEMORY_MEANING, "complete": False,
    }
    print(f"measuring the {args.dtype} matmul peak ...", file=sys.stderr)
    report["matmul_peak"] = measure_matmul_peak(device, dtype, args)
    report["results"] = results = []
    slopes = alibi_slopes(args.heads).to(device)
    for head_dim, seq in itertools.product(args.head_dims, args.seq_lens):
        batch = max(1, args.tokens // seq)
        seeds = [args.seed + 100_000 * i + 1000 * head_dim + seq for i in range(args.input_sets)]
        input_sets = [make_inputs(batch, args.heads, seq, head_dim, dtype, device, seed) for seed in seeds]
        for mode in modes:
            mode_sets = [inputs_for_mode(inp, mode) for inp in input_sets]
            reference = "not run (--no-check)"
            if args.check:
                try:
                    reference = reference_results(input_sets[0], slopes, 1.0 / math.sqrt(head_dim), mode == "fwd_bwd")
                except torch.OutOfMemoryError:
                    reference = "not run: the float64 reference ran out of memory"
            for backend in args.backends:
                entry = {"backend": backend, "head_dim": head_dim, "seq_len": seq, "batch": batch, "heads": args.heads,
                         "dtype": args.dtype, "mode": mode, "flops": attention_flops(batch, args.heads, seq,
                                                                                     head_dim, mode)}
                print(f"{backend} d={head_dim} s={seq} b={batch} {mode} ...", file=sys.stderr, flush=True)
                run_entry_recording_failures(entry, backend, mode, mode_sets, slopes, reference, args)
                if entry["status"] == "ok":
                    entry["frac_of_matmul_peak"] = entry["tflops"] / report["matmul_peak"]["tflops"]
                    entry.setdefault("peak_mem_bytes", None)  # not measured on CPU
                results.append(entry)
                write_json(report, args.output)  # a crash late in a long run keeps what was measured
            del reference, mode_sets
        del input_sets
    report["complete"] = True
    write_json(report, args.output)
    print(format_table(report))
    print(f"wrote {args.output}", file=sys.stderr)
    failed = [e for e in results if e["status"] == "error" or e.get("check") == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
