#!/usr/bin/env python
"""Influence scoring speed and memory: the projected, batched fast path against the per-document full-gradient loop.

Both score the same documents with the same model against the same averaged validation gradient, in one run:

  loop     what users' scripts do: for each document, ``loss.backward()`` of its mean loss, the full gradient of the
           covered matrices flattened, one dot product with the full validation gradient
  fast     ``megagpt.selection`` as tools/influence.py runs it: ``--batch-size`` documents per forward and backward to
           the activations, gradients projected LoGra-style (``--projection-dim`` per side), one dot product each

  forward  a bound, not a method: one batched forward of the same documents without gradients. Any influence
           method runs at least that, so ``loop / forward`` is the largest ratio any method could show on this
           device and model (on a compute-bound CPU it stays below 20x; see docs/influence.md)

Figures: documents/s and tokens/s of each, their ratio (the goal: fast >= 20x loop), the memory a projected
gradient takes per document and per batch (plus the batch's projected factors ``[batch, seq, k]`` per matrix),
and the disk per million documents of the score file (``tokens`` int64 and one float64 per column: ``influence``
and one ``influence_step<N>`` per checkpoint) and, for comparison, of keeping every projected gradient in fp16.
Timing: median of ``--repeats`` after a warm-up; on CUDA wall time (``time.perf_counter``) between
``torch.cuda.synchronize`` calls, on CPU the process's CPU time on one thread (``time.process_time``: shared
machines make wall time a measure of the neighbours). CPU figures are CPU figures: the JSON and the table say which device made them.

    python benchmarks/bench_influence.py                                  # GPU: a pythia-160m-shaped model
    python benchmarks/bench_influence.py --device cpu --preset tiny       # CPU: a quick, honest ratio
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megagpt.config import ModelConfig  # noqa: E402
from megagpt.model import GPT  # noqa: E402
from megagpt.selection.influence import (document_pieces, document_scores, stream_pieces,  # noqa: E402
                                         validation_sum)
from megagpt.selection.influence_reference import full_gradient  # noqa: E402
from megagpt.selection.projection import ProjectedGradients  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PRESETS = {  # pythia-160m's shape (GPT-NeoX: 12 layers, d 768, 12 heads, vocab 50k) and a CPU-sized one
    "pythia-160m": dict(vocab_size=50304, seq_len=512, d_model=768, num_layers=12, num_heads=12),
    "small": dict(vocab_size=8192, seq_len=256, d_model=256, num_layers=4, num_heads=4),
    "tiny": dict(vocab_size=512, seq_len=128, d_model=64, num_layers=2, num_heads=2),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_scores(model, documents, valid_vector: torch.Tensor) -> np.ndarray:
    """The per-document full-gradient loop (influence_reference.full_gradient in the model's dtype)."""
    pieces = document_pieces(documents, model.config.seq_len)
    by_doc: dict[int, list] = {}
    for piece in pieces:
        by_doc.setdefault(piece.example, []).append(piece)
    return np.array([float(full_gradient(model, by_doc[i]).to(valid_vector) @ valid_vector)
                     for i in range(len(documents))])


def _time(fn, repeats: int, device) -> float:
    # CPU: this process's CPU seconds on one thread (the machines here are shared: wall time measures the
    # neighbours); CUDA: wall time between synchronisations.
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = []
    for _ in range(repeats):
        _sync(device)
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU time is then the work itself, not threads waiting for each other
    torch.manual_seed(0)
    config = ModelConfig(**PRESETS[args.preset], make_vocab_size_divisible_by=64)
    model = GPT(config).to(device).eval()
    rng = np.random.default_rng(0)
    vocab = config.vocab_size
    documents = [rng.integers(0, vocab, args.doc_tokens) for _ in range(args.documents)]
    loop_docs = documents[:args.loop_documents]
    valid = rng.integers(0, vocab, config.seq_len * 4 + 1)
    projector = ProjectedGradients(model, args.projection_dim, seed=0)
    pieces = stream_pieces(valid, config.seq_len)
    projected_valid = validation_sum(projector, pieces, args.batch_size) / len(pieces)
    full_valid = torch.stack([full_gradient(model, [p]) for p in pieces]).mean(0).to(device)

    def fast():
        return document_scores(projector, documents, projected_valid, config.seq_len, args.batch_size)

    # the rows the fast path runs: each document's windows of seq_len inputs, right-padded per batch
    rows = [piece.tokens[:-1] for piece in document_pieces(documents, config.seq_len)]

    def forward():
        with torch.no_grad():
            for start in range(0, len(rows), args.batch_size):
                chunk = rows[start:start + args.batch_size]
                batch = np.zeros((len(chunk), max(len(r) for r in chunk)), dtype=np.int64)
                for i, r in enumerate(chunk):
                    batch[i, :len(r)] = r
                model(torch.as_tensor(batch, device=device))

    fast()  # warm-up
    fast_s = _time(fast, args.repeats, device)
    forward()  # warm-up
    forward_s = _time(forward, args.repeats, device)
    loop_scores(model, loop_docs[:1], full_valid)  # warm-up
    loop_s = _time(lambda: loop_scores(model, loop_docs, full_valid), args.repeats, device)
    fast_docs_s, loop_docs_s = len(documents) / fast_s, len(loop_docs) / loop_s
    k = args.projection_dim
    factor_bytes = sum(2 * args.batch_size * min(args.doc_tokens, config.seq_len) * k * 4 for _ in projector.blocks)
    per_doc = projector.bytes_per_row()
    checkpoints = 1
    return {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or "cpu", "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"preset": args.preset, **PRESETS[args.preset], "parameters": model.num_parameters()},
        "documents": len(documents), "loop_documents": len(loop_docs), "doc_tokens": args.doc_tokens,
        "batch_size": args.batch_size, "projection_dim": k, "matrices": len(projector.blocks),
        "fast": {"seconds": fast_s, "documents_per_s": fast_docs_s, "tokens_per_s": fast_docs_s * args.doc_tokens},
        "loop": {"seconds": loop_s, "documents_per_s": loop_docs_s, "tokens_per_s": loop_docs_s * args.doc_tokens},
        "forward_only": {"seconds": forward_s, "documents_per_s": len(documents) / forward_s},
        "speedup": fast_docs_s / loop_docs_s,
        "largest_possible_speedup": len(documents) / forward_s / loop_docs_s,
        "memory": {"projected_gradient_floats_per_document": projector.dim,
                   "projected_gradient_bytes_per_document_fp32": per_doc,
                   "projected_gradients_bytes_per_batch_fp32": per_doc * args.batch_size,
                   "projected_factors_bytes_per_batch_fp32": factor_bytes,
                   "full_gradient_bytes_per_document_fp32": int(full_valid.numel()) * 4},
        "disk_per_million_documents": {"score_file_bytes": 10**6 * 8 * (2 + checkpoints),
                                       "projected_gradients_fp16_bytes": 10**6 * projector.dim * 2},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model shape (default: pythia-160m on "
                   "CUDA, tiny on CPU)")
    p.add_argument("--documents", type=int, default=None, help="documents for the fast path")
    p.add_argument("--loop-documents", type=int, default=None, help="documents for the loop (it is slow)")
    p.add_argument("--doc-tokens", type=int, default=None, help="tokens per document (default: the model's seq_len)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--projection-dim", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", help="JSON file (default: benchmarks/results/influence_<device>.json)")
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.preset = args.preset or ("pythia-160m" if on_gpu else "tiny")
    args.documents = args.documents or (1024 if on_gpu else 64)
    args.loop_documents = args.loop_documents or (64 if on_gpu else 16)
    args.doc_tokens = args.doc_tokens or PRESETS[args.preset]["seq_len"]
    report = run(args)
    note = ("" if report["device"].startswith("cuda") else
            "CPU RUN: a CPU ratio of the same code on the same model; not a GPU figure. ")
    report["note"] = note + "fast = projected, batched; loop = per-document full gradients (same model, same run)"
    output = Path(args.output or REPO / "benchmarks" / "results" / f"influence_{report['device'].split(':')[0]}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".partial")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(output)
    fast, loop, mem = report["fast"], report["loop"], report["memory"]
    print(f"{report['note']}\nmodel {args.preset} ({report['model']['parameters']:,} parameters) on "
          f"{report['device_name']}, documents of {args.doc_tokens} tokens, batch {args.batch_size}, projection "
          f"{args.projection_dim} per side over {report['matrices']} matrices\n"
          f"  fast: {fast['documents_per_s']:10.2f} documents/s {fast['tokens_per_s']:12.0f} tokens/s\n"
          f"  loop: {loop['documents_per_s']:10.2f} documents/s {loop['tokens_per_s']:12.0f} tokens/s\n"
          f"  speedup {report['speedup']:.1f}x (goal >= 20x); a batched forward alone would be "
          f"{report['largest_possible_speedup']:.1f}x\n"
          f"  projected gradient: {mem['projected_gradient_bytes_per_document_fp32']:,} B/document, "
          f"{mem['projected_gradients_bytes_per_batch_fp32']:,} B/batch (+{mem['projected_factors_bytes_per_batch_fp32']:,}"
          f" B of factors); full gradient {mem['full_gradient_bytes_per_document_fp32']:,} B/document\n"
          f"  disk per million documents: score file {report['disk_per_million_documents']['score_file_bytes']:,} B "
          f"(1 checkpoint), fp16 projected gradients {report['disk_per_million_documents']['projected_gradients_fp16_bytes']:,} B"
          f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
