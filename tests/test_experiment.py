"""megagpt/experiment.py and tools/run_data_experiment.py: a data experiment varies only the data."""
import json
import subprocess
import sys

import numpy as np
import pytest

from megagpt.experiment import comparison_table, load_experiment, variant_configs
from testing_utils import REPO, read_jsonl

RUN = str(REPO / "tools" / "run_data_experiment.py")
SHIPPED = REPO / "configs" / "experiments" / "shakespeare-vs-gcide" / "experiment.json"


def _experiment(root, variants, **extra):
    base = json.loads((REPO / "configs" / "experiments" / "shakespeare-vs-gcide" / "base.json").read_text())
    (root / "base.json").write_text(json.dumps(base))
    spec = {"base": "base.json", "variants": variants, "eval": {"text_file": ["held.txt"]}, **extra}
    (root / "experiment.json").write_text(json.dumps(spec))
    return root / "experiment.json"


def test_the_shipped_experiment_varies_only_the_data():
    experiment = load_experiment(SHIPPED)
    assert set(experiment.configs) == {"shakespeare", "gcide", "blend"}
    stripped = [{k: v for k, v in c.items() if k != "data"} for c in experiment.configs.values()]
    assert all(s == stripped[0] for s in stripped)
    assert len({json.dumps(c["data"]["data_path"]) for c in experiment.configs.values()}) == 3
    assert experiment.token_budget == 1000 * 32 * 256


def test_a_variant_that_changes_anything_but_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"variant 'big' sets \['d_model'\], which are not data fields"):
        load_experiment(_experiment(tmp_path, {"a": {"data_path": ["x"]}, "big": {"d_model": 512}}))
    with pytest.raises(ValueError, match="at least two variants"):
        load_experiment(_experiment(tmp_path, {"a": {"data_path": ["x"]}}))
    with pytest.raises(ValueError, match="sets a data field for every variant"):
        load_experiment(_experiment(tmp_path, {"a": {"data_path": ["x"]}, "b": {"data_path": ["y"]}},
                                    overrides=["data.split=1,1,1"]))
    with pytest.raises(ValueError, match=r"variant 'b': data.split"):
        variant_configs(json.loads((tmp_path / "base.json").read_text()),
                        {"a": {"data_path": ["x"]}, "b": {"data_path": ["y"], "split": "nonsense"}})
    # overrides apply to all variants alike
    experiment = load_experiment(_experiment(tmp_path, {"a": {"data_path": ["x"]}, "b": {"data_path": ["y"]}}),
                                 ["schedule.train_iters=100"])
    assert {c["schedule"]["train_iters"] for c in experiment.configs.values()} == {100}


def test_comparison_table_has_a_row_per_variant_and_a_column_per_heldout_set():
    record = lambda task, kind, value, length=256: {  # noqa: E731
        "task": task, "kind": kind, "seq_length": length, "perplexity": value, "bits_per_byte": value / 10}
    table = comparison_table({"a": [record("data:x:test", "data", 3.0), record("text:h.txt", "text", 20.0)],
                              "b": [record("data:x:test", "data", 4.5), record("text:h.txt", "text", 10.0)]})
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" variant ", " data:x:test ppl ", " text:h.txt bpb "]
    assert "| a       | 3.0000" in lines[2] and "2.0000" in lines[2] and "| b       | 4.5000" in lines[3]


@pytest.mark.slow
def test_two_variants_train_and_are_compared_on_the_same_heldout_sets(tmp_path):
    """Two tiny datasets (counting up vs counting down): each variant is best on its own held-out split, the
    runs differ only in their data, and the table, JSON and plot are written."""
    from megagpt.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    for name, sign in (("up", 1), ("down", -1)):
        with IndexedDatasetWriter(tmp_path / name) as writer:
            for _ in range(200):
                start = int(rng.integers(0, 60))
                writer.add_document((start + sign * np.arange(int(rng.integers(20, 80)))) % 60)
    base = {"model": {"vocab_size": 257, "seq_len": 32, "d_model": 32, "num_layers": 2, "num_heads": 2,
                      "make_vocab_size_divisible_by": 64},
            "data": {"data_path": ["unset"], "split": "80,10,10", "num_workers": 0},
            "tokenizer": {"type": "ByteLevelTokenizer"},
            "optimizer": {"kind": "adamw", "lr": 3e-3, "min_lr": 3e-4},
            "schedule": {"train_iters": 30, "warmup_iters": 2}, "batch": {"micro_batch": 8, "global_batch": 8},
            "parallel": {"zero_stage": 0, "precision": "fp32"}, "checkpoint": {"save_interval": 30},
            "logging": {"log_interval": 5, "eval_interval": 30, "eval_iters": 2}}
    (tmp_path / "base.json").write_text(json.dumps(base))
    spec = {"base": "base.json", "variants": {v: {"data_path": [str(tmp_path / v)]} for v in ("up", "down")},
            "eval": {"data_path": [str(tmp_path / "up"), str(tmp_path / "down")], "split": "80,10,10",
                     "split_name": "test"}}
    (tmp_path / "exp.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    command = [sys.executable, RUN, "--experiment", str(tmp_path / "exp.json"), "--output", str(out),
               "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    comparison = json.loads((out / "comparison.json").read_text())
    ppl = {v: {r["task"]: r["perplexity"] for r in records} for v, records in comparison["results"].items()}
    assert ppl["up"]["data:up:test"] < ppl["down"]["data:up:test"], ppl
    assert ppl["down"]["data:down:test"] < ppl["up"]["data:down:test"], ppl
    assert (out / "comparison_loss.png").stat().st_size > 0 and "| up " in (out / "comparison.md").read_text()
    configs = {v: json.loads((out / v / "config.json").read_text()) for v in ("up", "down")}
    assert {k: v for k, v in configs["up"].items() if k not in ("data", "checkpoint")} == \
           {k: v for k, v in configs["down"].items() if k not in ("data", "checkpoint")}
    tokens = {v: read_jsonl(out / v / "run" / "metrics.jsonl")[-1].get("tokens") for v in ("up", "down")}
    assert len(set(tokens.values())) == 1  # the same token budget
    again = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0 and again.stdout.count("already trained") == 2
