#!/usr/bin/env python
"""Scoring speed against training speed of the same model, in one run: tools/score_documents.py's goal is to score
tokens at least twice as fast as the model trains on them (``--min-ratio``, default 2).

Scoring: ``megagpt.selection.perplexity.score_document_range`` over a synthetic indexed dataset whose document
lengths are log-normal (median ``--doc-median`` tokens, some longer than a window: those are scored in sliding
windows), in chunks of ``--chunk-documents``; tokens/s counts every document token. Training (the peer): the same
GPT, same sequence length, ``--train-batch`` sequences per step, forward + loss + backward + AdamW step in plain
PyTorch (no DeepSpeed overhead, which can only make training slower: a conservative peer); tokens/s counts
``batch x seq_len`` per step. On CUDA both run in bfloat16 (scoring: bf16 weights; training: fp32 weights under
bf16 autocast, as mixed-precision training does), timed after warm-up with ``torch.cuda.synchronize``.
CPU figures check that it runs and give a CPU ratio: they are not GPU figures.

    python benchmarks/bench_selection.py                           # GPU: a GPT-2-small-like model
    python benchmarks/bench_selection.py --device cpu --preset tiny
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PRESETS = {  # model fields; the tiny one is for CPUs
    "gpt2-small": dict(vocab_size=50257, seq_len=1024, d_model=768, num_layers=12, num_heads=12),
    "small": dict(vocab_size=50257, seq_len=512, d_model=256, num_layers=4, num_heads=4),
    "tiny": dict(vocab_size=257, seq_len=128, d_model=64, num_layers=2, num_heads=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpt2-small on CUDA, small on CPU")
    p.add_argument("--documents", type=int, default=None, help="documents to score (default: ~8 windows' worth x 64)")
    p.add_argument("--doc-median", type=int, default=None, help="median document length (default: seq_len / 2)")
    p.add_argument("--batch-size", type=int, default=16, help="scoring windows per forward")
    p.add_argument("--train-batch", type=int, default=8, help="training sequences per step")
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    p.add_argument("--chunk-documents", type=int, default=256)
    p.add_argument("--min-ratio", type=float, default=2.0, help="exit status 1 below this scoring/training ratio")
    p.add_argument("--output", help="JSON results (default: benchmarks/results/selection_<device>.json)")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_tokens_per_s(config, device, batch: int, steps: int) -> float:
    """forward + loss + backward + AdamW step tokens/s of a fresh GPT(config)."""
    from megagpt.model import GPT

    torch.manual_seed(0)
    model = GPT(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = model.loss(model(data[:, :-1]), data[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * config.seq_len * steps / (time.perf_counter() - started)


def scoring_tokens_per_s(config, device, dtype, prefix: str, args) -> tuple[float, int]:
    """Document tokens/s of score_document_range over the dataset ``prefix`` (one warm-up chunk untimed)."""
    from megagpt.data.indexed import IndexedDataset
    from megagpt.model import GPT
    from megagpt.selection.perplexity import ScoreSettings, document_lengths, score_document_range

    torch.manual_seed(0)
    model = GPT(config).to(device=device, dtype=dtype).eval()
    data = IndexedDataset(prefix)
    settings = ScoreSettings(config.seq_len, config.seq_len, args.batch_size)
    score_document_range(model, data, 0, min(args.chunk_documents, data.num_documents) // 4 or 1, settings)
    _sync(device)
    started = time.perf_counter()
    for begin in range(0, data.num_documents, args.chunk_documents):
        score_document_range(model, data, begin, min(begin + args.chunk_documents, data.num_documents), settings)
    _sync(device)
    tokens = int(document_lengths(data).sum())
    return tokens / (time.perf_counter() - started), tokens


def main(argv=None) -> int:
    from megagpt.config import ModelConfig
    from megagpt.data.indexed import IndexedDatasetWriter

    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    preset = args.preset or ("gpt2-small" if device.type == "cuda" else "small")
    config = ModelConfig(**PRESETS[preset])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    median = args.doc_median or config.seq_len // 2
    documents = args.documents or 64 * max(1, 8 * config.seq_len // median)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(median), 0.8, documents).astype(np.int64), 2, 8 * config.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "docs")
        with IndexedDatasetWriter(prefix, dtype=np.int32) as writer:
            writer.add_documents(rng.integers(0, config.vocab_size, int(lengths.sum())), lengths)
        score_rate, tokens = scoring_tokens_per_s(config, device, dtype, prefix, args)
    train_rate = training_tokens_per_s(config, device, args.train_batch, args.train_steps)
    ratio = score_rate / train_rate
    report = {
        "benchmark": "selection", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})", "device_type": device.type,
        "torch": torch.__version__, "preset": preset, "model": PRESETS[preset], "dtype": str(dtype),
        "documents": documents, "document_tokens": tokens, "doc_median": median, "batch_size": args.batch_size,
        "train_batch": args.train_batch, "scoring_tokens_per_s": score_rate, "training_tokens_per_s": train_rate,
        "ratio": ratio, "min_ratio": args.min_ratio, "passed": ratio >= args.min_ratio,
        "note": "CPU figures: NOT GPU figures" if device.type == "cpu" else "GPU figures",
    }
    output = Path(args.output or REPO / "benchmarks" / "results" / f"selection_{device.type}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".partial")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, output)
    print(f"{preset} on {report['device']} ({report['note']}): scoring {score_rate:,.0f} tok/s, training "
          f"{train_rate:,.0f} tok/s, ratio {ratio:.2f} (goal >= {args.min_ratio}) -> "
          f"{'ok' if report['passed'] else 'BELOW GOAL'}\nwrote {output}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
