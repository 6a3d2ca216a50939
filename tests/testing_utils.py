"""Helpers shared by tests (on sys.path through pytest's ``pythonpath`` setting)."""
import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def load_script(relative_path: str) -> ModuleType:
    """Import a script of the repo that is not part of the package (tools/*.py, benchmarks/*.py) by path."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- training runs in subprocesses (tests/test_training.py, test_resume.py, test_data_parallel.py) ---
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

PRETRAIN = str(REPO / "megagpt" / "pretrain.py")
KILLING_PRETRAIN = str(REPO / "tests" / "sigkill_pretrain.py")
# sequence-length stages for the tiny config: 16 tokens for steps 1-3, 24 for steps 4-6 (24 does not divide 32:
# rows run across samples and the last row of each micro batch is padded with ignored labels), then the full 32
STAGES = ["--set", "schedule.seq_len_stages=[[16, 3], [24, 3]]"]
LOGGED = ("step", "loss", "lr", "grad_norm", "seq_len", "tokens", "valid_loss")


def make_tiny_run(root: Path) -> tuple[Path, Path]:
    """A learnable tiny dataset (documents counting up mod 60) under ``root`` and a config for a 2-layer,
    d_model 32 GPT that trains 20 steps of 8 x 32 tokens with gradient accumulation 2 on one rank."""
    import numpy as np
    from megagpt.data.indexed import IndexedDatasetWriter

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
        "batch": {"micro_batch": 4, "global_batch": 8},
        "parallel": {"zero_stage": 0, "precision": "fp32"},
        "checkpoint": {"save_interval": 5, "keep_last": 2},
        "logging": {"log_interval": 1, "eval_interval": 10, "eval_iters": 2},
    }
    path = root / "tiny.json"
    path.write_text(json.dumps(config))
    return root, path


def _clean_env(**extra: str) -> dict:
    """The environment for a training subprocess: one thread (torchrun pins it, deepspeed does not, and
    float results depend on it), no inherited rank variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        if key not in extra:
            env.pop(key, None)
    return env


def pretrain_command(launcher: str, args: list[str], port: int, script: str = PRETRAIN, ranks: int = 2) -> list[str]:
    """``python SCRIPT`` (one process), ``deepspeed`` or ``torchrun`` with ``ranks`` CPU ranks."""
    if launcher == "python":
        return [sys.executable, script, *args]
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), script, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master_port", str(port), script, *args]
    raise ValueError(launcher)


def run_training(launcher: str, args: list[str], port: int, *, script: str = PRETRAIN, timeout: int = 180,
                 expect: int | None = 0, env: dict | None = None, ranks: int = 2) -> subprocess.CompletedProcess:
    """Run pretrain.py (or ``script``) under ``launcher`` in its own session (so a test can kill the whole
    process group); assert the exit status is ``expect`` unless None."""
    extra = {"MASTER_PORT": str(port), "MASTER_ADDR": "127.0.0.1"} if launcher == "python" else {}
    command = pretrain_command(launcher, args, port, script, ranks)
    process = subprocess.Popen(command, env=_clean_env(**extra, **(env or {})), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher's ranks too, not only the launcher
        stdout, stderr = process.communicate()
        raise AssertionError(f"{command} timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if expect is not None:
        assert result.returncode == expect, (f"{command} exited {result.returncode}, expected {expect}:\n"
                                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def logged_numbers(records: list[dict]) -> list[dict]:
    """The numbers of metrics records that must repeat exactly between equivalent runs (not times)."""
    return [{k: r[k] for k in LOGGED if k in r} for r in records]


def losses(records: list[dict], key: str = "loss") -> list[float]:
    return [r[key] for r in records if key in r]


def stop_and_resume_same_and_doubled_dp(common: list[str], root: Path, prefix: str, port: int):
    """The uninterrupted 2-rank run of ``common``, and two copies stopped at step 7 then resumed: one with the
    same 2 ranks (under torchrun), one with 4 ranks (the data-parallel size doubled, ZeRO state resharded).
    Returns the metrics of (uninterrupted, same ranks, doubled dp)."""
    run_training("deepspeed", [*common, "--save", str(root / f"{prefix}_whole")], port)
    for name in ("same", "dp2"):
        run_training("deepspeed", [*common, "--save", str(root / f"{prefix}_{name}"), "--exit-interval", "7"], port + 1)
    run_training("torchrun", [*common, "--save", str(root / f"{prefix}_same")], port + 2)
    resumed = run_training("deepspeed", [*common, "--save", str(root / f"{prefix}_dp2")], port + 3, ranks=4,
                           timeout=300)
    assert "ZeRO optimizer state resharded" in resumed.stdout
    return tuple(read_jsonl(root / f"{prefix}_{name}" / "metrics.jsonl") for name in ("whole", "same", "dp2"))


def assert_same_curve_as_one_rank(run: list[dict], one_rank: list[dict]) -> None:
    """A parallel layout's 20-step run with STAGES: the one-rank run's losses, gradient norms and validation
    losses within fp32 reordering noise (1e-4)."""
    import numpy as np

    assert [r["seq_len"] for r in run if "loss" in r] == [16] * 3 + [24] * 3 + [32] * 14
    np.testing.assert_allclose(losses(run), losses(one_rank), rtol=0, atol=1e-4)
    np.testing.assert_allclose(losses(run, "grad_norm"), losses(one_rank, "grad_norm"), rtol=1e-4)
    np.testing.assert_allclose(losses(run, "valid_loss"), losses(one_rank, "valid_loss"), rtol=0, atol=1e-4)


# --- engine state comparisons, also used by the round-trip scripts the tests run in subprocesses ---
TESTS_DIR = str(REPO / "tests")  # PYTHONPATH for those scripts, so that they can import this module
# ... and this checkout's megagpt before any installed one (a script outside the repository would import that)
SCRIPT_PYTHONPATH = os.pathsep.join([str(REPO), TESTS_DIR])


def assert_same_optimizer_state(trained, fresh, zero_stage: int) -> tuple[int, set[str]]:
    """Assert that two DeepSpeed engines hold the same optimizer state: ZeRO's fp32 master partitions (stage >= 1)
    and every state tensor of the wrapped optimizer, compared where the optimizer reads (ZeRO pads flat partitions
    past the parameters; the padding is never read). Returns (tensors compared, dtypes of the moments)."""
    import torch
    from megagpt.zero_checkpoint import flat_groups

    if zero_stage:
        for g, (a, b) in enumerate(zip(flat_groups(trained.optimizer)[1], flat_groups(fresh.optimizer)[1])):
            assert torch.equal(a, b), f"group {g}: fp32 master slices differ"
    base_a = trained.optimizer.optimizer if zero_stage else trained.optimizer
    base_b = fresh.optimizer.optimizer if zero_stage else fresh.optimizer
    checked, dtypes = 0, set()
    for pa, pb in zip(base_a.state, base_b.state):
        sa, sb = base_a.state[pa], base_b.state[pb]
        assert sorted(k for k in sa if torch.is_tensor(sa[k])) == sorted(k for k in sb if torch.is_tensor(sb[k]))
        for key, value in sa.items():
            if torch.is_tensor(value) and key != "step":
                assert value.dtype == sb[key].dtype, (key, value.dtype, sb[key].dtype)
                n = min(value.numel(), sb[key].numel())
                assert torch.equal(value.flatten()[:n], sb[key].flatten()[:n]), f"{key} differs"
                checked += 1
                if key.startswith(("state", "exp_avg")):
                    dtypes.add(str(value.dtype))
        if "step" in sa:
            assert float(sa["step"]) == float(sb["step"])
    return checked, dtypes
