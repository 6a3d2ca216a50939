"""Controlled data experiments: train one architecture on several datasets or blends, changing nothing but the data.

An experiment file (JSON; ``configs/experiments/``) names a base training config, the variants and the held-out
sets every variant is evaluated on::

    {"base": "base.json",                      # relative to the experiment file
     "overrides": ["schedule.train_iters=300"], # optional: applied to every variant alike
     "variants": {"shakespeare": {"data_path": ["data/a_text_document"]},
                  "blend":       {"data_path": ["0.5", "data/a_text_document", "0.5", "data/b_text_document"]}},
     "eval": {"data_path": ["data/a_text_document", "data/b_text_document"], "split": "98,1,1",
              "split_name": "test", "text_file": ["heldout.txt"], "seq_lengths": [256, 512]}}

A variant may set fields of the ``data`` section only (``data_path``, ``split``, ``seed``, ...): ``variant_configs``
refuses anything else, so model, optimizer, schedule, batch, seed, and hence the token budget
(``train_iters x global_batch x seq_len``) are the same by construction, not by convention. All variants share the
base config's tokenizer section, and the evaluation runs on the same held-out sets with the same settings.
tools/run_data_experiment.py trains, evaluates and prints ``comparison_table``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megagpt.config import Config, DataConfig
from megagpt.config._fields import read_json_file
from megagpt.config.tree import apply_overrides

EXPERIMENT_KEYS = ("base", "overrides", "variants", "eval", "description")
EVAL_KEYS = ("data_path", "split", "split_name", "text_file", "seq_lengths", "stride", "batch_size", "max_windows")


@dataclass
class Experiment:
    """A parsed experiment file: the variants' full configs (as dicts) and the evaluation settings."""

    path: Path
    configs: dict[str, dict]  # variant name -> resolved config dict
    eval: dict = field(default_factory=dict)
    description: str = ""

    @property
    def token_budget(self) -> int:
        """Training tokens per variant at the full sequence length (all variants share it)."""
        config = Config.from_dict(next(iter(self.configs.values())))
        return config.schedule.train_iters * config.tokens_per_step


def _check_eval(where: str, values: dict) -> dict:
    if not isinstance(values, dict):
        raise ValueError(f"{where}: 'eval' must be a JSON object, got {type(values).__name__}")
    unknown = sorted(set(values) - set(EVAL_KEYS))
    if unknown:
        raise ValueError(f"{where}: eval has unknown key(s) {unknown}; allowed: {list(EVAL_KEYS)}")
    if not values.get("data_path") and not values.get("text_file"):
        raise ValueError(f"{where}: eval needs held-out sets: 'data_path' (indexed datasets) and/or 'text_file'")
    for key in ("data_path", "text_file", "seq_lengths"):
        if key in values and not isinstance(values[key], list):
            raise ValueError(f"{where}: eval.{key} must be a list")
    return values


def load_experiment(path: str | Path, extra_overrides: list[str] = ()) -> Experiment:
    """Read and check an experiment file; ``extra_overrides`` (``--set``) apply to every variant alike."""
    path = Path(path)
    spec = read_json_file(path, "experiment file")
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: an experiment must be a JSON object")
    unknown = sorted(set(spec) - set(EXPERIMENT_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {list(EXPERIMENT_KEYS)}")
    for key in ("base", "variants", "eval"):
        if key not in spec:
            raise ValueError(f"{path}: missing {key!r}")
    variants = spec["variants"]
    if not isinstance(variants, dict) or len(variants) < 2:
        raise ValueError(f"{path}: 'variants' must name at least two variants (a comparison needs two)")
    base_path = (path.parent / spec["base"]).resolve()
    base = read_json_file(base_path, "base config")
    overrides = [*spec.get("overrides", []), *extra_overrides]
    for text in overrides:
        if text.split("=", 1)[0].strip().startswith("data."):
            raise ValueError(f"{path}: override {text!r} sets a data field for every variant; put data settings in "
                             "the base config or in the variants")
    try:
        base = apply_overrides(base, overrides)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    configs = variant_configs(base, variants, str(path))
    return Experiment(path, configs, _check_eval(str(path), spec["eval"]), spec.get("description", ""))


def variant_configs(base: dict, variants: dict[str, dict], where: str = "experiment") -> dict[str, dict]:
    """Each variant's full config: the base with the variant's ``data`` fields replaced. Refuses a variant that
    names anything but a data field (the one thing a data experiment may vary), and checks every result."""
    data_fields = {f for f in DataConfig.__dataclass_fields__}
    configs = {}
    for name, changes in variants.items():
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"{where}: variant name {name!r} must be letters, digits, '-', '_' or '.' (it names a "
                             "directory)")
        if not isinstance(changes, dict) or not changes:
            raise ValueError(f"{where}: variant {name!r} must be a non-empty object of data fields")
        other = sorted(set(changes) - data_fields)
        if other:
            raise ValueError(f"{where}: variant {name!r} sets {other}, which are not data fields: a data experiment "
                             f"varies only the data section ({sorted(data_fields)}); change the base config instead")
        config = json.loads(json.dumps(base))
        config["data"] = {**config.get("data", {}), **changes}
        try:
            Config.from_dict(config)
        except ValueError as err:
            raise ValueError(f"{where}: variant {name!r}: {err}") from None
        configs[name] = config
    return configs


def _metric_columns(records: list[dict]) -> list[tuple[str, str]]:
    """(task label, metric) columns: bits per byte for raw text, perplexity for indexed data."""
    columns = []
    for r in records:
        metric = "bits_per_byte" if r.get("kind") == "text" else "perplexity"
        label = r["task"] if len({x["seq_length"] for x in records}) == 1 else f"{r['task']}@{r['seq_length']}"
        if (label, metric) not in columns:
            columns.append((label, metric))
    return columns


def comparison_rows(results: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison: one row per variant, one column per held-out set (and length)."""
    first = next(iter(results.values()))
    columns = _metric_columns(first)
    header = ["variant"] + [f"{label} {'bpb' if metric == 'bits_per_byte' else 'ppl'}" for label, metric in columns]
    rows = []
    for variant, records in results.items():
        by_label = {}
        for r in records:
            label = r["task"] if len({x["seq_length"] for x in records}) == 1 else f"{r['task']}@{r['seq_length']}"
            by_label[label] = r
        rows.append([variant] + [f"{by_label[label][metric]:.4f}" if label in by_label else "-"
                                 for label, metric in columns])
    return header, rows


def comparison_table(results: dict[str, list[dict]]) -> str:
    """A Markdown table of ``results`` (variant -> the ``results`` records of tools/evaluate.py's JSON)."""
    header, rows = comparison_rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
