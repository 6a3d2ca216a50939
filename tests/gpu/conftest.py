"""CUDA checks of the kernels and the model, run by ``benchmarks/gpu_check.sh`` on a GPU machine.

Without CUDA the whole folder is skipped, except when ``MEGAGPT_GPU_CHECK_DRY=1`` (what ``gpu_check.sh --dry``
sets): the same tests then run in the Triton interpreter on CPU at toy sizes, so that the module itself is proven
before any GPU time is spent. Their figures on CPU say nothing about a GPU; bf16 there goes through the
interpreter's upcast path (PITFALLS.md), so only a GPU run checks the native bf16 tensor-core code.

``TRITON_INTERPRET`` is read at every launch by megagpt's kernels (kernels/_common.py), so setting it here is enough.
"""
from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DRY = os.environ.get("MEGAGPT_GPU_CHECK_DRY") == "1"
if DRY and not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


SKIP_REASON = "needs CUDA (or MEGAGPT_GPU_CHECK_DRY=1: the interpreter dry run of benchmarks/gpu_check.sh --dry)"


@pytest.fixture
def device() -> str:
    return "cuda" if ON_GPU else "cpu"


def relative_error(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """``max |got - want| / max(max |want|, floor)``, in float64: one number per tensor that is rounding-sized for a
    right kernel (whatever the tensor's scale) and O(1) for a wrong one. ``floor`` is for references that can be
    exactly zero (dq of a single token), where any rounding would otherwise look infinitely wrong."""
    got, want = got.detach().double(), want.detach().double().to(got.device)
    assert got.shape == want.shape, (got.shape, want.shape)
    return ((got - want).abs().max() / want.abs().max().clamp_min(floor)).item()


@pytest.fixture(name="relative_error")
def relative_error_fixture():
    """``relative_error`` itself, for tests that compare errors rather than bound them."""
    return relative_error


@pytest.fixture
def assert_relative_error():
    """``check(name, got, want, tolerance, floor=1e-30)``: assert ``relative_error(got, want, floor) <= tolerance``,
    naming the tensor."""

    def check(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float, floor: float = 1e-30) -> float:
        err = relative_error(got, want, floor)
        assert torch.isfinite(got.detach()).all(), f"{name}: non-finite values"
        assert err <= tolerance, f"{name}: max error / max |reference| = {err:.3e} > {tolerance:.1e}"
        return err

    return check
