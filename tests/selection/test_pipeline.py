"""The data-selection pipeline file: the shipped one is consistent with its experiment; bad files are refused."""
import json

import pytest

from megagpt.experiment import load_experiment
from megagpt.selection.pipeline import check_experiment, load_pipeline
from testing_utils import REPO

SHIPPED = REPO / "configs" / "experiments" / "data-selection" / "pipeline.json"


def test_shipped_pipeline_matches_its_experiment():
    pipeline = load_pipeline(SHIPPED)
    experiment = load_experiment(pipeline.experiment)
    check_experiment(pipeline, experiment)
    assert set(experiment.configs) == {"random", "low", "middle", "high", "influence"}
    assert pipeline.pool == "out/data-selection/data/pool" and pipeline.train == "out/data-selection/data/train"
    # the held-out split is the corpus's test split under the split the train documents came from
    assert experiment.eval["split"] == pipeline.spec["corpus"]["split"] and experiment.eval["split_name"] == "test"
    assert experiment.eval["data_path"] == [pipeline.corpus]


def _write(tmp_path, **changes):
    spec = json.loads(SHIPPED.read_text())
    spec.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del spec[key]
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"token_budget": 0}, "token_budget must be a positive integer"),
    ({"variants": {"random": ["--random"]}}, "at least two"),
    ({"corpus": {"input": "a.txt", "data_path": "b", "split": "90,5,5"}}, "one of 'input'"),
    ({"reference": {}}, "reference needs one of"),
    ({"pool_documents": -1}, "pool_documents must be a positive integer"),
    ({"typo": 1}, "unknown: \\['typo'\\]"),
    ({"output": None}, "missing 'output'"),
])
def test_bad_pipeline_files(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_pipeline(_write(tmp_path, **changes))


def test_experiment_must_train_on_the_pipelines_subsets(tmp_path):
    pipeline = load_pipeline(_write(tmp_path, output="out/elsewhere"))
    experiment = load_experiment(REPO / "configs" / "experiments" / "data-selection" / "experiment.json")
    with pytest.raises(ValueError, match="not its subset"):
        check_experiment(pipeline, experiment)


def test_variants_choose_their_score_file(tmp_path):
    pipeline = load_pipeline(SHIPPED)
    assert pipeline.variant_rule("influence") == ("influence", ["--keep", "high"])
    assert pipeline.variant_rule("low") == ("perplexity", ["--keep", "low"])
    assert pipeline.scores_for("influence").name == "pool.influence.npz"
    with pytest.raises(ValueError, match="variant 'x': give rule flags as a list"):
        load_pipeline(_write(tmp_path, variants={"random": ["--random"], "x": {"scores": "loss", "rule": []}}))
