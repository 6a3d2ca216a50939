"""megagpt/zero_checkpoint.py: ZeRO-1/2 optimizer state read into per-parameter tensors and written back into
an engine's slices. Same layout: the round trip must be exact (8-bit codes included); the change of
layout itself is checked by the loss curves in tests/test_resume.py."""
import textwrap

import pytest
import torch

from megagpt.zero_checkpoint import zero_shard_files
from testing_utils import SCRIPT_PYTHONPATH, run_training

ROUND_TRIP = textwrap.dedent("""
    import sys, torch
    import torch.distributed as dist
    from pathlib import Path
    from megagpt.checkpoint import save_checkpoint
    from megagpt.config import Config
    from megagpt.engine import build_engine, init_distributed, launch_from_env
    from megagpt.model import language_model_loss
    from megagpt.zero_checkpoint import load_zero_state, read_zero_state
    from testing_utils import assert_same_optimizer_state

    save, stage, precision, kind = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    config = Config.from_dict({
        "model": {"vocab_size": 512, "seq_len": 16, "d_model": 64, "num_layers": 2, "num_heads": 2,
                  "make_vocab_size_divisible_by": 64},
        "data": {"data_path": ["unused"]}, "schedule": {"train_iters": 3},
        "optimizer": {"kind": kind, "lr": 1e-2},
        "batch": {"micro_batch": 2, "global_batch": 4},
        "parallel": {"zero_stage": stage, "precision": precision}, "checkpoint": {"save": str(save)}})
    launch = launch_from_env("cpu")
    init_distributed(launch)
    trained = build_engine(config, launch)
    generator = torch.Generator().manual_seed(launch.rank)
    for _ in range(3):
        rows = torch.randint(0, 512, (2, 17), generator=generator)
        trained.backward(language_model_loss(trained(rows[:, :-1]), rows[:, 1:]))
        trained.step()
    save_checkpoint(trained, save, 3, {"megagpt": {}}, config, launch.rank)

    fresh = build_engine(config, launch)
    fresh.load_checkpoint(str(save), tag="step3", load_optimizer_states=False)
    load_zero_state(fresh, read_zero_state(save / "step3"))
    checked, dtypes = assert_same_optimizer_state(trained, fresh, stage)
    dtypes = sorted(dtypes)
    print(f"rank {launch.rank}: {checked} state tensors equal; state dtypes {dtypes}; "
          f"{type(trained.optimizer).__name__} accumulates {trained.get_data_types()[1]}", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision, kind, dtypes", [
    (1, "fp32", "adamw", None),
    (1, "bf16", "adamw8bit", "['torch.float32', 'torch.uint8']"),
    (2, "bf16", "adamw8bit", "['torch.float32', 'torch.uint8']"),
], ids=["zero1-fp32-adamw", "zero1-bf16-adamw8bit", "zero2-bf16-adamw8bit"])
def test_two_rank_zero_state_round_trips_exactly_through_per_parameter_tensors(tmp_path, stage, precision, kind,
                                                                               dtypes):
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)
    result = run_training("torchrun", [str(tmp_path / "save"), str(stage), precision, kind], 29691 + stage,
                          script=str(script), env={"PYTHONPATH": SCRIPT_PYTHONPATH})
    for rank in (0, 1):
        assert f"rank {rank}: " in result.stdout, result.stdout
    if dtypes:  # 8-bit moments for the matrices, 32-bit for the embedding group
        assert f"state dtypes {dtypes}" in result.stdout, result.stdout
    # gradients accumulate in fp32 (bf16 + ZeRO-1: DeepSpeed's BF16_Optimizer, whose layout is resharded too)
    optimizer = "BF16_Optimizer" if (stage, precision) == (1, "bf16") else "DeepSpeedZeroOptimizer"
    assert f"{optimizer} accumulates torch.float32" in result.stdout, result.stdout
    assert len(zero_shard_files(tmp_path / "save" / "step3")) == 2


def test_missing_shards_are_named(tmp_path):
    for rank in (0, 2):
        torch.save({}, tmp_path / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match=r"ranks \[0, 2\]; some are missing"):
        zero_shard_files(tmp_path)


@pytest.mark.parametrize("signed", [True, False])
def test_requantisation_matches_bitsandbytes_quantize_blockwise(signed):
    """With each element's own magnitude as its 'block maximum', the block maxima are bitsandbytes' own and
    the codes ``quantize_blockwise``'s (our reference), except where its CPU search does not return the
    nearest code: there ours is the nearer neighbour. Dequantising gives back ``code[q] * absmax``."""
    from megagpt.optim.bitsandbytes_import import import_bitsandbytes
    from megagpt.zero_checkpoint import _dequantize, _quantize

    F = import_bitsandbytes().functional

    generator = torch.Generator().manual_seed(int(signed))
    values = torch.randn(3 * 256 + 17, generator=generator) * torch.logspace(-6, 0, 3 * 256 + 17)
    values = values if signed else values.abs()
    code = F.create_dynamic_map(signed=signed)
    expected, state = F.quantize_blockwise(values, code=code, blocksize=256)
    ours, blocks = _quantize(values, values.abs(), code)
    assert torch.equal(blocks, state.absmax)
    differ = ours != expected
    assert differ.float().mean() < 0.03
    assert (ours.int() - expected.int())[differ].abs().max() <= 1
    normalized = values / blocks.repeat_interleave(256)[:values.numel()]
    assert torch.all((normalized - code[ours.long()]).abs() <= (normalized - code[expected.long()]).abs())
    back, _ = _dequantize({"state1": ours, "absmax1": blocks, "qmap1": code}, "1")
    assert torch.allclose(back, F.dequantize_blockwise(ours, absmax=blocks, code=code, blocksize=256))
