"""megagpt/stability.py: a non-finite loss or gradient on any rank skips that step on every rank (weights,
optimizer state and schedules as they were); a divergence stops the run with nothing non-finite saved."""
import math

import pytest
import torch

from megagpt.checkpoint_dir import load_torch_file, step_tags
from testing_utils import REPO, read_jsonl, run_training

FAULTY_PRETRAIN = str(REPO / "tests" / "fault_pretrain.py")


def assert_same_tensors(a, b, where=""):
    """Every tensor of two nested dicts/lists equal (the same keys)."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")


def training_state(step_dir):
    """What a skipped step must leave as it was: weights, optimizer state (ZeRO shards or the whole state),
    the LR and sequence-length schedules."""
    states = load_torch_file(step_dir / "mp_rank_00_model_states.pt")
    shards = sorted(step_dir.glob("*optim_states.pt"))
    optimizer = [load_torch_file(p)["optimizer_state_dict"] for p in shards] or states["optimizer"]
    client = states["megagpt"]
    # a pipeline checkpoint keeps the weights in a file per layer
    layers = sorted(step_dir.glob("layer_*-model_states.pt"))
    module = {f"{p.name}/{k}": v for p in layers for k, v in load_torch_file(p).items()} or states["module"]
    return {"module": module, "optimizer": optimizer,
            "schedules": [client["lr_scheduler"], client["seq_len_warmup"]]}


@pytest.mark.slow
@pytest.mark.parametrize("launcher, fault, zero", [
    ("torchrun", "nan_loss:1:3", 0),  # NaN loss on rank 1 only, its gradients finite: the guard's loss check
    ("python", "nan_grad:0:3", 0),  # finite loss, NaN gradients, ZeRO-0: the guard's gradient check
    ("python", "nan_grad:0:3", 1),  # the same under ZeRO-1: DeepSpeed's partition check, counted by the guard
], ids=["nan-loss-one-of-two-ranks", "nan-grad-zero0", "nan-grad-zero1"])
def test_a_non_finite_step_is_skipped_on_every_rank(tiny_run, launcher, fault, zero):
    root, config = tiny_run
    save = root / f"fault_{fault.replace(':', '_')}_{launcher}_{zero}"
    result = run_training(launcher, ["--config", str(config), "--save", str(save), "--train-iters", "4",
                                     "--save-interval", "1", "--eval-interval", "100", "--set", "checkpoint.keep_last=0",
                                     "--set", f"parallel.zero_stage={zero}"],
                          port=29750 + zero + (launcher == "torchrun") * 2, script=FAULTY_PRETRAIN,
                          env={"MEGAGPT_TEST_FAULT": fault})
    assert "step 3 | SKIPPED" in result.stdout
    records = read_jsonl(save / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("skipped_step")] == [3]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r and r["step"] != 3)
    before, skipped, after = (training_state(save / f"step{s}") for s in (2, 3, 4))
    assert_same_tensors(skipped, before, "step3 vs step2")
    assert not all(torch.equal(a, b) for a, b in zip(after["module"].values(), skipped["module"].values()))
    assert step_tags(save) == ["step1", "step2", "step3", "step4"]


@pytest.mark.slow
def test_a_non_finite_loss_on_the_last_pipeline_stage_is_skipped_on_every_stage(tiny_run):
    """PP=2 (ZeRO-1, as pipelines always run): a NaN loss with finite gradients on the last stage. DeepSpeed's
    partition check sees finite gradients; the guard at the pipeline's optimizer-step instruction skips the step
    on both stages. Before: the step was applied and a NaN loss logged."""
    root, config = tiny_run
    save = root / "fault_pipeline_nan_loss"
    result = run_training("deepspeed", ["--config", str(config), "--save", str(save), "--train-iters", "4",
                                        "--save-interval", "1", "--eval-interval", "100",
                                        "--set", "checkpoint.keep_last=0", "--set", "parallel.pp=2",
                                        "--set", "parallel.zero_stage=1"],
                          port=29759, script=FAULTY_PRETRAIN, env={"MEGAGPT_TEST_FAULT": "nan_loss:1:3"}, timeout=300)
    assert "step 3 | SKIPPED" in result.stdout, result.stdout[-3000:]
    records = read_jsonl(save / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("skipped_step")] == [3]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r and r["step"] != 3)
    before, skipped, after = (training_state(save / f"step{s}") for s in (2, 3, 4))
    assert len(before["module"]) > 0 and any(k.startswith("layer_03") for k in before["module"])  # both stages
    assert_same_tensors(skipped, before, "step3 vs step2")
    assert not all(torch.equal(a, b) for a, b in zip(after["module"].values(), skipped["module"].values()))


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_the_good_checkpoints(tiny_run):
    """lr=1e4: the loss is NaN from step 2 on. Before: the run went on to step 40, exited 0, and keep_last=2
    rotated away every checkpoint taken before the divergence."""
    root, config = tiny_run
    save = root / "diverged"
    result = run_training("python", ["--config", str(config), "--save", str(save), "--train-iters", "40",
                                     "--set", "optimizer.lr=1e4", "--save-interval", "5"],
                          port=29756, expect=3)
    assert "training diverged" in result.stderr and "steps 2-6" in result.stderr
    assert f"Last good checkpoint: {save}/step5" in result.stderr
    assert step_tags(save) == ["step5"] and (save / "latest").read_text() == "step5"
    for tag in step_tags(save):
        weights = load_torch_file(save / tag / "mp_rank_00_model_states.pt")["module"]
        assert all(torch.isfinite(w).all() for w in weights.values()), tag
    assert [r["step"] for r in read_jsonl(save / "metrics.jsonl") if r.get("skipped_step")] == [2, 3, 4, 5, 6]


def test_spike_detector_by_deviations_and_by_ratio():
    from megagpt.stability import SpikeDetector
    by_std = SpikeDetector(window=4, std=3.0)
    for loss in (3.0, 3.2, 2.9, 3.1):
        assert not by_std.is_spike(10.0) or len(by_std.recent) == 4  # silent until the window is full
        by_std.add(loss)
    assert by_std.is_spike(3.39) and not by_std.is_spike(3.38)  # mean 3.05, deviation 0.112: limit 3.385
    by_ratio = SpikeDetector(window=2, std=0.0, ratio=1.5)
    by_ratio.add(2.0), by_ratio.add(2.0), by_ratio.add(4.0)  # the window keeps the last two
    assert by_ratio.recent == [2.0, 4.0] and by_ratio.is_spike(4.6) and not by_ratio.is_spike(4.4)
    again = SpikeDetector(window=2, std=0.0, ratio=1.5)
    again.load_state_dict(by_ratio.state_dict())
    assert again.recent == by_ratio.recent


def test_damaged_recoveries_file_is_named(tmp_path):
    from megagpt.stability import RECOVERIES, append_recovery, read_recoveries
    append_recovery(tmp_path, {"spike_step": 8, "loss": 9.0, "rolled_back_to": 5, "skipped_samples": [48, 64]})
    assert read_recoveries(tmp_path)[0]["skipped_samples"] == [48, 64]
    (tmp_path / RECOVERIES).write_text("[{}]")
    with pytest.raises(ValueError, match="recoveries.json is unreadable"):
        read_recoveries(tmp_path)
