#!/usr/bin/env python
"""The model's fused LayerNorm and cross-entropy against the plain PyTorch ops, in the same run.

For each op and shape: forward+backward time of the fused op divided by the plain op's (below 1: fused is faster),
and the peak memory each allocates above its inputs (CUDA: ``max_memory_allocated`` after
``reset_peak_memory_stats``). The plain loss is the one the model used before ``model.fused_kernels``:
``F.cross_entropy(logits.float())``, which builds fp32 copies of the whole ``[tokens, vocab]`` logits. Before
timing, the fused result and gradients are compared with the plain ones (max error / max |plain|).

Timing: ``triton.testing.do_bench`` on CUDA (median, warm-up excluded); ``time.perf_counter`` median on CPU, where
the fused kernels run in the Triton interpreter on tiny shapes: CPU figures only show that it runs, they are not
GPU figures.
    python benchmarks/bench_fused_ops.py                 # GPU: gpt1b shapes, bf16
    python benchmarks/bench_fused_ops.py --device cpu    # a quick check that it runs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

GPU_SHAPES = {"layer_norm": [(16384, 2048), (16384, 4096)], "cross_entropy": [(16384, 50304), (8192, 128256)]}
CPU_SHAPES = {"layer_norm": [(64, 256)], "cross_entropy": [(32, 1000)]}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2, "fp32": 1e-4}


def layer_norm_ops(rows: int, hidden: int, dtype, device):
    import megagpt.kernels as kernels

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to(device, dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
    bias = (0.1 * torch.randn(hidden, generator=gen)).to(device, dtype).requires_grad_()
    grad = torch.randn(rows, hidden, generator=gen).to(device, dtype)
    inputs = (x, weight, bias)

    def fused():
        return kernels.fused_layer_norm(x, weight, bias, 1e-5)

    def plain():
        return F.layer_norm(x, (hidden,), weight, bias, 1e-5)

    return fused, plain, inputs, grad


def cross_entropy_ops(rows: int, vocab: int, dtype, device):
    import megagpt.kernels as kernels

    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(device)

    def fused():
        return kernels.fused_cross_entropy(logits, targets)

    def plain():
        return F.cross_entropy(logits.float(), targets)

    return fused, plain, (logits,), torch.ones((), device=device)


def run_once(fn, inputs, grad):
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(grad)
    return out.detach(), [t.grad for t in inputs]


def max_relative_error(got, want) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def time_ms(fn, inputs, grad, device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(lambda: run_once(fn, inputs, grad), warmup=25, rep=100)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run_once(fn, inputs, grad)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_bytes(fn, inputs, grad, device) -> int | None:
    if device.type != "cuda":
        return None
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_once(fn, inputs, grad)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--out", default=None, help="JSON file for the results (refused if it exists)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read at each launch (kernels/_common.py)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.out and os.path.exists(args.out):
        raise SystemExit(f"{args.out} exists; choose another --out")
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    builders = {"layer_norm": layer_norm_ops, "cross_entropy": cross_entropy_ops}
    results = []
    for op, op_shapes in shapes.items():
        for shape in op_shapes:
            fused, plain, inputs, grad = builders[op](*shape, DTYPES[dtype_name], device)
            fused_out, fused_grads = run_once(fused, inputs, grad)
            plain_out, plain_grads = run_once(plain, inputs, grad)
            error = max(max_relative_error(a, b) for a, b in zip([fused_out, *fused_grads], [plain_out, *plain_grads]))
            row = {"op": op, "shape": list(shape), "dtype": dtype_name, "max_rel_error": error,
                   "ok": error <= TOLERANCE[dtype_name]}
            row["time_ratio_fused_over_plain"] = (time_ms(fused, inputs, grad, device)
                                                  / time_ms(plain, inputs, grad, device))
            row["peak_bytes_fused"] = peak_bytes(fused, inputs, grad, device)
            row["peak_bytes_plain"] = peak_bytes(plain, inputs, grad, device)
            results.append(row)
            print(json.dumps(row), flush=True)
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
               "note": None if device.type == "cuda" else "CPU RUN: interpreter on tiny shapes, not GPU figures",
               "results": results}
    if args.out:
        with open(args.out + ".partial", "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(args.out + ".partial", args.out)
    print(f"{sum(r['ok'] for r in results)}/{len(results)} ops match the plain ones; {summary['note'] or ''}")
    if not all(r["ok"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
