#!/usr/bin/env python
"""One case of ``benchmarks/bench_train.py``, in its own process: ``--spec`` (JSON) says which.

  megagpt  run under ``deepspeed --num_gpus 1``: the engine of ``megagpt/pretrain.py`` (``build_engine``) for
           ``configs/<shape>.json`` with bf16, ZeRO-1 and the optimizer, stepped as ``megagpt/training.py`` steps it
           (``micro_loss``, ``engine.backward``, ``engine.step``) on synthetic tokens at the full length;
  hf       transformers' ``GPT2LMHeadModel`` (SDPA) of the same shape, fp32 weights under bf16 autocast, fused AdamW;
  peak     the device's bf16 matmul peak, measured by ``bench_attention.py``'s own function.
Writes its measurements as JSON to the spec's ``result`` path (rank 0, temporary name then rename).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
# --dry: every config shrinks to this (head_dim set so that heads x head_dim = d_model, as GPT-2 needs).
DRY_MODEL = {"d_model": 64, "num_heads": 2, "head_dim": 32, "num_layers": 2, "seq_len": 32, "vocab_size": 500}


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
    from megagpt.checkpoint_dir import atomic_write_text  # imported late: see main (TRITON_INTERPRET first)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


def megagpt_worker(args) -> dict:
    """One megagpt case in this (deepspeed-launched) process; the config's data files are never read."""
    from megagpt.engine import build_engine, build_process_groups, init_distributed, launch_from_env
    from megagpt.metrics import flops_per_token
    from megagpt.training import full_rows, micro_loss

    config = load_shape_config(args, args.shape, args.optimizer)
    launch = launch_from_env("auto")
    init_distributed(launch)
    engine = build_engine(config, launch, build_process_groups(config, launch))
    model, device = config.model, launch.device
    batches = synthetic_batches(model.vocab_size, config.batch.micro_batch, model.seq_len, device)

    def micro_step(rows):
        loss = micro_loss(engine, full_rows(rows), device)
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

    import torch

    spec = importlib.util.spec_from_file_location("bench_attention", Path(__file__).with_name("bench_attention.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timing = SimpleNamespace(matmul_size=256 if args.dry else 8192, seed=0, warmup_ms=25.0, rep_ms=100.0,
                             cpu_repeats=3)
    return {"matmul_peak": bench.measure_matmul_peak(device, torch.bfloat16, timing)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="JSON: kind, shape, optimizer, steps, warmup_steps, "
                        "grad_accum, micro_batch, overrides, dry, result")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = SimpleNamespace(**json.loads(parser.parse_args(argv).spec))
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    result = {"megagpt": megagpt_worker, "hf": hf_worker, "peak": peak_worker}[args.kind](args)
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(result, args.result)
    return 0


def _version(package: str):
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
