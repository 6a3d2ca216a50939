#!/usr/bin/env python
"""TracIn influence of every document of an indexed dataset on a validation set (docs/data_selection.md).

    python tools/influence.py --checkpoints out/run --steps all --data-path data/c4_text_document \\
        --valid-data-path data/heldout_text_document --valid-split 0,1,0 --output c4.influence.npz
    torchrun --nproc_per_node 8 tools/influence.py ...      # data parallel (deepspeed --num_gpus 8 works too)

TracInCP over the run's checkpoints (``--steps``: all, or a list), each weighted by the learning rate it was
trained at (read from the checkpoint). Per-document gradients come from hooks on the linear layers and the
embedding, projected LoGra-style (``--projection-dim`` per side, seeded identically on every rank; the full
per-document gradient is never formed); the validation gradients are averaged first, so each document costs one
forward, one backward to the activations and one dot product per checkpoint. ``--cosine`` scores with unit-length
gradients, ``--adam`` preconditions the training gradients by the checkpoint's fp32 Adam second moment (LESS).
Writes ``--output`` (a score file read by tools/select_documents.py unchanged: ``influence``, per-checkpoint
``influence_step<N>`` and ``tokens`` per document id), ``<output>.summary.json`` and ``<output>.hist.png``; work
goes to ``<output>.parts/`` and the same command resumes it, with any number of ranks.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run from a checkout without installing: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megagpt.convert.weights import add_tokenizer_flags, tokenizer_from_flags  # noqa: E402
from megagpt.evaluation.distributed import run_command, shard_session  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    from megagpt.selection.influence_run import DEFAULT_PROJECTION_DIM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", required=True,
                   help="a run's --save directory, step directories, or consolidated checkpoints (one run)")
    p.add_argument("--steps", default="all", help="'all' or comma-separated steps of the save directory")
    p.add_argument("--data-path", required=True, help="indexed training dataset (.bin/.idx) whose documents to score")
    p.add_argument("--output", required=True, help="score file to write (.npz)")
    v = p.add_argument_group("validation set (one of)")
    v.add_argument("--valid-data-path", help="indexed dataset prefix; its --valid-split-name split is used")
    v.add_argument("--valid-split", default="969,30,1", help="train,valid,test weights of --valid-data-path")
    v.add_argument("--valid-split-name", default="valid", choices=("train", "valid", "test"))
    v.add_argument("--valid-text-file", help="UTF-8 text, tokenized with the checkpoint's tokenizer")
    v.add_argument("--max-valid-windows", type=int, help="use at most this many validation windows")
    p.add_argument("--projection-dim", type=int, default=DEFAULT_PROJECTION_DIM,
                   help="random projection size per side of each matrix (0: no projection, tiny models only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random projections")
    p.add_argument("--cosine", action="store_true", help="unit-length gradients (cosine similarity)")
    p.add_argument("--adam", action="store_true", help="precondition training gradients by Adam's second moment")
    p.add_argument("--seq-length", type=int, help="window length (default: the model's seq_len)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward/backward pass")
    p.add_argument("--chunk-documents", type=int, default=1024, help="documents per resumable chunk")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="model dtype (gradients are projected and summed in float32/float64)")
    add_tokenizer_flags(p)  # for --valid-text-file and the token-range checks
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs / discard another run's parts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed's launcher
    return p.parse_args(argv)


def influence(argv=None) -> dict | None:
    """Run the command line; returns the summary on rank 0 (None on the others). Bad input: ValueError."""
    from megagpt.selection.checkpoints import list_checkpoints, load_checkpoint, parse_steps
    from megagpt.selection.compat import check_tokenizer_fits
    from megagpt.selection.influence_run import InfluenceSettings, run_influence
    from megagpt.selection.projection import check_projection_dim, gradient_blocks
    from megagpt.selection.score_run import ScoreOutputs
    from megagpt.selection.scores import dataset_record, open_dataset
    from megagpt.selection.validation_set import load_validation_set
    from megagpt.convert.weights import build_gpt

    args = parse_args(argv)
    outputs = ScoreOutputs(Path(args.output))
    outputs.check_free(args.overwrite)
    dataset = open_dataset(args.data_path)
    refs = list_checkpoints(args.checkpoints, parse_steps(args.steps))
    with shard_session(args.device) as shard:
        started = time.time()
        first = load_checkpoint(refs[0])  # weights only: the checks below need the model and its tokenizer
        weights = first.weights
        tokenizer = tokenizer_from_flags(weights, args, required=False)
        tokenizer_check = check_tokenizer_fits(weights, dataset, tokenizer)
        if args.valid_data_path is not None:
            check_tokenizer_fits(weights, open_dataset(args.valid_data_path, "--valid-data-path"), tokenizer)
        validation = load_validation_set(args.data_path, weights.model_config.vocab_size, args.valid_data_path,
                                         args.valid_split, args.valid_split_name, args.valid_text_file, tokenizer)
        projection = None if args.projection_dim == 0 else args.projection_dim
        check_projection_dim(gradient_blocks(build_gpt(weights)), projection)  # before any work
        settings = InfluenceSettings(args.seq_length or weights.model_config.seq_len, args.batch_size, projection,
                                     args.seed, args.cosine, args.adam, args.max_valid_windows)
        del first, weights
        record = dataset_record(args.data_path, dataset)
        if shard.is_main:
            print(f"influence of {record['num_documents']:,} documents ({record['num_tokens']:,} tokens) of "
                  f"{args.data_path} on {validation.record['tokens']:,} validation tokens, TracInCP over steps "
                  f"{[r.step for r in refs]}, projection {projection or 'off'}, {args.dtype} on {shard.device}, "
                  f"{shard.world_size} rank(s)", flush=True)
        summary = run_influence(refs, dataset, record, validation, outputs, settings, args.chunk_documents, shard,
                                DTYPES[args.dtype], args.overwrite, progress=not args.quiet,
                                extra_meta={"tokenizer_check": tokenizer_check})
        if shard.is_main:
            q = summary.get("influence", {})
            print(f"scored {summary['scored_documents']:,} documents ({summary['unscored_documents']:,} too short to "
                  f"score) in {time.time() - started:.1f}s; learning rates "
                  f"{[(c['step'], c['lr']) for c in summary['checkpoints']]}; influence median {q.get('q50')}, "
                  f"q05 {q.get('q05')}, q95 {q.get('q95')}, positive {q.get('positive_fraction')}; projected gradient "
                  f"{summary['gradient_dim']:,} floats ({summary['bytes_per_document']:,} bytes) per document\n"
                  f"wrote {outputs.scores}, {outputs.summary.name}, {outputs.histogram.name}", flush=True)
    return summary


def main(argv=None) -> int:
    """``influence`` with input errors printed as one line (exit status 1) instead of a traceback."""
    return run_command(influence, argv)


if __name__ == "__main__":
    sys.exit(main())
