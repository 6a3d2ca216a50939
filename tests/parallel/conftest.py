"""The one-rank reference run that every parallel layout must reproduce."""
import pytest

from testing_utils import STAGES, read_jsonl, run_training


@pytest.fixture(scope="module")
def one_rank(tiny_run):
    """Metrics of the 20-step fp32 run of the tiny config on one process, with the sequence-length stages."""
    root, config = tiny_run
    run_training("python", ["--config", str(config), *STAGES, "--save", str(root / "one_rank_ref")], 29730)
    return read_jsonl(root / "one_rank_ref" / "metrics.jsonl")
