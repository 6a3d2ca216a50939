"""pretrain.py with pipeline parallelism (DeepSpeed PipelineModule built from the GPT's layer list): PP=2 and
TP=2 x PP=2 train the one-rank run's loss curve across a sequence-length stage, with activation
checkpointing too, and pipeline checkpoints resume exactly and with another data-parallel size."""
import numpy as np
import pytest

from testing_utils import (STAGES, assert_same_curve_as_one_rank, losses, read_jsonl,
                           run_training, stop_and_resume_same_and_doubled_dp)

pytestmark = pytest.mark.slow
PIPELINE = ["--set", "parallel.pp=2", "--set", "parallel.zero_stage=1"]


@pytest.mark.parametrize("ranks, extra", [
    (2, []),
    (2, ["--set", "parallel.activation_checkpointing=true", "--set", "parallel.pipeline_partition=type:Block"]),
    (4, ["--set", "parallel.tp=2"]),
], ids=["pp2", "pp2-activation-checkpointing-by-blocks", "tp2xpp2"])
def test_pipeline_gives_the_one_rank_fp32_loss_curve(tiny_run, one_rank, ranks, extra):
    root, config = tiny_run
    name = f"pp_{ranks}_{len(extra)}"
    result = run_training("deepspeed", ["--config", str(config), *STAGES, *PIPELINE, *extra, "--save", str(root / name)],
                          29750 + ranks + len(extra), ranks=ranks, timeout=300)
    assert f"started process group: world size {ranks}" in result.stdout
    run = read_jsonl(root / name / "metrics.jsonl")
    assert_same_curve_as_one_rank(run, one_rank)
    # DeepSpeed's pipeline checkpoint: a file per layer and tensor-parallel rank (embedding, 2 blocks, final
    # norm; the tied head is the embedding, saved once)
    tp = 2 if "parallel.tp=2" in extra else 1
    assert {p.name for p in (root / name / "step20").glob("layer_*-model_states.pt")} == {
        f"layer_{layer:02d}-model_{rank:02d}-model_states.pt" for layer in range(4) for rank in range(tp)}


def test_pipeline_resumes_bitwise_and_with_another_data_parallel_size(tiny_run):
    """PP=2, bf16, AdamW8bit, ZeRO-1 stopped at step 7: resumed as PP=2 it repeats the uninterrupted run exactly;
    resumed as PP=2 x DP=2 it continues within bf16 + 8-bit re-quantisation noise."""
    root, config = tiny_run
    common = ["--config", str(config), *STAGES, *PIPELINE, "--set", "parallel.precision=bf16",
              "--set", "optimizer.kind=adamw8bit", "--train-iters", "12"]
    whole, same, dp2 = stop_and_resume_same_and_doubled_dp(common, root, "pp", 29760)
    assert losses(same) == losses(whole) and losses(same, "valid_loss") == losses(whole, "valid_loss")
    assert losses(dp2)[:7] == losses(whole)[:7]
    np.testing.assert_allclose(losses(dp2), losses(whole), rtol=0, atol=1e-2)
