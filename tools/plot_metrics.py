#!/usr/bin/env python
"""Draw loss (train and valid) against tokens and throughput against step from metrics.jsonl files.

    python tools/plot_metrics.py --metrics out/run/metrics.jsonl [--output plot.png] \
        [--compare out/other/metrics.jsonl ...] [--overwrite]

Each run is labelled by the folder holding its metrics file. Needs matplotlib (the "train" extra).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from megagpt.metrics import read_metrics


def _series(records: list[dict], x_key: str, y_key: str) -> tuple[list, list]:
    pairs = [(r[x_key], r[y_key]) for r in records if r.get(x_key) is not None and r.get(y_key) is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def _valid_tokens(train: list[dict], valid: list[dict]) -> list[dict]:
    """Give valid records without ``tokens`` the token count of the train record at or before their step."""
    filled = []
    for v in valid:
        if v.get("tokens") is None:
            before = [t["tokens"] for t in train if t["step"] <= v["step"] and t.get("tokens") is not None]
            v = dict(v, tokens=before[-1] if before else None)
        filled.append(v)
    return filled


def plot_metrics(paths: list[str | Path], output: str | Path, overwrite: bool = False,
                 labels: list[str] | None = None) -> Path:
    """Plot every metrics file in ``paths`` into one PNG at ``output`` (written atomically); return its path.
    ``labels``: one per path (default: the folder holding each file)."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ValueError(f"--output {output} must end in .png")
    if output.exists() and not overwrite:
        raise ValueError(f"{output} already exists; pass --overwrite to replace it")
    if not paths:
        raise ValueError("no metrics files given")
    fig, (ax_loss, ax_rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} metrics files")
    for index, path in enumerate(paths):
        records = read_metrics(path)
        train = [r for r in records if "loss" in r]
        if not train:
            raise ValueError(f"{path} holds no train records (lines with 'loss')")
        valid = _valid_tokens(train, [r for r in records if "valid_loss" in r])
        label = labels[index] if labels is not None else Path(path).resolve().parent.name
        line, = ax_loss.plot(*_series(train, "tokens", "loss"), label=f"{label} train")
        if valid:
            ax_loss.plot(*_series(valid, "tokens", "valid_loss"), "o--", color=line.get_color(),
                         label=f"{label} valid")
        ax_rate.plot(*_series(train, "step", "tokens_per_sec"), color=line.get_color(), label=label)
    ax_loss.set(xlabel="tokens", ylabel="loss", title="Loss")
    ax_rate.set(xlabel="step", ylabel="tokens/s", title="Throughput")
    for ax in (ax_loss, ax_rate):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=output.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on a user error, printed to stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", required=True, help="metrics.jsonl of the run to plot")
    parser.add_argument("--compare", nargs="*", default=[], help="more metrics.jsonl files on the same axes")
    parser.add_argument("--output", help="PNG to write (default: metrics.png beside --metrics)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    output = args.output or str(Path(args.metrics).parent / "metrics.png")
    try:
        written = plot_metrics([args.metrics, *args.compare], output, overwrite=args.overwrite)
    except ValueError as err:
        print(f"plot_metrics: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
