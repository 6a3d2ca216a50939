"""megagpt imports bitsandbytes without reaching the Hugging Face Hub (megagpt/optim/bitsandbytes_import.py).

Each check runs in a fresh interpreter whose sockets record and refuse every DNS lookup and connection, so a
package that reaches for the network at import time shows up as a recorded attempt.
"""
import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

from testing_utils import REPO

pytest.importorskip("bitsandbytes")

GUARD = textwrap.dedent("""
    import json, socket, sys
    attempts = []

    def refuse(what):
        def call(*args, **kwargs):
            attempts.append(f"{what} {args[1] if what == 'connect' else args[0]}")
            raise OSError(f"network refused by the test: {what}")
        return call

    socket.getaddrinfo = refuse("getaddrinfo")
    socket.socket.connect = lambda self, *a: refuse("connect")(self, *a)

    def report(**extra):
        print("REPORT " + json.dumps({"attempts": attempts, **extra}), flush=True)
""")


def run_guarded(body: str) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", GUARD + textwrap.dedent(body)], cwd=REPO, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):]), result.stderr


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return "avx512_bf16" in cpuinfo.read()
    except OSError:
        return False


def test_training_with_an_8bit_optimizer_reaches_no_network():
    report, stderr = run_guarded("""
        import torch
        from megagpt.optim import build_optimizer
        weight = torch.nn.Parameter(torch.randn(64, 64))
        optimizer = build_optimizer([{"params": [weight], "weight_decay": 0.1}], "adamw8bit", lr=1e-3,
                                    min_8bit_size=16)
        weight.sum().backward()
        optimizer.step()
        state = optimizer.state[weight]
        kernels_after = None
        try:
            import kernels
            kernels_after = kernels.__name__  # still importable for transformers once bitsandbytes is in
        except ImportError:
            pass
        report(state=str(state["state1"].dtype), kernels_after=kernels_after)
    """)
    assert report["attempts"] == []
    assert report["state"] == "torch.uint8"  # the 8-bit path really ran
    if importlib.util.find_spec("kernels") is not None:
        assert report["kernels_after"] == "kernels"
    assert "gemm_4bit_forward" not in stderr, stderr[-2000:]


def test_the_guard_sees_a_bare_bitsandbytes_import_reach_for_the_hub():
    """The control that makes the test above able to fail: where bitsandbytes does reach for the hub (the
    ``kernels`` package installed, a CPU with AVX512-BF16), a plain ``import bitsandbytes`` is recorded."""
    if importlib.util.find_spec("kernels") is None or not cpu_has_avx512_bf16():
        pytest.skip("bitsandbytes reaches for the hub only with `kernels` installed on an AVX512-BF16 CPU")
    report, _ = run_guarded("""
        import bitsandbytes
        report()
    """)
    assert report["attempts"], "a bare bitsandbytes import made no network attempt: the guard sees nothing"
