"""benchmarks/gpu_check.sh: its --dry mode runs every part on CPU at toy sizes (slow: the whole rehearsal of the GPU
call), and bad usage is refused before anything runs."""
import json
import os
import subprocess
import xml.etree.ElementTree as ET

import pytest
import torch
from testing_utils import REPO

SCRIPT = str(REPO / "benchmarks" / "gpu_check.sh")


def run_check(out, *args, timeout=60):
    env = dict(os.environ, OUT=str(out))
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--parts", "tests,bench"], "--parts: unknown part 'bench'"),
    (["--budget-s", "ten"], "--budget-s must be a whole number of seconds"),
])
def test_bad_usage_is_refused_naming_the_argument(tmp_path, args, message):
    result = run_check(tmp_path / "out", *args)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_finished_check_is_not_overwritten_unless_asked(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    result = run_check(tmp_path, "--dry")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "summary.json").read_text() == "{}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_only_the_dry_run_is_allowed(tmp_path):
    result = run_check(tmp_path / "out", "--parts", "tests")
    assert result.returncode == 2 and "no CUDA device" in result.stderr and "--dry" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dry_run_runs_every_part_and_brings_back_everything(tmp_path):
    out = tmp_path / "out"
    result = run_check(out, "--dry", timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry"] is True
    assert {name: part["status"] for name, part in summary["parts"].items()} == dict.fromkeys(
        ["build", "smoke", "tests", "attention", "train"], "ok")
    smoke = json.loads((out / "smoke" / "smoke.json").read_text())
    assert smoke["ok"] and smoke["resume_identical"] and smoke["steps_logged"] == {"whole": 20, "split": 20}
    assert "DRY RUN on CPU: NOT GPU figures" in result.stdout
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and versions["deepspeed"] and versions["transformers"]
    assert (out / "device.txt").read_text().strip()

    # the CUDA test modules really ran (in the interpreter), none skipped or failed
    suite = ET.parse(out / "tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 40 and suite.get("failures") == suite.get("errors") == suite.get("skipped") == "0"
    names = {case.get("classname") for case in ET.parse(out / "tests.xml").getroot().iter("testcase")}
    assert {"tests.gpu.test_cuda_kernels", "tests.gpu.test_cuda_model"} <= names

    attention = json.loads((out / "attention.json").read_text())
    assert attention["complete"] and "NOT GPU figures" in attention["note"]
    checked = {(e["backend"], e["mode"]) for e in attention["results"] if e.get("check") == "pass"}
    assert {("triton", "fwd"), ("triton", "fwd_bwd"), ("sdpa", "fwd_bwd"), ("flex", "fwd")} <= checked
    assert {e["head_dim"] for e in attention["results"]} == {128} and attention["args"]["dtype"] == "bf16"

    train = json.loads((out / "train" / "train.json").read_text())
    assert train["complete"] and "NOT GPU figures" in train["note"]
    assert train["matmul_peak"]["source"].endswith("attention.json")  # the peak of the same run
    cases = {c["name"]: c for c in train["cases"]}
    assert set(cases) == {"megagpt_gpt127_adamw8bit", "hf_gpt127", "megagpt_gpt1b_adamw", "hf_gpt1b"}
    for case in cases.values():
        assert case["status"] == "ok" and case["losses_finite"] and case["tokens_per_sec"] > 0, case
        assert (out / "train" / "logs" / case["log"]).exists()
    assert cases["hf_gpt127"]["attn_implementation"] == "sdpa"
    assert cases["megagpt_gpt127_adamw8bit"]["optimizer_state_bytes"]["moments_by_dtype"]["uint8"] > 0
    assert cases["megagpt_gpt1b_adamw"]["moment_bytes_per_param"] >= 8.0  # two fp32 moments
    assert cases["megagpt_gpt1b_adamw"]["master_bytes_per_param"] >= 4.0  # ZeRO's fp32 copy of bf16 weights
    assert train["comparisons"]["megagpt_gpt1b_adamw"]["tokens_per_sec_vs_hf"] > 0
