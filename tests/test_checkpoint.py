"""megagpt/checkpoint.py: `latest` is published last, pruning, RNG state round trip."""
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from megagpt.checkpoint import latest_tag, prune_checkpoints, rng_state, set_rng_state

REPO = Path(__file__).resolve().parent.parent


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


CRASH_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from megagpt.checkpoint import load_checkpoint, save_checkpoint
    from megagpt.config import Config
    from megagpt.engine import build_engine, init_distributed, launch_from_env

    save = Path(sys.argv[1])
    config = Config.from_dict({
        "model": {"vocab_size": 64, "seq_len": 16, "d_model": 16, "num_layers": 1, "num_heads": 2,
                  "make_vocab_size_divisible_by": 64},
        "data": {"data_path": ["unused"]}, "schedule": {"train_iters": 2},
        "batch": {"micro_batch": 2, "global_batch": 2},
        "parallel": {"zero_stage": 0, "precision": "fp32"}, "checkpoint": {"save": str(save)}})
    launch = launch_from_env("cpu")
    init_distributed(launch)
    engine = build_engine(config, launch)
    save_checkpoint(engine, save, 1, {"megagpt": {"step": 1}}, config, 0)
    step1 = {k: v.clone() for k, v in engine.module.state_dict().items()}
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    # crash in the middle of saving step 2: DeepSpeed has written its files, our RNG file cannot be written
    (save / "step2" / ".rng_rank0.pt.tmp").mkdir(parents=True)
    try:
        save_checkpoint(engine, save, 2, {"megagpt": {"step": 2}}, config, 0)
    except RuntimeError as err:  # torch.save cannot open a directory for writing
        assert "Is a directory" in str(err), err
        print("save of step2 crashed")
    assert (save / "latest").read_text() == "step1", (save / "latest").read_text()
    client = load_checkpoint(engine, save, 0)
    assert client["megagpt"]["step"] == 1, client
    assert all(torch.equal(step1[k], v) for k, v in engine.module.state_dict().items())
    print("resumed from step1")
""")


@pytest.mark.slow
def test_a_crash_during_save_leaves_latest_on_the_previous_whole_checkpoint(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29641")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "save")], env=env, capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "save of step2 crashed" in result.stdout and "resumed from step1" in result.stdout
