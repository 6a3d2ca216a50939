"""End-to-end trainer path: megagpt/pretrain.py on a tiny dataset (CPU, gloo), dry-run, config errors."""
import re
import subprocess
import sys

import numpy as np
import torch
import pytest
import torch.distributed as dist

from megagpt.config import load_config, parameter_count
from megagpt.pretrain import main, memory_estimate
from testing_utils import PRETRAIN, REPO, logged_numbers, read_jsonl, run_training

TRAIN_KEYS = {"step", "loss", "lr", "seq_len", "tokens", "tokens_per_sec", "grad_norm"}


@pytest.mark.slow
def test_train_then_resume_repeats_the_uninterrupted_run_bitwise(tiny_run):
    root, config = tiny_run
    whole, split = root / "whole", root / "split"
    run_training("python", ["--config", str(config), "--save", str(whole)], port=29631)

    records = read_jsonl(whole / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    assert all(TRAIN_KEYS <= set(r) for r in train)
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in train)
    assert [r["step"] for r in records if "valid_loss" in r] == [10, 20]
    # the counting data is learnable: the loss must fall well below its start (ln 64 ~ 4.16)
    first, last = train[0]["loss"], np.mean([r["loss"] for r in train[-3:]])
    assert last < 0.85 * first, (first, last)
    assert train[-1]["tokens"] == 20 * 8 * 32
    # keep_last=2 and `latest` names the final step; the resolved config sits beside each checkpoint
    assert (whole / "latest").read_text().strip() == "step20"
    assert sorted(p.name for p in whole.iterdir() if p.is_dir()) == ["step15", "step20"]
    assert load_config(whole / "step20" / "config.json").to_dict() == load_config(
        config, [f"checkpoint.save={whole}"]).to_dict()

    # generation reads the trained weights and the config saved beside them straight from the save directory
    from megagpt.generate import generate, load_model
    model = load_model(whole)
    assert model.config == load_config(whole / "step20" / "config.json").model
    saved = torch.load(whole / "step20" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert len(generate(model, [1, 2, 3], 5, temperature=0.0)[0]) == 5

    # --load starts a new run from another run's checkpoint (here the finished one: nothing left to train)
    loaded = run_training("python", ["--config", str(config), "--load", str(whole), "--save", str(root / "other")],
                          port=29634)
    assert f"resumed from {whole} at step 20" in loaded.stdout

    # stop at step 7 (checkpoint written), then re-run the same command: it resumes and finishes
    run_training("python", ["--config", str(config), "--save", str(split), "--exit-interval", "7"], port=29632)
    assert (split / "latest").read_text().strip() == "step7"
    resumed = run_training("python", ["--config", str(config), "--save", str(split)], port=29633)
    assert "resumed from" in resumed.stdout and "at step 7" in resumed.stdout
    split_records = read_jsonl(split / "metrics.jsonl")

    # exact equality of floats: the resumed run must repeat the uninterrupted one bit for bit
    assert logged_numbers(split_records) == logged_numbers(records)


@pytest.mark.parametrize("name, target", [("gpt1b", 1.0e9), ("gpt127", 127e6), ("gpt303", 303e6),
                                          ("gpt2-small", 124e6)])
def test_dry_run_prints_the_plan_and_parameter_count_without_a_process_group(tiny_run, capsys, name, target):
    root, _ = tiny_run
    status = main(["--config", str(REPO / "configs" / f"{name}.json"), "--dry-run",
                   "--data-path", str(root / "counting")])
    out = capsys.readouterr().out
    assert status == 0
    assert not dist.is_initialized()
    assert "MISSING" not in out
    printed = int(re.search(r"^parameters: ([\d,]+) \(", out, re.M).group(1).replace(",", ""))
    assert printed == parameter_count(load_config(REPO / "configs" / f"{name}.json").model)
    assert abs(printed / target - 1) <= 0.03, f"{name}: {printed:,} parameters, expected about {target:,.0f}"
    assert "tp 1 x pp 1 x dp 1" in out and "memory per device" in out
    assert out.startswith('{\n  "model": {')  # the resolved config comes first


def test_dry_run_plans_without_the_data_and_says_it_is_missing(capsys):
    status = main(["--config", str(REPO / "configs" / "gpt1b.json"), "--dry-run",
                   "--data-path", "/nonexistent/corpus"])
    out = capsys.readouterr().out
    assert status == 0 and not dist.is_initialized()
    assert "data: MISSING /nonexistent/corpus.bin, /nonexistent/corpus.idx" in out
    # the schedule summary: lengths per stage, the LR at the milestones, total tokens (megagpt/schedule_plan.py)
    assert "schedule: 51,000 steps x 524,288 tokens = 26,738,688,000 tokens" in out
    assert "rows of 192: steps 3,750-7,499 (3,750 steps, 2,816 rows per step, 16,384 padded positions" in out
    assert "step 45,899 (min_lr reached, 90 % of the tokens): 6e-05" in out


@pytest.mark.parametrize("args, named", [
    (["--set", "model.num_heads=3"], "model.num_heads"),
    (["--set", "optimizer.lrr=1e-3"], "lrr"),
    (["--data-path", "/nonexistent/prefix"], "data.data_path"),
    (["--set", "batch.global_batch=6"], "batch.global_batch"),
    # ids up to 59 with a 50-token model (padded to 64: the ids would even fit the embedding)
    (["--set", "model.vocab_size=50"], "token id 59"),
])
def test_bad_config_fails_before_any_process_group_naming_the_field(tiny_run, capsys, args, named):
    _, config = tiny_run
    status = main(["--config", str(config), *args])
    err = capsys.readouterr().err
    assert status == 2
    assert named in err, err
    assert not dist.is_initialized()


@pytest.mark.parametrize("tp", [1, 2])
def test_data_past_the_vocabulary_is_refused_before_any_process_group(tiny_run, tp):
    from megagpt.config import validate
    _, path = tiny_run
    config = load_config(path, ["model.vocab_size=50", f"parallel.tp={tp}"])
    with pytest.raises(ValueError, match=r"holds token id 59 .*model.vocab_size=50"):
        validate(config, world_size=2)
    assert not dist.is_initialized()


def test_bad_config_exits_nonzero_from_the_command_line(tiny_run):
    _, config = tiny_run
    result = subprocess.run([sys.executable, PRETRAIN, "--config", str(config), "--set", "parallel.zero_stage=5"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "parallel.zero_stage" in result.stderr


def test_memory_estimate_follows_precision_and_zero_stage(tiny_run):
    _, path = tiny_run
    fp32 = load_config(path)
    n = parameter_count(fp32.model)
    assert memory_estimate(fp32, 1) == {"weights": 4 * n, "gradients": 4 * n, "optimizer": 8 * n}
    bf16 = load_config(path, ["parallel.precision=bf16", "parallel.zero_stage=2"])
    # dp=2: ZeRO-2 shards gradients (accumulated in fp32) and the fp32 master + Adam moments, not the bf16 weights
    assert memory_estimate(bf16, 2) == {"weights": 2 * n, "gradients": 4 * n / 2, "optimizer": 12 * n / 2}
    bf16_zero1 = load_config(path, ["parallel.precision=bf16", "parallel.zero_stage=1"])
    assert memory_estimate(bf16_zero1, 2)["gradients"] == 4 * n  # BF16_Optimizer: fp32 gradients of every weight
