"""A resumable, data-parallel TracInCP run over a dataset's documents, written as a score file.

The chunk machinery is score_run.py's (the same ``<output>.parts/`` folder and manifest, chunk ``k`` on rank
``k % world_size``, files renamed when complete, a changed manifest refused), looped over checkpoints: one model
in memory at a time. Per checkpoint ``c``:

1. the averaged validation gradient: each rank sums its share of the validation windows, one all-reduce adds them;
   rank 0 saves it as ``ckpt<c>_valid.pt`` so that a resumed run reuses it;
2. every chunk of documents not yet done: ``ckpt<c>_chunk_<begin>_<end>.npz`` with the documents' dot products.

Rank 0 then writes the score file (``scores.write_scores``): ``tokens`` (scored targets), ``influence``
(``sum_c lr_c * dot_c``, the default column) and ``influence_step<N>`` (each checkpoint's ``dot_c``, unweighted),
the summary JSON and a histogram, and removes the parts. Any number of ranks, or a resumed run, gives the same
file, up to the summation order of the validation all-reduce (last bits).
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megagpt.convert.weights import build_gpt
from megagpt.evaluation.distributed import Shard
from megagpt.evaluation.runner import check_lengths
from megagpt.evaluation.report import write_json
from megagpt.selection.adam import adam_factors
from megagpt.selection.checkpoints import CheckpointRef, load_checkpoint
from megagpt.selection.influence import document_scores, stream_pieces, validation_sum
from megagpt.selection.perplexity import document_lengths, document_tokens
from megagpt.selection.projection import ProjectedGradients
from megagpt.selection.score_run import ScoreOutputs, _barrier, _prepare_parts, _save_chunk
from megagpt.selection.scores import FORMAT, DocumentScores, write_scores

DEFAULT_PROJECTION_DIM = 16  # per side: 256 numbers per matrix; Spearman >= 0.9 with the exact scores (tests)


@dataclass(frozen=True)
class InfluenceSettings:
    """How influence is computed (recorded in the manifest and the score file; a resumed run must match)."""

    seq_length: int
    batch_size: int = 16
    projection_dim: int | None = DEFAULT_PROJECTION_DIM  # None: full gradients (tiny models, checks)
    seed: int = 0  # of the random projections
    cosine: bool = False
    adam: bool = False
    max_valid_windows: int | None = None

    def __post_init__(self) -> None:
        for name in ("seq_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_valid_windows is not None and self.max_valid_windows < 1:
            raise ValueError(f"--max-valid-windows must be >= 1, got {self.max_valid_windows}")


def _all_reduce(tensor: torch.Tensor, shard: Shard) -> torch.Tensor:
    if shard.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _validation_gradient(projector, pieces, settings: InfluenceSettings, shard: Shard, path: Path) -> torch.Tensor:
    """The averaged validation gradient of this checkpoint: read from ``path`` when a previous run saved it."""
    device = next(projector.model.parameters()).device
    if path.exists():
        return torch.load(path, map_location=device, weights_only=True)
    mine = [pieces[i] for i in shard.mine(len(pieces))]
    total = _all_reduce(validation_sum(projector, mine, settings.batch_size, settings.cosine).to(shard.device), shard)
    mean = (total / len(pieces)).to(device)
    if shard.is_main:
        tmp = path.with_name(path.name + ".partial")
        torch.save(mean.cpu(), tmp)
        tmp.replace(path)
    return mean


def _score_checkpoint(index: int, ref: CheckpointRef, dataset, valid_tokens: np.ndarray, chunks, outputs,
                      settings: InfluenceSettings, shard: Shard, dtype: torch.dtype, lengths, progress: bool) -> dict:
    """Step 1 and 2 of the module docstring for checkpoint ``index``; returns its lr and this rank's timing."""
    loaded = load_checkpoint(ref, with_moments=settings.adam)
    model = build_gpt(loaded.weights, shard.device, dtype,  # eval mode: no dropout
                      model_config=check_lengths(loaded.weights.model_config, [settings.seq_length]))
    valid_projector = ProjectedGradients(model, settings.projection_dim, settings.seed)
    train_projector = valid_projector
    if settings.adam:
        optimizer = loaded.weights.config.get("optimizer", {})
        factors = adam_factors(valid_projector.blocks, loaded.moments, loaded.optimizer_step,
                               float(optimizer.get("betas", (0.9, 0.95))[1]), float(optimizer.get("eps", 1e-8)),
                               source=ref.path)
        train_projector = ProjectedGradients(model, settings.projection_dim, settings.seed, factors)
    pieces = stream_pieces(valid_tokens, settings.seq_length, settings.max_valid_windows)
    validation = _validation_gradient(valid_projector, pieces, settings, shard, outputs.parts / f"ckpt{index}_valid.pt")
    mine = [c for k, c in enumerate(chunks) if k % shard.world_size == shard.rank
            and not (outputs.parts / f"ckpt{index}_chunk_{c[0]:012d}_{c[1]:012d}.npz").exists()]
    bar = tqdm(total=len(mine), unit="chunk", desc=f"step {ref.step} (rank {shard.rank})",
               disable=not (progress and shard.is_main))
    started, docs, tokens = time.time(), 0, 0
    for begin, end in mine:
        documents = [document_tokens(dataset, d) for d in range(begin, end)]
        scores = document_scores(train_projector, documents, validation, settings.seq_length, settings.batch_size,
                                 settings.cosine)
        _save_chunk(outputs.parts / f"ckpt{index}_chunk_{begin:012d}_{end:012d}.npz", {"dot": scores})
        docs, tokens = docs + end - begin, tokens + int(lengths[begin:end].sum())
        bar.update(1)
        bar.set_postfix(docs_per_s=f"{docs / max(time.time() - started, 1e-9):.1f}")
    bar.close()
    return {"step": ref.step, "lr": loaded.lr, "path": ref.path, "documents": docs, "tokens": tokens,
            "seconds": time.time() - started, "gradient_dim": train_projector.dim,
            "bytes_per_document": train_projector.bytes_per_row()}


def _join(outputs: ScoreOutputs, refs: list[CheckpointRef], chunks, lrs: list[float]) -> dict[str, np.ndarray]:
    columns = {}
    for index, ref in enumerate(refs):
        parts = []
        for begin, end in chunks:
            path = outputs.parts / f"ckpt{index}_chunk_{begin:012d}_{end:012d}.npz"
            if not path.exists():
                raise RuntimeError(f"{path} is missing after every rank finished: a rank failed; re-run to resume")
            with np.load(path, allow_pickle=False) as chunk:
                parts.append(chunk["dot"])
        columns[f"influence_step{ref.step}"] = np.concatenate(parts) if parts else np.zeros(0)
    columns["influence"] = sum(lr * columns[f"influence_step{r.step}"] for lr, r in zip(lrs, refs))
    return columns


def summarize_influence(columns: dict[str, np.ndarray]) -> dict:
    """Counts and quantiles of the ``influence`` column."""
    values = columns["influence"]
    scored = np.isfinite(values)
    summary = {"documents": int(len(values)), "scored_documents": int(scored.sum()),
               "unscored_documents": int((~scored).sum()), "scored_tokens": int(columns["tokens"].sum())}
    if scored.any():
        quantiles = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
        summary["influence"] = {f"q{round(q * 100):02d}": float(np.quantile(values[scored], q)) for q in quantiles}
        summary["influence"]["positive_fraction"] = float((values[scored] > 0).mean())
    return summary


def plot_influence(values: np.ndarray, path: Path, title: str) -> None:
    """A PNG histogram of the documents' influence."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = values[np.isfinite(values)]
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(values):
        ax.hist(values, bins=min(80, max(10, len(values) // 20)), color="tab:green", alpha=0.8)
        ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel("TracIn influence on the validation set (higher: helps it more)")
    ax.set_ylabel("documents")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_influence(refs: list[CheckpointRef], dataset, record: dict, validation, outputs: ScoreOutputs,
                  settings: InfluenceSettings, chunk_documents: int = 1024, shard: Shard = Shard(),
                  dtype: torch.dtype = torch.float32, overwrite: bool = False, progress: bool = True,
                  extra_meta: dict | None = None) -> dict | None:
    """Score every document of ``dataset`` into ``outputs``; returns the summary on rank 0 (None elsewhere)."""
    if chunk_documents < 1:
        raise ValueError(f"--chunk-documents must be >= 1, got {chunk_documents}")
    started = time.time()
    identity = {"format": FORMAT, "kind": "influence", "dataset": record, "validation": validation.record,
                "checkpoints": [{"path": r.path, "step": r.step} for r in refs],
                "settings": dataclasses.asdict(settings), "chunk_documents": chunk_documents}
    _prepare_parts(outputs, identity, overwrite, shard.is_main)  # every rank checks, rank 0 writes
    _barrier(shard)
    total = dataset.num_documents
    chunks = [(b, min(b + chunk_documents, total)) for b in range(0, total, chunk_documents)]
    lengths = document_lengths(dataset)
    runs = []
    for index, ref in enumerate(refs):
        runs.append(_score_checkpoint(index, ref, dataset, validation.tokens, chunks, outputs, settings, shard, dtype,
                                      lengths, progress))
        _barrier(shard)
    if not shard.is_main:
        _barrier(shard)
        return None
    lrs = [run["lr"] for run in runs]
    columns = {"tokens": np.maximum(lengths - 1, 0).astype(np.int64), **_join(outputs, refs, chunks, lrs)}
    summary = {**summarize_influence(columns), "seconds": round(time.time() - started, 3), "ranks": shard.world_size,
               "checkpoints": [{k: run[k] for k in ("step", "lr", "path")} for run in runs],
               "gradient_dim": runs[0]["gradient_dim"], "bytes_per_document": runs[0]["bytes_per_document"],
               "this_run_rank0": [{k: run[k] for k in ("step", "documents", "tokens", "seconds")} for run in runs]}
    meta = {"dataset": record, "default_column": "influence", "kind": "influence", "validation": validation.record,
            "checkpoints": summary["checkpoints"], "settings": dataclasses.asdict(settings), "summary": summary,
            **(extra_meta or {})}
    plot_influence(columns["influence"], outputs.histogram, f"{Path(record['prefix']).name}: influence")
    write_json({**meta, "scores": str(outputs.scores)}, outputs.summary, overwrite=True)
    write_scores(outputs.scores, DocumentScores(columns, meta), overwrite=True)  # the finished mark: last
    shutil.rmtree(outputs.parts)
    _barrier(shard)
    return summary


__all__ = ["DEFAULT_PROJECTION_DIM", "InfluenceSettings", "run_influence", "summarize_influence"]
