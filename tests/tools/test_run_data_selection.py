"""tools/run_data_selection.py end to end on the shipped Shakespeare text at a toy size: corpus -> train split and
pool -> reference model -> scores -> four subsets at one budget -> continual pretraining -> one comparison."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megagpt.data.indexed import IndexedDataset
from testing_utils import REPO, _clean_env

CONFIGS = REPO / "configs" / "experiments" / "data-selection"


def _toy_pipeline(tmp_path):
    """The shipped pipeline with its output in tmp_path, a 60-document pool and a 4-step reference model."""
    out = tmp_path / "out"
    reference = json.loads((CONFIGS / "reference.json").read_text())
    reference["schedule"] = {"train_iters": 4, "warmup_iters": 1}
    reference["checkpoint"]["save_interval"] = 4
    base = json.loads((CONFIGS / "base.json").read_text())
    base["checkpoint"]["init_from"] = str(out / "reference")
    experiment = json.loads((CONFIGS / "experiment.json").read_text())
    experiment["variants"] = {name: {"data_path": [str(out / "subsets" / name)]} for name in experiment["variants"]}
    experiment["eval"]["data_path"] = [str(out / "data" / "corpus_text_document")]
    experiment["eval"]["max_windows"] = 4
    pipeline = json.loads((CONFIGS / "pipeline.json").read_text())
    pipeline["corpus"]["input"] = str(REPO / pipeline["corpus"]["input"])
    pipeline.update(pool_documents=60, token_budget=2000, output=str(out))
    for name, spec in (("reference.json", reference), ("base.json", base), ("experiment.json", experiment),
                       ("pipeline.json", pipeline)):
        (tmp_path / name).write_text(json.dumps(spec))
    return tmp_path / "pipeline.json", out


@pytest.mark.slow
def test_one_command_runs_the_whole_experiment(tmp_path):
    pipeline, out = _toy_pipeline(tmp_path)
    env = _clean_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, str(REPO / "tools" / "run_data_selection.py"), "--pipeline", str(pipeline),
               "--device", "cpu", "--set", "schedule.train_iters=2", "--set", "schedule.warmup_iters=1",
               "--set", "checkpoint.save_interval=2", "--set", "logging.log_interval=1"]
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    budgets = {}
    for name in ("random", "low", "middle", "high"):
        subset = IndexedDataset(out / "subsets" / name)
        budgets[name] = subset.num_tokens
        assert 0 < subset.num_tokens <= 2000
        assert json.loads((out / "runs" / name / "eval.json").read_text())["results"][0]["perplexity"] > 1
    scores = np.load(out / "scores" / "pool.ppl.npz")
    low, high = (np.load(out / "subsets" / f"{n}.doc_ids.npy") for n in ("low", "high"))
    assert scores["perplexity"][low].max() <= scores["perplexity"][high].min()  # the bands do not overlap
    table = (out / "comparison_with_initial.md").read_text()
    assert all(name in table for name in ("initial (no training)", "random", "low", "middle", "high"))
    assert (out / "runs" / "comparison_loss.png").exists()
    # a second run skips every finished step
    again = subprocess.run(command + ["--prepare-only"], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "== score the pool" not in again.stdout and "== select" not in again.stdout
