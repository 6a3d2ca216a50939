"""A resumable, data-parallel scoring run: documents in fixed chunks, one file per chunk, a manifest, then one
score file.

The documents ``0 .. D-1`` are cut into chunks of ``chunk_documents``; chunk ``k`` belongs to rank
``k % world_size``. Each chunk is scored on its own (``score_document_range``: its result depends only on the
chunk and the settings) and written to ``{output}.parts/chunk_<begin>_<end>.npz`` under a temporary name renamed
when complete. ``{output}.parts/manifest.json`` records what is being scored (dataset record, checkpoint,
settings, chunk size); a re-run with the same manifest skips the chunks already there, whatever the number of
ranks, and a re-run with different ones is refused. When every chunk is there, rank 0 joins them into the score
file (``scores.write_scores``), the summary JSON and the histogram PNG, then removes the parts. So 1 rank, 2 ranks,
or an interrupted run resumed with another rank count all give the same file.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megagpt.data.indexed import IndexedDataset
from megagpt.evaluation.distributed import Shard
from megagpt.evaluation.report import write_json
from megagpt.selection.perplexity import (COLUMNS, ScoreSettings, document_lengths, plot_histogram,
                                          score_document_range, summarize)
from megagpt.selection.scores import FORMAT, DocumentScores, write_scores

MANIFEST = "manifest.json"


@dataclass
class ScoreOutputs:
    """The files a scoring run writes: the score file, its summary and histogram, and the work folder."""

    scores: Path

    @property
    def summary(self) -> Path:
        return self.scores.with_suffix(".summary.json")

    @property
    def histogram(self) -> Path:
        return self.scores.with_suffix(".hist.png")

    @property
    def parts(self) -> Path:
        return self.scores.with_name(self.scores.name + ".parts")

    def chunk(self, begin: int, end: int) -> Path:
        return self.parts / f"chunk_{begin:012d}_{end:012d}.npz"

    def check_free(self, overwrite: bool) -> None:
        """Refuse to start when a finished output exists (unless ``overwrite``)."""
        if self.scores.suffix != ".npz":
            raise ValueError(f"--output {self.scores} must end in .npz")
        for path in (self.scores, self.summary, self.histogram):
            if path.exists() and not overwrite:
                raise ValueError(f"{path} already exists; pass --overwrite to replace it")


def _barrier(shard: Shard) -> None:
    if shard.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _prepare_parts(outputs: ScoreOutputs, identity: dict, overwrite: bool, is_main: bool) -> int:
    """Create the work folder or check that the one there is for the same job; returns the chunks already done.
    Every rank checks (so a refusal stops all of them before any collective); rank 0 alone writes."""
    manifest = outputs.parts / MANIFEST
    if manifest.exists():
        previous = json.loads(manifest.read_text())
        if previous == identity:
            return len(list(outputs.parts.glob("chunk_*.npz")))
        if not overwrite:
            differ = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
            raise ValueError(f"{outputs.parts} holds a scoring run with other {differ} (manifest {manifest}); "
                             "pass --overwrite to discard it and start again, or re-run with its settings")
        if is_main:
            shutil.rmtree(outputs.parts)
    if is_main:
        outputs.parts.mkdir(parents=True, exist_ok=True)
        write_json(identity, manifest, overwrite=True)
    return 0


def _save_chunk(path: Path, columns: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.savez(f, **columns)
    tmp.replace(path)


def _join_chunks(outputs: ScoreOutputs, chunks: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    parts = {name: [] for name in COLUMNS}
    for begin, end in chunks:
        path = outputs.chunk(begin, end)
        if not path.exists():
            raise RuntimeError(f"{path} is missing after every rank finished: a rank failed; re-run to resume")
        with np.load(path, allow_pickle=False) as chunk:
            for name in COLUMNS:
                parts[name].append(chunk[name])
    return {name: np.concatenate(values) if values else np.zeros(0) for name, values in parts.items()}


def run_scoring(model: torch.nn.Module, dataset: IndexedDataset, record: dict, outputs: ScoreOutputs,
                settings: ScoreSettings, checkpoint: dict, chunk_documents: int = 1024, shard: Shard = Shard(),
                overwrite: bool = False, progress: bool = True, extra_meta: dict | None = None) -> dict:
    """Score every document of ``dataset`` (``record``: its ``dataset_record``) into ``outputs``; returns the
    summary on every rank. ``checkpoint`` identifies the model (it goes into the manifest and the score file)."""
    if chunk_documents < 1:
        raise ValueError(f"--chunk-documents must be >= 1, got {chunk_documents}")
    started = time.time()
    identity = {"format": FORMAT, "dataset": record, "checkpoint": checkpoint,
                "settings": dataclasses.asdict(settings), "chunk_documents": chunk_documents}
    done = _prepare_parts(outputs, identity, overwrite, shard.is_main)
    _barrier(shard)
    total = dataset.num_documents
    chunks = [(b, min(b + chunk_documents, total)) for b in range(0, total, chunk_documents)]
    mine = [c for k, c in enumerate(chunks) if k % shard.world_size == shard.rank and not outputs.chunk(*c).exists()]
    lengths = document_lengths(dataset)
    todo_tokens = int(sum(lengths[b:e].sum() for b, e in mine))
    if shard.is_main and done:
        print(f"resuming {outputs.parts}: {done} of {len(chunks)} chunks already scored", flush=True)
    bar = tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc=f"scoring (rank {shard.rank})",
               disable=not (progress and shard.is_main))
    scored_docs, tick = 0, time.time()
    for begin, end in mine:
        _save_chunk(outputs.chunk(begin, end), score_document_range(model, dataset, begin, end, settings))
        scored_docs += end - begin
        bar.update(int(lengths[begin:end].sum()))
        bar.set_postfix(docs_per_s=f"{scored_docs / max(time.time() - tick, 1e-9):.1f}")
    bar.close()
    seconds_scoring = time.time() - tick
    _barrier(shard)
    summary = None
    if shard.is_main:
        columns = _join_chunks(outputs, chunks)
        summary = {**summarize(columns), "seconds": round(time.time() - started, 3),
                   "this_run": {"documents": scored_docs, "tokens": todo_tokens, "ranks": shard.world_size,
                                "tokens_per_s_rank0": todo_tokens / seconds_scoring if seconds_scoring else None}}
        meta = {"dataset": record, "default_column": "perplexity", "kind": "perplexity", "checkpoint": checkpoint,
                "settings": dataclasses.asdict(settings), "summary": summary, **(extra_meta or {})}
        plot_histogram(columns, outputs.histogram, f"{Path(record['prefix']).name}: {checkpoint.get('path')}")
        write_json({**meta, "scores": str(outputs.scores)}, outputs.summary, overwrite=True)
        write_scores(outputs.scores, DocumentScores(columns, meta), overwrite=True)  # the finished mark: last
        shutil.rmtree(outputs.parts)
    _barrier(shard)
    return summary
