"""megagpt/checkpoint.py: `latest` is published last, pruning, RNG state round trip."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megagpt.checkpoint import rng_state, set_rng_state
from megagpt.checkpoint_dir import latest_tag, prune_checkpoints


def make_steps(directory: Path, steps, latest):
    for step in steps:
        (directory / f"step{step}").mkdir(parents=True)
    (directory / "latest").write_text(f"step{latest}")


def test_prune_keeps_the_newest_by_step_number_not_by_name(tmp_path):
    make_steps(tmp_path, [5, 10, 15, 100], latest=100)
    (tmp_path / "notes").mkdir()  # not a checkpoint: left alone
    assert sorted(prune_checkpoints(tmp_path, keep_last=2)) == ["step10", "step5"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["notes", "step100", "step15"]


def test_prune_never_removes_the_checkpoint_latest_names(tmp_path):
    make_steps(tmp_path, [5, 10, 15], latest=5)  # e.g. a resumed run saved newer steps, then crashed
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step15", "step5"]


def test_prune_zero_keeps_all(tmp_path):
    make_steps(tmp_path, [1, 2, 3], latest=3)
    assert prune_checkpoints(tmp_path, keep_last=0) == []
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_latest_tag(tmp_path):
    assert latest_tag(tmp_path) is None
    make_steps(tmp_path, [4], latest=4)
    assert latest_tag(tmp_path) == "step4"
    (tmp_path / "latest").write_text("step9")
    with pytest.raises(ValueError, match="step9"):
        latest_tag(tmp_path)


def test_rng_state_round_trip():
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])
