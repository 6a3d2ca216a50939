"""pretrain.py with tensor parallelism: TP=2 and TP=2 x DP=2 train the one-rank run's loss curve (ALiBi,
parallel residual, across a sequence-length stage), resume, and bad layouts stop before any rank starts."""
import numpy as np
import pytest

from testing_utils import (STAGES, assert_same_curve_as_one_rank, losses, read_jsonl,
                           run_training, stop_and_resume_same_and_doubled_dp)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ranks, extra", [
    (2, ["--set", "parallel.tp=2", "--set", "parallel.zero_stage=0"]),
    (2, ["--set", "parallel.tp=2", "--set", "parallel.zero_stage=1"]),
    (4, ["--set", "parallel.tp=2", "--set", "parallel.zero_stage=1"]),
], ids=["tp2-zero0", "tp2-zero1", "tp2xdp2-zero1"])
def test_tensor_parallel_gives_the_one_rank_fp32_loss_curve(tiny_run, one_rank, ranks, extra):
    root, config = tiny_run
    name = f"tp_{ranks}_{extra[-1][-1]}"
    result = run_training("deepspeed", ["--config", str(config), *STAGES, *extra, "--save", str(root / name)],
                          29731 + ranks + int(extra[-1][-1]), ranks=ranks, timeout=300)
    assert f"started process group: world size {ranks}" in result.stdout
    run = read_jsonl(root / name / "metrics.jsonl")
    assert_same_curve_as_one_rank(run, one_rank)
    assert np.mean(losses(run)[-3:]) < 0.85 * losses(run)[0]
    # every tensor-parallel rank wrote its own shard of the model
    assert {p.name for p in (root / name / "step20").glob("mp_rank_*_model_states.pt")} == {
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"}


def test_tensor_parallel_resumes_bitwise_and_with_another_data_parallel_size(tiny_run):
    """TP=2 AdamW8bit ZeRO-1 stopped at step 7: resumed as TP=2 it repeats the uninterrupted run exactly;
    resumed as TP=2 x DP=2 it continues within 8-bit re-quantisation noise; as TP=1 it is converted in memory."""
    root, config = tiny_run
    common = ["--config", str(config), *STAGES, "--set", "parallel.tp=2", "--set", "parallel.zero_stage=1",
              "--set", "optimizer.kind=adamw8bit", "--train-iters", "12"]
    whole, same, dp2 = stop_and_resume_same_and_doubled_dp(common, root, "tp", 29740)
    assert losses(same) == losses(whole) and losses(same, "grad_norm") == losses(whole, "grad_norm")
    assert losses(dp2)[:7] == losses(whole)[:7]
    np.testing.assert_allclose(losses(dp2), losses(whole), rtol=0, atol=5e-3)

    # another tensor-parallel size: consolidated in memory (megagpt/convert, tests/test_universal_checkpoint.py)
    converted = run_training("python", [*common, "--set", "parallel.tp=1", "--save", str(root / "tp_same")], 29744)
    assert "converted in memory on every rank (parallel.tp=2 -> 1)" in converted.stdout
    assert "at step 12" in converted.stdout


@pytest.mark.parametrize("args, named", [
    (["--set", "parallel.tp=2", "--set", "model.num_heads=1"], "does not divide model.num_heads=1"),
    (["--set", "parallel.pp=4"], "parallel.pp=4 is larger than model.num_layers=2"),
    (["--set", "parallel.pp=2", "--set", "parallel.zero_stage=2"], "parallel.zero_stage=2 with parallel.pp=2"),
    (["--set", "parallel.tp=2", "--set", "model.vocab_size=63", "--set", "model.make_vocab_size_divisible_by=63"],
     "parallel.tp=2 does not divide the padded vocabulary 63"),
], ids=["tp-vs-heads", "pp-vs-layers", "zero2-with-pp", "tp-vs-vocab"])
def test_invalid_layouts_stop_every_rank_before_the_process_group(tiny_run, args, named):
    _, config = tiny_run
    result = run_training("deepspeed", ["--config", str(config), *args], 29745, expect=None, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("config error:") == 1 and named in output, output[-3000:]
    assert "started process group" not in output
