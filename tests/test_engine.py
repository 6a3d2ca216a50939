"""megagpt/engine.py: build_engine's parallel.activation_checkpointing and parallel.compile options."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megagpt.config import Config
from megagpt.engine import Launch, build_engine

REPO = Path(__file__).resolve().parent.parent


def tiny_config(**parallel) -> Config:
    return Config.from_dict({
        "model": {"vocab_size": 64, "seq_len": 16, "d_model": 32, "num_layers": 2, "num_heads": 2,
                  "make_vocab_size_divisible_by": 64},
        "data": {"data_path": ["unused"]}, "schedule": {"train_iters": 3},
        "batch": {"micro_batch": 2, "global_batch": 2},
        "parallel": {"zero_stage": 1, "precision": "fp32", **parallel}})


def test_compile_with_bf16_on_cpu_is_refused_before_anything_is_built():
    config = tiny_config(compile=True, precision="bf16")
    with pytest.raises(ValueError, match=r"parallel.compile=true with parallel.precision='bf16' on CPU"):
        build_engine(config, Launch(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def test_fp16_on_cpu_is_refused_before_anything_is_built():
    config = tiny_config(precision="fp16")
    with pytest.raises(ValueError, match=r"parallel.precision='fp16' on CPU: DeepSpeed's CPU accelerator"):
        build_engine(config, Launch(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


# Three engines in one process, each trained on the same 3 micro batches (the last one shorter, as the
# sequence-length warmup does, so the compiled model must also handle a new shape), then one eval forward.
# dropout is 0: Inductor draws dropout masks with its own RNG, so compiled and eager masks differ.
ENGINE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from torch._dynamo.utils import counters
    from megagpt.config import Config
    from megagpt.engine import build_engine, init_distributed, launch_from_env
    from megagpt.model import language_model_loss

    def config(**parallel):
        return Config.from_dict({
            "model": {"vocab_size": 64, "seq_len": 16, "d_model": 32, "num_layers": 2, "num_heads": 2,
                      "make_vocab_size_divisible_by": 64, "dropout": 0.0},
            "data": {"data_path": ["unused"]}, "schedule": {"train_iters": 3},
            "batch": {"micro_batch": 2, "global_batch": 2},
            "parallel": {"zero_stage": 1, "precision": "fp32", **parallel}})

    launch = launch_from_env("cpu")
    init_distributed(launch)
    plain_keys = None
    results = {}
    for name, parallel in (("eager", {}), ("compiled", {"compile": True}),
                           ("compiled_ckpt", {"compile": True, "activation_checkpointing": True})):
        counters.clear()
        engine = build_engine(config(**parallel), launch)
        keys = sorted(engine.module.state_dict())
        plain_keys = plain_keys or keys
        generator = torch.Generator().manual_seed(0)
        losses = []
        for length in (16, 16, 8):
            rows = torch.randint(0, 64, (2, length + 1), generator=generator)
            loss = language_model_loss(engine(rows[:, :-1]), rows[:, 1:])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        engine.eval()
        with torch.no_grad():
            losses.append(language_model_loss(engine(rows[:, :-1]), rows[:, 1:]).item())
        results[name] = {
            "losses": losses, "is_compiled": engine.is_compiled,
            # nn.Module.compile (what engine.compile calls) installs the compiled forward on the module itself
            "compiled_forward": engine.module._compiled_call_impl is not None,
            # breaks, and code Dynamo gave up on and ran eagerly (e.g. a side effect in a checkpointed block)
            "graph_breaks": sum(counters["graph_break"].values()) + sum(counters["unimplemented"].values()),
            "activation_checkpointing": engine.module.activation_checkpointing,
            "same_state_dict_keys": keys == plain_keys,
        }
    print("RESULTS " + json.dumps(results))
""")


@pytest.mark.slow
def test_compiled_engine_trains_like_the_eager_one(tmp_path):
    script = tmp_path / "engines.py"
    script.write_text(ENGINE_SCRIPT)
    # One thread: float results depend on the thread count. PYTHONPATH: this checkout's megagpt, whatever is
    # installed. A port of its own, so that it never meets another test's process group.
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29701",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    eager = results["eager"]
    assert not eager["is_compiled"] and not eager["compiled_forward"] and not eager["activation_checkpointing"]
    for name in ("compiled", "compiled_ckpt"):
        run = results[name]
        assert run["is_compiled"] and run["compiled_forward"], name
        assert run["graph_breaks"] == 0, name  # a break can make Dynamo run the whole forward eagerly
        assert run["same_state_dict_keys"], name  # checkpoints and generation see the plain model's keys
        assert run["activation_checkpointing"] == (name == "compiled_ckpt")
        assert run["losses"] == pytest.approx(eager["losses"], abs=1e-4, rel=0), (name, run, eager)


def test_ranks_come_from_torchrun_or_mpi_variables_and_default_to_one_process():
    from megagpt.engine import ranks_from_env

    assert ranks_from_env({}) == (0, 1, 0)
    assert ranks_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    openmpi = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5"}
    assert ranks_from_env(openmpi) == (5, 16, 5)
    assert ranks_from_env({**openmpi, "RANK": "0", "WORLD_SIZE": "2"}) == (0, 2, 0)  # the launcher's own first
    assert ranks_from_env({"PMI_RANK": "2", "PMI_SIZE": "4"}) == (2, 4, 0)
    assert ranks_from_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}) == (0, 1, 0)  # not a launch by itself


def test_each_rank_takes_its_own_gpu_or_the_one_a_per_task_binding_shows_it():
    from megagpt.engine import cuda_device_for

    assert cuda_device_for(3, 8, environ={}) == torch.device("cuda", 3)  # torchrun / deepspeed: the node's GPUs
    # Slurm --gpus-per-task=1: every task sees one GPU, whatever its local rank
    assert cuda_device_for(3, 1, environ={"CUDA_VISIBLE_DEVICES": "3"}) == torch.device("cuda", 0)
    assert cuda_device_for(0, 1, environ={"CUDA_VISIBLE_DEVICES": "0"}) == torch.device("cuda", 0)
    # more ranks than GPUs without a binding (deepspeed --num_gpus 2 on a one-GPU machine): said, not shared
    with pytest.raises(ValueError, match=r"local rank 1 but this process sees 1 GPU\(s\).*at most 1 rank"):
        cuda_device_for(1, 1, environ={})
    with pytest.raises(ValueError, match="local rank 5 but this process sees 4 GPU"):
        cuda_device_for(5, 4, environ={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})


def test_deepspeed_is_told_the_rank_s_device_instead_of_taking_cuda_local_rank():
    from megagpt.engine import deepspeed_device_args

    bound = Launch(rank=11, world_size=16, local_rank=3, device=torch.device("cuda", 0))  # per-task binding
    assert deepspeed_device_args(bound).device_rank == 0
    assert deepspeed_device_args(Launch(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))) is None


def test_one_process_rendezvous_takes_a_free_port_and_several_ranks_the_launchers_default():
    from megagpt.engine import rendezvous_env

    cpu = torch.device("cpu")
    one = {}
    rendezvous_env(Launch(rank=0, world_size=1, local_rank=0, device=cpu), environ=one)
    assert one["MASTER_PORT"] != "29500" and one["MASTER_ADDR"] == "127.0.0.1"  # two one-GPU runs must not meet
    assert (one["RANK"], one["WORLD_SIZE"], one["LOCAL_RANK"]) == ("0", "1", "0")
    with socket.socket() as sock:  # nobody listens there: the process group can bind it
        sock.bind(("127.0.0.1", int(one["MASTER_PORT"])))
    given = {"MASTER_PORT": "31234"}
    rendezvous_env(Launch(rank=0, world_size=1, local_rank=0, device=cpu), environ=given)
    assert given["MASTER_PORT"] == "31234"  # the launcher's (or the user's) port wins
    several = {}  # e.g. mpirun, which sets only its own variables: every rank must agree without talking
    rendezvous_env(Launch(rank=1, world_size=2, local_rank=1, device=cpu), environ=several)
    assert several["MASTER_PORT"] == "29500" and several["RANK"] == "1"
