"""Data parallelism: one rank and two ranks under every ZeRO stage compute the same training run, and
config errors stop every rank of a launch before any process group starts."""
import numpy as np
import pytest

from testing_utils import losses, read_jsonl, run_training


@pytest.fixture(scope="module")
def one_rank_run(tiny_run):
    """The 20-step fp32 reference run on one process (global batch 8 = 2 micro batches of 4)."""
    root, config = tiny_run
    run_training("python", ["--config", str(config), "--save", str(root / "dp1")], 29710)
    return read_jsonl(root / "dp1" / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_data_parallel_ranks_give_the_one_rank_fp32_loss_curve(tiny_run, one_rank_run, stage):
    """2 ranks x 1 micro batch of 4 against 1 rank x 2 accumulated micro batches: the same samples, the
    same averaged gradients, so the same 20 losses, gradient norms and validation losses within 1e-4
    (sums in another order differ in the last bits)."""
    root, config = tiny_run
    save = root / f"dp2_zero{stage}"
    result = run_training("deepspeed", ["--config", str(config), "--save", str(save),
                                        "--set", f"parallel.zero_stage={stage}"], 29711 + stage)
    assert "started process group: world size 2, backend gloo" in result.stdout
    two = read_jsonl(save / "metrics.jsonl")
    assert len(losses(two)) == len(losses(one_rank_run)) == 20
    np.testing.assert_allclose(losses(two), losses(one_rank_run), rtol=0, atol=1e-4)
    np.testing.assert_allclose(losses(two, "grad_norm"), losses(one_rank_run, "grad_norm"), rtol=1e-4)
    np.testing.assert_allclose(losses(two, "valid_loss"), losses(one_rank_run, "valid_loss"), rtol=0, atol=1e-4)
    assert [r["tokens"] for r in two if "loss" in r] == [r["tokens"] for r in one_rank_run if "loss" in r]
    # the loss fell: a run that trains nothing would match too
    assert np.mean(losses(two)[-3:]) < 0.85 * losses(two)[0]


@pytest.mark.slow
@pytest.mark.parametrize("args, named", [
    (["--set", "model.d_modl=64"], "d_modl"),  # unknown field
    (["--set", "optimizer.lr=\"fast\""], "optimizer.lr"),  # wrong type
    (["--data-path", "/nonexistent/prefix"], "data.data_path"),  # missing data
    (["--set", "batch.global_batch=12"], "batch.global_batch"),  # 12 is not a multiple of 4 x 2 ranks
], ids=["unknown-field", "wrong-type", "missing-data", "batch-does-not-divide"])
def test_a_bad_config_stops_every_rank_of_a_launch_before_any_process_group(tiny_run, args, named):
    _, config = tiny_run
    result = run_training("deepspeed", ["--config", str(config), *args], 29720, expect=None, timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("config error:") == 1, output[-3000:]  # said once, by rank 0
    assert named in output, output[-3000:]
    assert "started process group" not in output
