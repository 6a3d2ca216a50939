"""Stopping and resuming pretrain.py: SIGTERM, SIGKILL between checkpoints and during a save, another
data-parallel size. The resumed run must log what the uninterrupted one logged (bit for bit on CPU)."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from testing_utils import KILLING_PRETRAIN, PRETRAIN, REPO, _clean_env, logged_numbers, losses, read_jsonl, run_training

pytestmark = pytest.mark.slow
SIGKILLED = -signal.SIGKILL  # what subprocess reports for a process ended by SIGKILL


def killed_run(launcher, args, port, env):
    """Run the killing wrapper; it must die by SIGKILL (the launcher is killed with its ranks)."""
    result = run_training(launcher, args, port, script=KILLING_PRETRAIN, expect=None, env=env)
    assert result.returncode == SIGKILLED, (f"expected death by SIGKILL, got {result.returncode}:\n"
                                            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.mark.parametrize("launcher, extra", [
    ("python", []),
    ("deepspeed", ["--set", "parallel.zero_stage=1", "--set", "optimizer.kind=adamw8bit",
                   "--set", "schedule.seq_len_stages=[[8, 6], [16, 6]]"]),
], ids=["1rank-fp32-adamw", "2ranks-zero1-adamw8bit-seqlen-stages"])
def test_sigkill_between_checkpoints_then_the_same_command_repeats_every_logged_number(tiny_run, launcher, extra):
    """Checkpoints every 5 steps; SIGKILL after step 8 is logged (step 5 is the latest checkpoint); the same
    command again resumes from step 5 and logs exactly what the uninterrupted run logged. With the seq-len
    stages 8 (steps 1-6), 16 (7-12), 32: the resumed part crosses the 8 -> 16 boundary at step 7."""
    root, config = tiny_run
    name = f"sigkill_{launcher}"
    port = 29670 if launcher == "python" else 29672
    common = ["--config", str(config), *extra]
    run_training(launcher, [*common, "--save", str(root / f"{name}_whole")], port)
    save = root / f"{name}_split"
    killed_run(launcher, [*common, "--save", str(save)], port + 1, env={"MEGAGPT_TEST_KILL_AFTER_STEP": "8"})
    assert (save / "latest").read_text() == "step5"
    assert [r["step"] for r in read_jsonl(save / "metrics.jsonl") if "loss" in r] == list(range(1, 9))

    resumed = run_training(launcher, [*common, "--save", str(save)], port)
    assert "resumed from" in resumed.stdout and "at step 5" in resumed.stdout
    whole, split = read_jsonl(root / f"{name}_whole" / "metrics.jsonl"), read_jsonl(save / "metrics.jsonl")
    assert len(losses(whole)) == 20
    if extra:
        assert [r["seq_len"] for r in whole if "loss" in r] == [8] * 6 + [16] * 6 + [32] * 8
    assert logged_numbers(split) == logged_numbers(whole)


def test_a_save_killed_half_way_leaves_latest_on_the_previous_loadable_checkpoint(tiny_run):
    """SIGKILL while step 10's first file is half written: ``latest`` still names step 5, which loads; the
    same command again resumes there and logs exactly the uninterrupted run's numbers."""
    root, config = tiny_run
    common = ["--config", str(config), "--set", "parallel.zero_stage=1"]
    run_training("python", [*common, "--save", str(root / "halfsave_whole")], 29676)
    save = root / "halfsave_split"
    killed_run("python", [*common, "--save", str(save)], 29677, env={"MEGAGPT_TEST_KILL_IN_SAVE": "10"})
    assert (save / "latest").read_text() == "step5"
    partial = [p for p in (save / "step10").iterdir() if p.is_file()]
    assert len(partial) == 1, partial  # the kill came while the first file was being written
    resumed = run_training("python", [*common, "--save", str(save)], 29678)
    assert "at step 5" in resumed.stdout
    assert logged_numbers(read_jsonl(save / "metrics.jsonl")) == logged_numbers(
        read_jsonl(root / "halfsave_whole" / "metrics.jsonl"))
    assert (save / "latest").read_text() == "step20"


@pytest.mark.parametrize("first, then, extra, tolerance", [
    ("deepspeed", "python", ["--set", "parallel.zero_stage=1"], 1e-5),
    ("python", "deepspeed", ["--set", "parallel.zero_stage=2", "--set", "parallel.precision=bf16",
                             "--set", "optimizer.kind=adamw8bit"], 3e-3),
], ids=["dp2-to-dp1-zero1-fp32-adamw", "dp1-to-dp2-zero2-bf16-adamw8bit"])
def test_resume_with_another_data_parallel_size_continues_the_loss_curve(tiny_run, first, then, extra, tolerance):
    """A ZeRO checkpoint written by 2 data-parallel ranks resumes on 1 and vice versa (optimizer state
    resharded, 8-bit state too). fp32 AdamW continues within float-reordering noise; bf16 + 8-bit moments
    re-quantised over new block boundaries within a few 1e-3."""
    root, config = tiny_run
    name = f"dpchange_{first}_{then}"
    common = ["--config", str(config), "--train-iters", "10", *extra]
    run_training(first, [*common, "--save", str(root / f"{name}_whole")], 29680)
    run_training(first, [*common, "--save", str(root / f"{name}_split"), "--exit-interval", "5"], 29681)
    resumed = run_training(then, [*common, "--save", str(root / f"{name}_split")], 29682)
    assert "ZeRO optimizer state resharded" in resumed.stdout and "at step 5" in resumed.stdout
    whole = read_jsonl(root / f"{name}_whole" / "metrics.jsonl")
    split = read_jsonl(root / f"{name}_split" / "metrics.jsonl")
    assert [r["step"] for r in split] == [r["step"] for r in whole]
    np.testing.assert_allclose(losses(split), losses(whole), rtol=0, atol=tolerance)
    np.testing.assert_allclose(losses(split, "valid_loss"), losses(whole, "valid_loss"), rtol=0, atol=tolerance)
    assert losses(split)[:5] == losses(whole)[:5]  # before the change: the same run


def test_two_ranks_zero1_bf16_8bit_with_seq_len_stages_resume_bitwise(tiny_run):
    """dp=2, ZeRO-1, bf16, AdamW8bit, seq-len stages 8 -> 24 -> 32: a run stopped at step 3 (inside the
    24 stage, whose rows span samples and end in padding) and resumed under another launcher logs exactly the
    uninterrupted run's numbers."""
    root, config = tiny_run
    common = ["--config", str(config), "--train-iters", "6", "--set", "parallel.zero_stage=1",
              "--set", "parallel.precision=bf16", "--set", "optimizer.kind=adamw8bit",
              "--set", "schedule.seq_len_stages=[[8, 2], [24, 2]]", "--eval-interval", "3"]
    run_training("deepspeed", [*common, "--save", str(root / "dp2_whole")], port=29651)
    run_training("torchrun", [*common, "--save", str(root / "dp2_split"), "--exit-interval", "3"], port=29652)
    run_training("torchrun", [*common, "--save", str(root / "dp2_split")], port=29653)
    whole, split = read_jsonl(root / "dp2_whole" / "metrics.jsonl"), read_jsonl(root / "dp2_split" / "metrics.jsonl")
    assert [r["seq_len"] for r in whole if "loss" in r] == [8, 8, 24, 24, 32, 32]

    assert logged_numbers(split) == logged_numbers(whole)
    assert sorted(os.listdir(root / "dp2_whole" / "step6")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "config.json", "manifest.json", "mp_rank_00_model_states.pt", "rng_rank0.pt", "rng_rank1.pt"]


def test_sigterm_saves_a_checkpoint_at_the_step_reached_then_exits_cleanly(tiny_run):
    root, config = tiny_run
    save = root / "sigterm"
    env = _clean_env(MASTER_PORT="29661", MASTER_ADDR="127.0.0.1")
    process = subprocess.Popen([sys.executable, PRETRAIN, "--config", str(config), "--save", str(save),
                                "--train-iters", "5000", "--save-interval", "5000", "--eval-interval", "5000"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not ((save / "metrics.jsonl").exists() and (save / "metrics.jsonl").read_text().count("\n") >= 3):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no training steps logged within 60 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out[-2000:] + err[-2000:]
    last_step = read_jsonl(save / "metrics.jsonl")[-1]["step"]
    assert 3 <= last_step < 5000
    assert (save / "latest").read_text().strip() == f"step{last_step}"
    assert f"stopping at step {last_step}" in out


@pytest.mark.parametrize("damage", ["truncated"])  # a missing file: tests/test_checkpoint_dir.py (same path)
def test_a_damaged_newest_checkpoint_resumes_from_the_newest_intact_one(tiny_run, damage):
    """One file of step 10 truncated (a full disk) or gone (an interrupted copy). Before: the resume died in
    ``PytorchStreamReader failed reading zip archive``. Now: --strict-resume refuses naming the file; without it
    the run warns, resumes from step 5 and logs exactly what the uninterrupted run logged."""
    root, config = tiny_run
    save = root / f"damaged_{damage}"
    common = ["--config", str(config), "--save", str(save), "--train-iters", "10", "--set", "parallel.zero_stage=1"]
    run_training("python", common, 29690)
    whole = read_jsonl(save / "metrics.jsonl")
    victim = save / "step10" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "truncated":
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    else:
        victim.unlink()
    refused = run_training("python", [*common, "--strict-resume"], 29691, expect=2)
    assert f"{victim} is" in refused.stderr and "--strict-resume refuses" in refused.stderr
    resumed = run_training("python", common, 29692)
    assert f"WARNING: checkpoint {save / 'step10'} is damaged or incomplete: {victim} is" in resumed.stdout
    assert f"resuming from {save / 'step5'}" in resumed.stdout and "at step 5" in resumed.stdout
    assert logged_numbers(read_jsonl(save / "metrics.jsonl")) == logged_numbers(whole)
    assert (save / "latest").read_text() == "step10" and victim.stat().st_size > 0


SPIKE = ["--set", "stability.spike_recovery=true", "--set", "stability.spike_window=3", "--set",
         "stability.spike_std=3", "--set", "stability.spike_skip_batches=2"]


@pytest.mark.parametrize("kill", ["in_rollback", "after_rollback"])
def test_sigkill_during_or_after_a_spike_recovery_resumes_bitwise(tiny_run, kill):
    """A loss spike injected into the batch of step 8: the run rolls back to step 5 and never trains on the
    batches of steps 7-8. SIGKILLed while recording the recovery, or after step 12 (step 10 saved since), the
    same command again logs exactly what the uninterrupted run logged."""
    root, config = tiny_run
    common = ["--config", str(config), *SPIKE]
    fault = {"MEGAGPT_TEST_FAULT": "spike:0:8"}
    whole, split = root / f"spike_whole_{kill}", root / f"spike_split_{kill}"
    result = run_training("python", [*common, "--save", str(whole)], 29700, script=KILLING_PRETRAIN, env=fault)
    assert "loss spike at step 8" in result.stdout and f"rolling back to {whole}/step5" in result.stdout
    records = read_jsonl(whole / "metrics.jsonl")
    rollback = [r for r in records if "rollback" in r]
    assert [(r["step"], r["rollback"]["spike_step"], r["rollback"]["skipped_samples"]) for r in rollback] == [
        (5, 8, [6 * 8, 8 * 8])]  # the samples of steps 7 and 8 (global batch 8)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21)) and max(losses(records)) < 5

    env = dict(fault, **({"MEGAGPT_TEST_KILL_IN_ROLLBACK": "1"} if kill == "in_rollback" else
                         {"MEGAGPT_TEST_KILL_AFTER_STEP": "12"}))
    killed_run("python", [*common, "--save", str(split)], 29701, env=env)
    if kill == "after_rollback":
        assert (split / "latest").read_text() == "step10"
    resumed = run_training("python", [*common, "--save", str(split)], 29702, script=KILLING_PRETRAIN, env=fault)
    assert "loss spike" not in resumed.stdout  # the recorded recovery is not made again
    # the rollback record of metrics.jsonl is an event, not a number: killed before it was written, the resumed
    # run lacks it (recoveries.json has it)
    numbers = [logged_numbers([r for r in read_jsonl(path) if "rollback" not in r])
               for path in (split / "metrics.jsonl", whole / "metrics.jsonl")]
    assert numbers[0] == numbers[1]
    assert (split / "recoveries.json").read_text() == (whole / "recoveries.json").read_text()
