#!/usr/bin/env python
"""Per-document perplexity of an indexed dataset under any megagpt checkpoint (docs/data_selection.md).

    python tools/score_documents.py --load runs/ref --data-path data/c4_text_document --output c4.ppl.npz
    torchrun --nproc_per_node 8 tools/score_documents.py --load out/gpt2 --data-path ... --output ...   # data parallel

Each document is scored on its own (no attention across documents; sliding windows with ``tools/evaluate.py``'s
context rule for long ones). Writes ``--output`` (a score file: ``tokens``, ``nll_sum``, ``perplexity`` per
document id, read by tools/select_documents.py), ``<output>.summary.json`` and ``<output>.hist.png``. Work goes to
``<output>.parts/`` chunk by chunk: re-running the same command resumes, with any number of ranks.
``--load``: a training save / step / consolidated directory (``--from-hf`` imports included), or a weights file
with ``--model-config``.
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
from megagpt.evaluation import check_lengths  # noqa: E402
from megagpt.evaluation.distributed import run_command, shard_session  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="training save / step / consolidated directory, or weights file")
    p.add_argument("--model-config", help="JSON model config, for a bare weights file only")
    p.add_argument("--data-path", required=True, help="indexed dataset prefix (.bin/.idx) to score")
    p.add_argument("--output", required=True, help="score file to write (.npz)")
    p.add_argument("--seq-length", type=int, help="window length (default: the model's seq_len)")
    p.add_argument("--stride", type=int, help="sliding-window stride for long documents (default: --seq-length)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--chunk-documents", type=int, default=1024, help="documents per resumable chunk")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", *sorted(DTYPES)), default="auto",
                   help="model dtype (auto: bfloat16 on CUDA, float32 on CPU); logits are float32")
    p.add_argument("--attention-backend", help="override the config's (sdpa, reference, triton, flex, flash)")
    add_tokenizer_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs / discard another run's parts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed's launcher
    return p.parse_args(argv)


def score(argv=None) -> dict:
    """Run the command line; returns the summary on rank 0 (None on the others). Bad input: ValueError."""
    from megagpt.convert.weights import build_gpt, read_model_weights
    from megagpt.selection.compat import check_tokenizer_fits
    from megagpt.selection.perplexity import ScoreSettings
    from megagpt.selection.score_run import ScoreOutputs, run_scoring
    from megagpt.selection.scores import dataset_record, open_dataset

    args = parse_args(argv)
    outputs = ScoreOutputs(Path(args.output))
    outputs.check_free(args.overwrite)
    dataset = open_dataset(args.data_path)
    with shard_session(args.device) as shard:
        started = time.time()
        weights = read_model_weights(args.load, args.model_config)
        tokenizer = tokenizer_from_flags(weights, args, required=False)
        tokenizer_check = check_tokenizer_fits(weights, dataset, tokenizer)
        seq_length = args.seq_length or weights.model_config.seq_len
        settings = ScoreSettings(seq_length, args.stride or seq_length, args.batch_size)
        dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if shard.device.type == "cuda" else "float32")
        model = build_gpt(weights, shard.device, DTYPES[dtype], args.attention_backend,
                          model_config=check_lengths(weights.model_config, [seq_length]))
        record = dataset_record(args.data_path, dataset)
        if shard.is_main:
            print(f"scoring {record['num_documents']:,} documents ({record['num_tokens']:,} tokens) of "
                  f"{args.data_path} with {weights.source}: {model.num_parameters():,} parameters, {dtype} on "
                  f"{shard.device}, {shard.world_size} rank(s)", flush=True)
        checkpoint = {"path": str(args.load), "source": weights.source, "dtype": dtype,
                      "attention_backend": model.config.attention_backend}
        summary = run_scoring(model, dataset, record, outputs, settings, checkpoint, args.chunk_documents, shard,
                              args.overwrite, progress=not args.quiet,
                              extra_meta={"tokenizer_check": tokenizer_check})
        if shard.is_main:
            q = summary.get("document_perplexity", {})
            print(f"scored {summary['scored_documents']:,} documents ({summary['unscored_documents']:,} too short "
                  f"to score), {summary['scored_tokens']:,} target tokens in {time.time() - started:.1f}s; corpus "
                  f"perplexity {summary['corpus_perplexity']}; per-document median {q.get('q50')}, "
                  f"q05 {q.get('q05')}, q95 {q.get('q95')}\nwrote {outputs.scores}, {outputs.summary.name}, "
                  f"{outputs.histogram.name}", flush=True)
    return summary


def main(argv=None) -> int:
    """``score`` with input errors printed as one line (exit status 1) instead of a traceback."""
    return run_command(score, argv)


if __name__ == "__main__":
    sys.exit(main())
