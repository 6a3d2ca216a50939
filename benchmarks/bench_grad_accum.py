#!/usr/bin/env python
"""What summing micro-batch gradients in bf16 costs against fp32, on the real DeepSpeed path.

DeepSpeed's default for a bf16 run accumulates (and reduces) gradients in bf16; megagpt now derives
``data_types.grad_accum_dtype = "fp32"`` and ``communication_data_type = "fp32"`` (megagpt/config/tree.py).
Three runs of the same small GPT see the same micro batches in the same order, each from the same initial weights:

  fp32        fp32 weights and gradients: the reference
  bf16+fp32   bf16 weights, gradients accumulated in fp32 (megagpt's derived config)
  bf16+bf16   bf16 weights, gradients accumulated in bf16 (DeepSpeed's default, forced here for the comparison)

All with ZeRO-1 on one rank, ``--accum`` micro batches per optimizer step. Reported per step: the training loss of
each run, and after the last step the loss on held-out batches; the two bf16 runs are compared against the fp32 run
of the same invocation (differences, not absolute figures). Also reported: the relative error of one step's summed
gradient when the sum of the same bf16 micro-batch gradients is taken in bf16 instead of fp32 (plain torch, no
optimizer), the direct cause of the loss difference.

CPU figures (bf16 rounding is the same arithmetic on any device; the speed is not measured here):
    python benchmarks/bench_grad_accum.py --output benchmarks/results/grad_accum_cpu.json
    python benchmarks/bench_grad_accum.py --device cuda      # the same on a GPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

VOCAB = 128


def synthetic_rows(generator: torch.Generator, count: int, micro_batch: int, seq_len: int) -> list[torch.Tensor]:
    """``count`` micro batches of learnable rows: counting mod VOCAB from a random start, 10% tokens replaced."""
    batches = []
    for _ in range(count):
        start = torch.randint(0, VOCAB, (micro_batch, 1), generator=generator)
        rows = (start + torch.arange(seq_len + 1)) % VOCAB
        noise = torch.rand(rows.shape, generator=generator) < 0.1
        rows[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=generator)
        batches.append(rows)
    return batches


def run_config(precision: str, accum: int, micro_batch: int, seq_len: int, steps: int, lr: float):
    from megagpt.config import Config

    return Config.from_dict({
        "model": {"vocab_size": VOCAB, "seq_len": seq_len, "d_model": 64, "num_layers": 2, "num_heads": 4,
                  "make_vocab_size_divisible_by": 64, "dropout": 0.0},
        "data": {"data_path": ["unused"]}, "schedule": {"train_iters": steps},
        "optimizer": {"kind": "adamw", "lr": lr},
        "batch": {"micro_batch": micro_batch, "global_batch": micro_batch * accum},
        "parallel": {"zero_stage": 1, "precision": precision}})


def train_variant(name: str, config, launch, train_batches, eval_batches, accum: int) -> dict:
    """Train one variant over ``train_batches`` (``accum`` per step); losses per step and held-out loss."""
    import megagpt.engine as engine_module
    from megagpt.model import language_model_loss

    derive = engine_module.deepspeed_config
    if name == "bf16+bf16":  # DeepSpeed's own default, which megagpt's config no longer lets a user set
        def derive_bf16_accumulation(cfg, world_size):
            ds = derive(cfg, world_size)
            ds["data_types"] = {"grad_accum_dtype": "bf16"}
            ds["communication_data_type"] = "bf16"
            return ds
        engine_module.deepspeed_config = derive_bf16_accumulation
    try:
        engine = engine_module.build_engine(config, launch)
    finally:
        engine_module.deepspeed_config = derive
    model_dtype, accum_dtype = engine.get_data_types()
    step_losses, losses = [], []
    for index, rows in enumerate(tqdm(train_batches, desc=name, unit="micro batch", leave=False)):
        rows = rows.to(launch.device)
        loss = language_model_loss(engine(rows[:, :-1]), rows[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if (index + 1) % accum == 0:
            step_losses.append(sum(losses) / len(losses))
            losses = []
    engine.eval()
    with torch.no_grad():
        held_out = [language_model_loss(engine(rows[:, :-1]), rows[:, 1:]).item()
                    for rows in (r.to(launch.device) for r in eval_batches)]
    return {"model_dtype": str(model_dtype), "grad_accum_dtype": str(accum_dtype),
            "optimizer": type(engine.optimizer).__name__, "step_losses": step_losses,
            "held_out_loss": sum(held_out) / len(held_out)}


def summed_gradient_error(config, batches, device: torch.device) -> dict:
    """Relative error of the summed gradient of ``batches`` when the bf16 per-micro-batch gradients of one bf16
    model are summed in bf16 rather than fp32 (plain torch: exactly the accumulation, nothing else)."""
    from megagpt.model import GPT, language_model_loss

    torch.manual_seed(0)
    model = GPT(config.model).to(device=device, dtype=torch.bfloat16)
    in_bf16 = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    in_fp32 = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    for rows in tqdm(batches, desc="summed gradient", unit="micro batch", leave=False):
        rows = rows.to(device)
        model.zero_grad(set_to_none=True)
        language_model_loss(model(rows[:, :-1]), rows[:, 1:]).backward()
        for n, p in model.named_parameters():
            in_bf16[n] += p.grad
            in_fp32[n] += p.grad.float()
    error = torch.sqrt(sum(((in_bf16[n].float() - in_fp32[n]) ** 2).sum() for n in in_fp32))
    norm = torch.sqrt(sum((in_fp32[n] ** 2).sum() for n in in_fp32))
    return {"micro_batches": len(batches), "relative_error": (error / norm).item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accum", type=int, default=128, help="micro batches per optimizer step (gpt1b on 1 GPU: 128)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    if args.output is not None and args.output.exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # float sums depend on the thread count: the same for every run
    from megagpt.engine import init_distributed, launch_from_env

    launch = launch_from_env(args.device)
    init_distributed(launch)
    generator = torch.Generator().manual_seed(1234)
    train_batches = synthetic_rows(generator, args.accum * args.steps, args.micro_batch, args.seq_len)
    eval_batches = synthetic_rows(generator, args.eval_batches, args.micro_batch, args.seq_len)
    runs = {}
    for name, precision in (("fp32", "fp32"), ("bf16+fp32", "bf16"), ("bf16+bf16", "bf16")):
        config = run_config(precision, args.accum, args.micro_batch, args.seq_len, args.steps, args.lr)
        runs[name] = train_variant(name, config, launch, train_batches, eval_batches, args.accum)
    reference = runs["fp32"]
    for name in ("bf16+fp32", "bf16+bf16"):
        run = runs[name]
        run["held_out_minus_fp32"] = run["held_out_loss"] - reference["held_out_loss"]
        run["step_loss_minus_fp32"] = [a - b for a, b in zip(run["step_losses"], reference["step_losses"])]
    gradient = summed_gradient_error(run_config("bf16", args.accum, args.micro_batch, args.seq_len, 1, args.lr),
                                     train_batches[:args.accum], launch.device)
    device_name = torch.cuda.get_device_name(launch.device) if launch.device.type == "cuda" else "cpu"
    result = {"device": device_name, "note": "bf16 rounding figures of a tiny model; no speed is measured",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "python": platform.python_version(), "args": {
                  k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "runs": runs, "summed_gradient_bf16_vs_fp32": gradient}

    print(f"{args.steps} steps x {args.accum} micro batches ({device_name})")
    for name, run in runs.items():
        delta = "" if name == "fp32" else f"  held-out minus fp32 {run['held_out_minus_fp32']:+.5f}"
        print(f"  {name:10s} {run['optimizer']:24s} accumulates {run['grad_accum_dtype']:15s} step losses "
              f"{', '.join(f'{x:.4f}' for x in run['step_losses'])}  held-out {run['held_out_loss']:.5f}{delta}")
    print(f"  one step's gradient summed over {gradient['micro_batches']} bf16 micro batches in bf16 instead of "
          f"fp32: relative error {gradient['relative_error']:.2e}")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
