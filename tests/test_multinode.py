"""Multinode launches (docs/multinode.md) with two "nodes" on this machine: two launcher processes on
loopback, node ranks 0 and 1, one rank each, started at the same time as on two hosts.

* ``deepspeed --no_ssh --hostfile F --node_rank i ...`` (DeepSpeed 0.19.8 needs a hostfile with one line
  per node for ``--no_ssh``: without one it refuses ``--num_nodes 2`` and ``--node_rank 1``),
* ``torchrun --nnodes 2 --node_rank i ...`` and ``torchrun --nnodes 2 --rdzv-backend c10d ...``,
* plain processes with only Open MPI's rank variables, as ``mpirun`` starts them,
* ``deepspeed --hostfile F`` through pdsh, with a stand-in ``pdsh`` that runs each "remote" command here
  in a fresh environment as ssh would (this machine has neither pdsh nor ssh keys): what DeepSpeed
  forwards to the other nodes and what ``.deepspeed_env`` adds.

Each run trains 4 steps of the tiny config, checkpoints at steps 2 and 4 from both ranks, and logs
exactly the losses of the same 2 ranks on one node. Run as a script, this file is the training script
of those launches: it records the environment its rank sees, then runs megagpt/pretrain.py.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from testing_utils import REPO, _clean_env, losses, read_jsonl, run_training

THIS = str(Path(__file__).resolve())
TRAIN_ARGS = ["--train-iters", "4", "--save-interval", "2"]
TIMEOUT = 240  # seconds for one two-node launch (about 10-20 s on 2 CPU cores)
MARKER = "MEGAGPT_TEST_MARKER"  # set in the launcher's environment
DS_ENV_MARKER = "MEGAGPT_TEST_FROM_DS_ENV"  # set only in the .deepspeed_env file (DS_ENV_FILE)
RECORDED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "PYTHONPATH",
            MARKER, DS_ENV_MARKER)


def _env_dir(save: Path) -> Path:
    return save.parent / f"{save.name}_env"


def _record_env_then_pretrain() -> int:
    """As the launched script: write this rank's view of RECORDED to ``{save}_env/rank{RANK}.json``, train."""
    argv = sys.argv[1:]
    save = Path(argv[argv.index("--save") + 1])
    _env_dir(save).mkdir(parents=True, exist_ok=True)
    from megagpt.engine import ranks_from_env

    record = {key: os.environ.get(key) for key in RECORDED}
    # what megagpt reads: RANK/WORLD_SIZE/LOCAL_RANK, or an MPI launcher's own variables
    record["RANK"], record["WORLD_SIZE"], record["LOCAL_RANK"] = map(str, ranks_from_env())
    (_env_dir(save) / f"rank{record['RANK']}.json").write_text(json.dumps(record))
    from megagpt import pretrain
    return pretrain.main()


# A stand-in for `pdsh -S -f N -w host0,host1 COMMAND...` (what DeepSpeed's PDSH runner calls): runs COMMAND
# once per host, concurrently, with %n replaced by the host's index, in a fresh login-like environment (only
# HOME, USER, PATH), and exits with the largest exit status (-S). It refuses the runner's `pkill -f` clean-up
# command, which would match other launches on this machine.
FAKE_PDSH = '''#!{python}
import os, subprocess, sys
args, hosts = sys.argv[1:], []
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag == "-w":
        hosts = args.pop(0).split(",")
    elif flag == "-f":
        args.pop(0)
command = " ".join(args)
if "pkill" in command:
    sys.exit(0)
fresh = {{key: os.environ[key] for key in ("HOME", "USER", "PATH") if key in os.environ}}
procs = [subprocess.Popen(["bash", "-c", command.replace("%n", str(i))], env=fresh) for i in range(len(hosts))]
sys.exit(max(p.wait() for p in procs))
'''


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher, its process group and every descendant (torchrun starts its workers in their own
    sessions, so the group alone is not enough). Never SIGTERM: DeepSpeed's PDSH runner would answer it with
    `pdsh ... pkill -f`."""
    import psutil
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def launch_nodes(commands: list[list[str]], env: dict, log_dir: Path, timeout: int = TIMEOUT) -> list[str]:
    """Start every command at once, each in its own session and logging to ``log_dir/node{i}.log``; wait for
    all to exit 0. On a failure, a hang or a timeout kill every launcher with its ranks and fail with the
    logs. Returns the logs."""
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"node{i}.log" for i in range(len(commands))]
    procs: list[subprocess.Popen] = []
    try:
        for command, log in zip(commands, logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]  # poll every one: a failed node must stop the others
            if None not in codes or any(code not in (None, 0) for code in codes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p)
    texts = [log.read_text() for log in logs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(commands), "exit statuses {}:\n{}".format(
        codes, "\n".join(f"--- {cmd}\n{text[-3000:]}" for cmd, text in zip(commands, texts)))
    return texts


def deepspeed_no_ssh(hostfile: Path, port: int, args: list[str]) -> list[list[str]]:
    return [["deepspeed", "--no_ssh", "--hostfile", str(hostfile), "--node_rank", str(node), "--num_nodes", "2",
             "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), THIS, *args]
            for node in range(2)]


def torchrun_static(port: int, args: list[str]) -> list[list[str]]:
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), THIS, *args]
            for node in range(2)]


def torchrun_rendezvous(port: int, args: list[str]) -> list[list[str]]:
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "megagpt-test",
             "--local-addr", "127.0.0.1",  # else MASTER_ADDR is the rank-0 node's FQDN ("localhost" here)
             THIS, *args] for _ in range(2)]


def mpirun_variables(port: int, args: list[str]) -> list[list[str]]:
    """What ``mpirun -np 2`` starts: plain processes that only have Open MPI's rank variables (and the
    MASTER_ADDR/PORT the user exports with ``-x``); megagpt maps them itself."""
    return [["env", f"OMPI_COMM_WORLD_RANK={rank}", "OMPI_COMM_WORLD_SIZE=2", "OMPI_COMM_WORLD_LOCAL_RANK=0",
             "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}", sys.executable, THIS, *args] for rank in range(2)]


LAUNCHES = {"deepspeed-no-ssh": (deepspeed_no_ssh, 29761), "torchrun": (torchrun_static, 29762),
            "torchrun-rendezvous": (torchrun_rendezvous, 29763), "mpirun-variables": (mpirun_variables, 29765)}


@pytest.fixture(scope="module")
def hostfile(tiny_run):
    """Two "nodes": with --no_ssh the names only count nodes and slots (nothing connects to them)."""
    path = tiny_run[0] / "hostfile"
    path.write_text("node0 slots=1\nnode1 slots=1\n")
    return path


@pytest.fixture(scope="module")
def ds_env_file(tiny_run):
    """A .deepspeed_env, found through DS_ENV_FILE (an absolute path works: runner.py joins it onto ~ and .),
    so that the test writes nothing into the repository or the home directory."""
    path = tiny_run[0] / "deepspeed_env"
    path.write_text(f"{DS_ENV_MARKER}=1\nOMP_NUM_THREADS=1\n")  # no comments, no blank lines: DeepSpeed
    return path                                                  # splits every line on '='


@pytest.fixture(scope="module")
def one_node_run(tiny_run):
    """The same 4 steps from 2 ranks on one node (torchrun --nproc_per_node 2)."""
    root, config = tiny_run
    run_training("torchrun", ["--config", str(config), "--save", str(root / "one_node"), *TRAIN_ARGS], 29760,
                 timeout=TIMEOUT)
    return read_jsonl(root / "one_node" / "metrics.jsonl")


def check_two_rank_run(save: Path, reference: list[dict]) -> list[dict]:
    """Steps 1..4 logged with the reference's numbers, checkpoints written by 2 ranks, `latest` on step4.
    Returns the two ranks' environment records (rank 0 first)."""
    records = read_jsonl(save / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    np.testing.assert_allclose(losses(records), losses(reference), rtol=0, atol=1e-6)
    np.testing.assert_allclose(losses(records, "grad_norm"), losses(reference, "grad_norm"), rtol=1e-6)
    assert [r["tokens"] for r in records] == [r["tokens"] for r in reference]
    assert (save / "latest").read_text().strip() == "step4"
    for step in ("step2", "step4"):
        assert sorted(p.name for p in (save / step).glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    envs = [json.loads((_env_dir(save) / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"]) for e in envs] == [("0", "2", "0"), ("1", "2", "0")]
    return envs


@pytest.mark.slow
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_two_nodes_without_ssh_train_and_checkpoint_like_one_node(tiny_run, hostfile, ds_env_file, one_node_run,
                                                                   launch):
    """Two launchers (node ranks 0, 1) with one rank each: both exit 0, steps 1..4 are logged with the losses
    of 2 ranks on one node (same samples, same numerics with one thread) and both ranks wrote each checkpoint.
    Without ssh every launcher hands its own environment to its ranks: a variable given to the launcher
    arrives, and DeepSpeed does not read .deepspeed_env (only its ssh/pdsh and MPI runners do)."""
    root, config = tiny_run
    make_commands, port = LAUNCHES[launch]
    save = root / launch
    args = ["--config", str(config), "--save", str(save), *TRAIN_ARGS]
    commands = make_commands(hostfile, port, args) if launch.startswith("deepspeed") else make_commands(port, args)
    env = _clean_env(**{MARKER: "1", "DS_ENV_FILE": str(ds_env_file)})
    texts = launch_nodes(commands, env, root / f"{launch}_logs")
    assert "started process group: world size 2, backend gloo" in "".join(texts)
    envs = check_two_rank_run(save, one_node_run)
    assert [e[MARKER] for e in envs] == ["1", "1"]
    assert [e[DS_ENV_MARKER] for e in envs] == [None, None]  # .deepspeed_env is not read without ssh
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}


@pytest.mark.slow
def test_hostfile_launch_forwards_only_some_variables_and_the_deepspeed_env_file(tiny_run, hostfile, ds_env_file,
                                                                                 one_node_run):
    """`deepspeed --hostfile F --master_addr A` (the ssh/pdsh path; --no_ssh_check since nothing listens for
    ssh here) through the stand-in pdsh: one launcher starts both nodes. The nodes start from a fresh
    environment, so a variable set for the launcher does not arrive, PYTHONPATH (with the working directory
    in front) does, and so does every line of .deepspeed_env (OMP_NUM_THREADS=1 among them, which keeps the
    numerics of the one-node run)."""
    root, config = tiny_run
    bin_dir = root / "fake_bin"
    bin_dir.mkdir(exist_ok=True)
    pdsh = bin_dir / "pdsh"
    pdsh.write_text(FAKE_PDSH.format(python=sys.executable))
    pdsh.chmod(0o755)
    save = root / "deepspeed-pdsh"
    command = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1",
               "--master_port", "29764", THIS, "--config", str(config), "--save", str(save), *TRAIN_ARGS]
    env = _clean_env(**{MARKER: "1", "DS_ENV_FILE": str(ds_env_file), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    env.pop("PYTHONPATH", None)
    [text] = launch_nodes([command], env, root / "deepspeed-pdsh_logs")
    assert "pdsh -S -f 1024 -w node0,node1" in text
    envs = check_two_rank_run(save, one_node_run)
    assert [e[MARKER] for e in envs] == [None, None]  # not forwarded: not PYTHON*/UCX*/MV2*/MLFLOW* (NCCL* on CUDA)
    assert [e[DS_ENV_MARKER] for e in envs] == ["1", "1"]
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["1", "1"]
    assert [e["PYTHONPATH"].split(":")[0] for e in envs] == [str(REPO), str(REPO)]


if __name__ == "__main__":
    sys.exit(_record_env_then_pretrain())
