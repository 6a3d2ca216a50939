"""Evaluation results out: the JSON file (written atomically), a printed table, and the context-length plot."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

# (column title, result key, format) of the printed table; a blank cell where a task has no such metric
TABLE_COLUMNS = (("task", "task", "{}"), ("seq_len", "seq_length", "{}"), ("n", None, "{}"),
                 ("loss", "loss", "{:.4f}"), ("ppl", "perplexity", None), ("acc", None, "{:.4f}"),
                 ("acc_norm", "acc_norm", "{:.4f}"), ("bpb", "bits_per_byte", "{:.4f}"),
                 ("bpc", "bits_per_char", "{:.4f}"))


def check_writable(path: str | Path, overwrite: bool, flag: str) -> Path:
    """Refuse an existing output unless ``overwrite`` (checked before the evaluation runs, and again at the end)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{flag} {path} already exists; pass --overwrite to replace it")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    return path


def _json_safe(value):
    """JSON has no inf/nan: write them as null (a perplexity that overflowed a float)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(report: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``report`` to ``path`` through a temporary file renamed at the end."""
    path = check_writable(path, overwrite, "--output")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_json_safe(report), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _cell(result: dict, title: str, key: str | None, fmt: str | None) -> str:
    if title == "n":
        value = result.get("tokens", result.get("examples"))
    elif title == "acc":
        value = result.get("accuracy", result.get("acc"))
    else:
        value = result.get(key)
    if value is None:
        return ""
    if fmt is None:  # perplexities of untrained models are huge: switch to exponent notation
        return f"{value:.3f}" if value < 1e5 else f"{value:.3e}"
    return fmt.format(value)


def format_table(results: list[dict]) -> str:
    """One row per task and sequence length; ``n`` is tokens for text/data tasks, examples otherwise."""
    rows = [[title for title, _, _ in TABLE_COLUMNS]]
    rows += [[_cell(r, title, key, fmt) for title, key, fmt in TABLE_COLUMNS] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_sweep(results: list[dict], path: str | Path, overwrite: bool = False) -> Path:
    """A PNG of each task's metrics against the sequence length: loss (nats per token; LAMBADA: per target
    token) on the left, accuracy (next token, LAMBADA, multiple-choice acc) on the right. Written atomically."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on evaluation machines
    import matplotlib.pyplot as plt

    path = check_writable(path, overwrite, "--plot")
    if path.suffix.lower() != ".png":
        raise ValueError(f"--plot {path} must end in .png")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for task in dict.fromkeys(r["task"] for r in results):
        rows = sorted((r for r in results if r["task"] == task), key=lambda r: r["seq_length"])
        lengths = [r["seq_length"] for r in rows]
        if all(r.get("loss") is not None for r in rows):
            ax_loss.plot(lengths, [r["loss"] for r in rows], "o-", label=task)
        accuracy = [r.get("accuracy", r.get("acc")) for r in rows]
        if all(a is not None for a in accuracy):
            ax_acc.plot(lengths, accuracy, "o-", label=task)
    lengths = sorted({r["seq_length"] for r in results})
    for ax, label in ((ax_loss, "loss (nats / token)"), (ax_acc, "accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])  # the lengths evaluated, not powers of two
        ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
