"""The training loop's collectives on the training device (megagpt/training.py), checked without a GPU.

A process group started for CUDA ("nccl") registers no backend for CPU tensors, so a collective on a tensor
made without ``device=`` fails there (after step 1, at the first stop check) while gloo on CPU accepts it. On
CPU the two cannot be told apart by device, so the loop runs with torch's default device set to ``meta``: a
tensor created without an explicit device then lands on ``meta``, for which gloo has no backend either, just
as NCCL has none for the CPU. Every collective is also wrapped to record the device of what it is handed.
"""
import json
import textwrap

import pytest

from testing_utils import SCRIPT_PYTHONPATH, make_tiny_run, run_training

CONTRACT = textwrap.dedent("""
    import json, sys, torch
    import torch.distributed as dist
    from megagpt.config import load_config
    from megagpt.engine import build_engine, build_process_groups, init_distributed, launch_from_env
    from megagpt.training import train

    config = load_config(sys.argv[1], sys.argv[2:])
    launch = launch_from_env("cpu")
    init_distributed(launch)
    groups = build_process_groups(config, launch)
    engine = build_engine(config, launch, groups)
    seen = set()

    def recording(name, real):
        def collective(*args, **kwargs):
            tensor = args[0] if args else next(iter(kwargs.values()), None)
            for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
                if isinstance(t, torch.Tensor):
                    seen.add((name, str(t.device)))
            return real(*args, **kwargs)
        return collective

    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "reduce_scatter",
                 "reduce_scatter_tensor", "gather", "scatter", "all_to_all_single"):
        setattr(dist, name, recording(name, getattr(dist, name)))
    torch.set_default_device("meta")  # a tensor made without device= now has no backend, as CPU under nccl
    try:
        state = train(config, engine, launch, groups)
    finally:
        torch.set_default_device(None)
    # one file per rank: the ranks share torchrun's stdout, where their lines can interleave
    with open(f"{sys.argv[1]}.rank{launch.rank}.json", "w") as out:
        json.dump({"devices": sorted(seen), "steps": state.step}, out)
""")


@pytest.mark.slow
def test_every_collective_of_the_loop_gets_a_tensor_on_the_training_device(tmp_path):
    """Two ranks through log, eval, stop-check and checkpoint steps with ZeRO-0 fp32, where the loop computes the
    gradient norm itself (its all-reduce included): only training-device tensors reach a collective."""
    root, config = make_tiny_run(tmp_path)
    script = tmp_path / "contract.py"
    script.write_text(CONTRACT)
    result = run_training("torchrun", [str(config), "schedule.train_iters=4", "logging.eval_interval=2",
                                       "checkpoint.save_interval=2", f"checkpoint.save={root / 'save'}"],
                          29741, script=str(script), env={"PYTHONPATH": SCRIPT_PYTHONPATH})
    for rank in (0, 1):
        report = config.with_name(f"{config.name}.rank{rank}.json")
        assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
        found = json.loads(report.read_text())
        assert found["steps"] == 4
        recorded = [tuple(pair) for pair in found["devices"]]
        assert ("all_reduce", "cpu") in recorded, recorded  # the loss mean and stop check did run
        assert {device for _, device in recorded} == {"cpu"}, recorded
