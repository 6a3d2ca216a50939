#!/usr/bin/env python
"""Evaluate a megagpt checkpoint: perplexity, accuracy and bits per byte of text files and indexed data, LAMBADA
and multiple-choice tasks, optionally over a sweep of context lengths (metric definitions: docs/evaluation.md).

    python tools/evaluate.py --load runs/gpt1b --text-file wiki.txt --lambada lambada.jsonl
    python tools/evaluate.py --load out/consolidated --data-path data/owt_text_document --split-name valid
    python tools/evaluate.py --load runs/alibi --text-file long.txt --seq-lengths 512,1024,2048,4096
    torchrun --nproc_per_node 8 tools/evaluate.py --load runs/gpt1b --multiple-choice piqa.jsonl   # data parallel

``--load``: a training save directory (its ``latest`` step; any tp/pp/dp layout), a step directory, a consolidated
directory (tools/convert_checkpoint.py), or a weights file with ``--model-config``. Results go to ``--output``
(default ``eval_results.json`` in the checkpoint's (step) directory); rank 0 prints a table and writes them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from megagpt.convert.weights import add_tokenizer_flags, tokenizer_from_flags
from megagpt.evaluation import (EvalSettings, EvalTasks, check_lengths, checkpoint_home, checkpoint_step,
                                evaluate_model, format_table, plot_sweep, setup_shard, teardown, write_json)
from megagpt.evaluation.distributed import run_command
from megagpt.evaluation.runner import DEFAULT_SPLIT, RESULTS_FILE
from megagpt.evaluation.tasks import MC_FORMATS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 512,1024,2048") from None
    if not lengths:
        raise argparse.ArgumentTypeError("give at least one length")
    return lengths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--load", required=True, help="training save / step / consolidated directory, or weights file")
    g.add_argument("--model-config", help="JSON model config, for a bare weights file only")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype; logits are fp32")
    g.add_argument("--attention-backend", help="override the config's (sdpa, reference, triton, flex, flash)")
    g = p.add_argument_group("tasks (each repeatable)")
    g.add_argument("--text-file", action="append", default=[], help="raw UTF-8 text, tokenized whole")
    g.add_argument("--data-path", action="append", default=[], help="indexed dataset prefix (.bin/.idx)")
    g.add_argument("--split", help=f"document split weights train,valid,test (default: the checkpoint config's "
                                   f"data.split, else {DEFAULT_SPLIT})")
    g.add_argument("--split-name", choices=("train", "valid", "test"), default="valid")
    g.add_argument("--lambada", action="append", default=[], help='JSONL of {"text": ...}')
    g.add_argument("--multiple-choice", action="append", default=[], help="JSONL, layout per --mc-format")
    g.add_argument("--mc-format", action="append", choices=("auto", *MC_FORMATS), default=[],
                   help="layout of each --multiple-choice in order (one value: all of them; default auto)")
    g = p.add_argument_group("windows and batches")
    g.add_argument("--seq-length", type=int, help="default: the model's seq_len")
    g.add_argument("--stride", type=int, help="sliding-window stride (default: the sequence length)")
    g.add_argument("--seq-lengths", type=_lengths, help="context-length sweep, e.g. 512,1024,2048 (writes a plot)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-windows", type=int, help="text/data: score only the first N windows")
    g.add_argument("--limit", type=int, help="LAMBADA/multiple choice: only the first N examples")
    add_tokenizer_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--output", help=f"results JSON (default: {RESULTS_FILE} in the checkpoint's directory)")
    g.add_argument("--plot", help="PNG of metrics against sequence length (default with a sweep: output .png)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    # the deepspeed launcher passes --local_rank=N; the rank is read from the environment (RANK, LOCAL_RANK)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _mc_tasks(args) -> list[tuple[str, str]]:
    formats = args.mc_format or ["auto"]
    if len(formats) == 1:
        formats = formats * len(args.multiple_choice)
    if len(formats) != len(args.multiple_choice):
        raise ValueError(f"{len(args.mc_format)} --mc-format values for {len(args.multiple_choice)} "
                         "--multiple-choice files: give one for all, or one per file in order")
    return list(zip(args.multiple_choice, formats))


def _tokenizer(args, weights, needed: bool):
    """The --tokenizer-* flags if given, else the checkpoint config's tokenizer section (None if not needed)."""
    return tokenizer_from_flags(weights, args, required=needed)


def evaluate(argv=None) -> dict:
    """Run the command line; returns the report (the JSON's content) on every rank. Bad input: ValueError."""
    from megagpt.convert.weights import build_gpt, read_model_weights

    args = parse_args(argv)
    tasks = EvalTasks(args.text_file, args.data_path, args.lambada, _mc_tasks(args))
    if args.seq_lengths and args.seq_length:
        raise ValueError("give --seq-length or --seq-lengths, not both")
    output = Path(args.output) if args.output else checkpoint_home(args.load) / RESULTS_FILE
    sweep = args.seq_lengths is not None and len(args.seq_lengths) > 1
    plot = Path(args.plot) if args.plot else (output.with_suffix(".png") if sweep else None)
    if plot is not None and plot.suffix.lower() != ".png":
        raise ValueError(f"--plot {plot} must end in .png")
    for path, flag in ((output, "--output"), (plot, "--plot")):  # fail now, not after the evaluation
        if path is not None and path.exists() and not args.overwrite:
            raise ValueError(f"{flag} {path} already exists; pass --overwrite to replace it")

    shard = setup_shard(args.device)
    try:
        started = time.time()
        weights = read_model_weights(args.load, args.model_config)
        saved = weights.model_config
        lengths = args.seq_lengths or [args.seq_length or saved.seq_len]
        settings = EvalSettings(lengths, args.stride, args.batch_size,
                                args.split or weights.config.get("data", {}).get("split") or DEFAULT_SPLIT,
                                args.split_name, args.max_windows, args.limit, progress=not args.quiet)
        tokenizer = _tokenizer(args, weights, tasks.needs_tokenizer)
        model = build_gpt(weights, shard.device, DTYPES[args.dtype], args.attention_backend,
                          model_config=check_lengths(saved, lengths))
        if shard.is_main:
            print(f"evaluating {weights.source}: {model.num_parameters():,} parameters, {args.dtype} on "
                  f"{shard.device}, {shard.world_size} rank(s)", flush=True)
        results = evaluate_model(model, tokenizer, tasks, settings, shard)
        report = {
            "checkpoint": str(args.load), "source": weights.source, "step": checkpoint_step(args.load),
            "model": saved.to_dict(), "tokenizer": tokenizer.describe() if tokenizer is not None else None,
            "settings": {"seq_length": lengths[0] if len(lengths) == 1 else None, "seq_lengths": lengths,
                         "stride": args.stride, "batch_size": args.batch_size, "dtype": args.dtype,
                         "device": str(shard.device), "world_size": shard.world_size,
                         "attention_backend": model.config.attention_backend, "split": settings.split,
                         "split_name": settings.split_name, "max_windows": args.max_windows, "limit": args.limit,
                         "seconds": round(time.time() - started, 3)},
            "results": results}
        if shard.is_main:
            write_json(report, output, args.overwrite)
            if plot is not None:
                plot_sweep(results, plot, args.overwrite)
            print(format_table(results))
            print(f"wrote {output}" + (f" and {plot}" if plot is not None else ""), flush=True)
    except BaseException:
        teardown(shard, failed=True)
        raise
    teardown(shard)
    return report


def main(argv=None) -> int:
    """``evaluate`` with input errors printed as one line (exit status 1) instead of a traceback."""
    return run_command(evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
