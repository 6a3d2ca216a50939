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


class FakeNode:
    """torch.cuda's RNG functions for a node with ``gpus`` visible devices, each with its own generator state."""

    def __init__(self, gpus: int):
        self.states = {i: torch.tensor([100 + i], dtype=torch.uint8) for i in range(gpus)}

    def get_rng_state(self, device="cuda"):
        return self.states[torch.device(device).index].clone()

    def set_rng_state(self, state, device="cuda"):
        index = torch.device(device).index
        if index not in self.states:
            raise RuntimeError(f"invalid device ordinal {index}")
        self.states[index] = state.clone()

    def everything(self, *args):
        raise AssertionError("touches every visible GPU")

    def install(self, monkeypatch):
        for name in ("get_rng_state", "set_rng_state"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        for name in ("get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, self.everything)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_cuda_rng_round_trip_keeps_the_rank_s_own_device_only(monkeypatch):
    node = FakeNode(gpus=8)
    node.install(monkeypatch)
    state = rng_state(torch.device("cuda", 5))
    assert torch.equal(state["cuda"], torch.tensor([105], dtype=torch.uint8))  # one generator: local rank 5's
    node.states[5] = torch.tensor([0], dtype=torch.uint8)
    set_rng_state(state, torch.device("cuda", 5))
    assert node.states[5].item() == 105 and all(node.states[i].item() == 100 + i for i in range(5))


def test_resume_with_fewer_gpus_per_node_restores_the_stream_on_the_rank_s_new_device(monkeypatch):
    """Saved by local rank 5 of an 8-GPU node; the same global rank resumes as local rank 1 of a 4-GPU node:
    its stream must land on its new device (cuda:1), other devices untouched."""
    FakeNode(gpus=8).install(monkeypatch)
    saved = rng_state(torch.device("cuda", 5))
    node = FakeNode(gpus=4)
    node.install(monkeypatch)
    set_rng_state(saved, torch.device("cuda", 1))
    assert [node.states[i].item() for i in range(4)] == [100, 105, 102, 103]


def test_rng_state_moves_between_cpu_and_gpu_runs(monkeypatch):
    cpu_state = rng_state(torch.device("cpu"))
    assert cpu_state["cuda"] is None
    node = FakeNode(gpus=2)
    node.install(monkeypatch)
    set_rng_state(cpu_state, torch.device("cuda", 0))  # a CPU checkpoint leaves the CUDA generator as seeded
    assert node.states[0].item() == 100
    set_rng_state(rng_state(torch.device("cuda", 1)), torch.device("cpu"))  # no CUDA generator on a CPU run
    with pytest.raises(ValueError, match="2 CUDA generators"):
        set_rng_state({**cpu_state, "cuda": [torch.zeros(1), torch.zeros(1)]}, torch.device("cuda", 0))
