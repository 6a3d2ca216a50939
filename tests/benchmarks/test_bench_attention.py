"""benchmarks/bench_attention.py runs end to end on CPU at the tiniest shapes (no speed assertions: CPU figures are
not GPU figures), records what cannot run instead of crashing, and its accuracy check tells ALiBi from a wrong bias."""
import json
import math
import os

import pytest
import torch
from testing_utils import load_script


bench = load_script("benchmarks/bench_attention.py")


def test_cpu_smoke_run_writes_table_and_json(tmp_path, capsys):
    output = tmp_path / "results" / "attention_smoke.json"
    interpret_before = os.environ.get("TRITON_INTERPRET")
    rc = bench.main(["--device", "cpu", "--seq-lens", "64", "--head-dims", "32", "--heads", "2", "--tokens", "64",
                     "--backends", "triton", "sdpa", "flex", "--mode", "both", "--output", str(output)])
    assert rc == 0
    assert os.environ.get("TRITON_INTERPRET") == interpret_before  # the in-process caller's environment is kept
    report = json.loads(output.read_text())
    assert not list(output.parent.glob("*.partial"))
    stdout = capsys.readouterr().out
    assert "NOT GPU figures" in report["note"] and report["note"] in stdout
    assert report["complete"] and report["device_type"] == "cpu" and report["torch"] == torch.__version__
    peak = report["matmul_peak"]
    assert math.isfinite(peak["tflops"]) and peak["tflops"] > 0

    entries = {(e["backend"], e["mode"]): e for e in report["results"]}
    assert set(entries) == {(b, m) for b in ("triton", "sdpa", "flex") for m in ("fwd", "fwd_bwd")}
    forward_flops = 2 * 1 * 2 * 64**2 * 32  # causal forward 2*b*h*s^2*d, batch = 64 tokens // 64
    for backend in ("triton", "sdpa"):
        for mode in ("fwd", "fwd_bwd"):
            e = entries[backend, mode]
            assert e["status"] == "ok", e
            assert (e["head_dim"], e["seq_len"], e["batch"], e["heads"]) == (32, 64, 1, 2)
            assert e["flops"] == forward_flops * (1 if mode == "fwd" else 3.5)
            assert math.isfinite(e["ms"]) and e["ms"] > 0
            assert e["tflops"] == pytest.approx(e["flops"] / (e["ms"] * 1e-3) / 1e12)
            assert e["frac_of_matmul_peak"] == pytest.approx(e["tflops"] / peak["tflops"])
            assert e["peak_mem_bytes"] is None  # CUDA only
            # fp32 against the float64 reference: the interpreter's fp32 dots are exact, so rounding only (~1e-6).
            assert e["check"] == "pass" and e["max_abs_err"] < 1e-4, e
            assert set(e["errors"]) == ({"out"} if mode == "fwd" else {"out", "dq", "dk", "dv"})
            assert f"{backend:<8}" in stdout
    assert entries["flex", "fwd"]["status"] == "ok" and entries["flex", "fwd"]["check"] == "pass"
    flex_bwd = entries["flex", "fwd_bwd"]
    assert flex_bwd["status"] == "unsupported" and "unsupported on cpu" in flex_bwd["reason"]
    assert "NotImplementedError" in flex_bwd["reason"] and flex_bwd["reason"] in stdout


def test_accuracy_check_rejects_a_wrong_bias():
    # The check must fail a backend whose bias is wrong: plain causal attention (zero slopes) instead of ALiBi.
    inp = bench.make_inputs(1, 4, 48, 16, torch.float32, "cpu", seed=3)
    slopes = bench.alibi_slopes(4)
    scale = 1.0 / math.sqrt(16)
    reference = bench.reference_results(inp, slopes, scale, with_grads=False)
    right = bench.make_backend("sdpa", slopes, 48, torch.float32, "cpu", scale)[0]
    wrong = bench.make_backend("sdpa", torch.zeros(4), 48, torch.float32, "cpu", scale)[0]
    assert bench.compare({"out": right(inp.q, inp.k, inp.v)}, reference, "fp32")["check"] == "pass"
    result = bench.compare({"out": wrong(inp.q, inp.k, inp.v)}, reference, "fp32")
    assert result["check"] == "FAIL" and result["rel_err"] > 1e-2


@pytest.mark.parametrize("argv, message", [
    (["--seq-lens", "0"], "--seq-lens must be positive"),
    (["--heads", "0"], "--heads must be >= 1"),
])
def test_bad_arguments_are_refused_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err
