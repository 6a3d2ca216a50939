"""End-to-end trainer path: megagpt/pretrain.py on a tiny dataset (CPU, gloo), dry-run, config errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
import torch.distributed as dist

from megagpt.config import load_config, parameter_count
from megagpt.data.indexed import IndexedDatasetWriter
from megagpt.pretrain import main, memory_estimate

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = str(REPO / "megagpt" / "pretrain.py")
TRAIN_KEYS = {"step", "loss", "lr", "seq_len", "tokens", "tokens_per_sec", "grad_norm"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A learnable tiny dataset (documents counting up mod 60) and a config for a 2-layer, d_model 32 GPT."""
    root = tmp_path_factory.mktemp("tiny_run")
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(root / "counting") as writer:
        for _ in range(200):
            length, start = int(rng.integers(20, 80)), int(rng.integers(0, 60))
            writer.add_document((start + np.arange(length)) % 60)
    config = {
        "model": {"vocab_size": 64, "seq_len": 32, "d_model": 32, "num_layers": 2, "num_heads": 2,
                  "make_vocab_size_divisible_by": 64},
        "data": {"data_path": [str(root / "counting")], "split": "90,10,0", "num_workers": 0},
        "optimizer": {"kind": "adamw", "lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"train_iters": 20, "warmup_iters": 2},
        "batch": {"micro_batch": 4, "global_batch": 8},  # 2 micro batches: gradient accumulation runs
        "parallel": {"zero_stage": 0, "precision": "fp32"},
        "checkpoint": {"save_interval": 5, "keep_last": 2},
        "logging": {"log_interval": 1, "eval_interval": 10, "eval_iters": 2},
    }
    path = root / "tiny.json"
    path.write_text(json.dumps(config))
    return root, path


def run_pretrain(args, port, timeout=120):
    """``python megagpt/pretrain.py ARGS`` in a subprocess with one thread (exact float repeatability)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(port), MASTER_ADDR="127.0.0.1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, PRETRAIN, *args], env=env, capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"pretrain.py {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_train_then_resume_repeats_the_uninterrupted_run_bitwise(tiny_run):
    root, config = tiny_run
    whole, split = root / "whole", root / "split"
    run_pretrain(["--config", str(config), "--save", str(whole)], port=29631)

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
    loaded = run_pretrain(["--config", str(config), "--load", str(whole), "--save", str(root / "other")],
                          port=29634)
    assert f"resumed from {whole} at step 20" in loaded.stdout

    # stop at step 7 (checkpoint written), then re-run the same command: it resumes and finishes
    run_pretrain(["--config", str(config), "--save", str(split), "--exit-interval", "7"], port=29632)
    assert (split / "latest").read_text().strip() == "step7"
    resumed = run_pretrain(["--config", str(config), "--save", str(split)], port=29633)
    assert "resumed from" in resumed.stdout and "at step 7" in resumed.stdout
    split_records = read_jsonl(split / "metrics.jsonl")

    def numbers(recs):
        return [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "tokens", "valid_loss") if k in r}
                for r in recs]
    # exact equality of floats: the resumed run must repeat the uninterrupted one bit for bit
    assert numbers(split_records) == numbers(records)


def test_dry_run_prints_the_1b_plan_without_a_process_group(tiny_run, capsys):
    root, _ = tiny_run
    status = main(["--config", str(REPO / "configs" / "gpt1b.json"), "--dry-run",
                   "--data-path", str(root / "counting")])
    out = capsys.readouterr().out
    assert "MISSING" not in out
    assert status == 0
    assert not dist.is_initialized()
    expected = parameter_count(load_config(REPO / "configs" / "gpt1b.json").model)
    assert 0.95e9 < expected < 1.1e9
    assert f"parameters: {expected:,}" in out
    assert "tp 1 x pp 1 x dp 1" in out and "ZeRO stage 1" in out
    assert "memory per device" in out


def test_dry_run_plans_without_the_data_and_says_it_is_missing(capsys):
    status = main(["--config", str(REPO / "configs" / "gpt1b.json"), "--dry-run",
                   "--data-path", "/nonexistent/corpus"])
    out = capsys.readouterr().out
    assert status == 0 and not dist.is_initialized()
    assert "data: MISSING /nonexistent/corpus.bin, /nonexistent/corpus.idx" in out


@pytest.mark.parametrize("args, named", [
    (["--set", "model.num_heads=3"], "model.num_heads"),
    (["--set", "optimizer.lrr=1e-3"], "lrr"),
    (["--data-path", "/nonexistent/prefix"], "data.data_path"),
    (["--set", "batch.global_batch=6"], "batch.global_batch"),
])
def test_bad_config_fails_before_any_process_group_naming_the_field(tiny_run, capsys, args, named):
    _, config = tiny_run
    status = main(["--config", str(config), *args])
    err = capsys.readouterr().err
    assert status == 2
    assert named in err, err
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
    # dp=2: ZeRO-2 shards gradients and the fp32 master + Adam moments, not the bf16 weights
    assert memory_estimate(bf16, 2) == {"weights": 2 * n, "gradients": n, "optimizer": 12 * n / 2}


def launch(launcher, args, port, timeout=180):
    """Two CPU ranks of pretrain.py under ``deepspeed`` or ``torchrun``, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    if launcher == "deepspeed":
        command = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), PRETRAIN, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(port), PRETRAIN, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_two_ranks_zero1_bf16_8bit_with_seq_len_stages_resume_bitwise(tiny_run):
    """dp=2, ZeRO-1, bf16, AdamW8bit, seq-len stages 8 -> 16 -> 32: a run stopped at step 3 (inside the
    16 stage) and resumed under another launcher logs exactly the uninterrupted run's numbers."""
    root, config = tiny_run
    common = ["--config", str(config), "--train-iters", "6", "--set", "parallel.zero_stage=1",
              "--set", "parallel.precision=bf16", "--set", "optimizer.kind=adamw8bit",
              "--set", "schedule.seq_len_stages=[[8, 2], [16, 2]]", "--eval-interval", "3"]
    launch("deepspeed", [*common, "--save", str(root / "dp2_whole")], port=29651)
    launch("torchrun", [*common, "--save", str(root / "dp2_split"), "--exit-interval", "3"], port=29652)
    launch("torchrun", [*common, "--save", str(root / "dp2_split")], port=29653)
    whole, split = read_jsonl(root / "dp2_whole" / "metrics.jsonl"), read_jsonl(root / "dp2_split" / "metrics.jsonl")
    assert [r["seq_len"] for r in whole if "loss" in r] == [8, 8, 16, 16, 32, 32]

    def numbers(recs):
        return [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "tokens", "valid_loss") if k in r}
                for r in recs]
    assert numbers(split) == numbers(whole)
    assert sorted(os.listdir(root / "dp2_whole" / "step6")) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "config.json", "mp_rank_00_model_states.pt", "rng_rank0.pt", "rng_rank1.pt"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_step_reached_then_exits_cleanly(tiny_run):
    import signal
    import time

    root, config = tiny_run
    save = root / "sigterm"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT="29661", MASTER_ADDR="127.0.0.1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
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
