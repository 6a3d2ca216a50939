"""Kernel tests run the real Triton kernels: compiled on CUDA when a GPU is present, else in Triton's interpreter.

``TRITON_INTERPRET=1`` is set here, at import time, when CUDA is unavailable. Import order does not matter:
``triton.jit`` would fix the mode when a kernel module is imported (and other test files or bitsandbytes may import
triton, or even ``megagpt.kernels``, before this conftest runs), so megagpt's kernels read the variable through
``triton.knobs`` at every launch instead (``megagpt.kernels._common.TritonKernel``).

Fixtures: ``device`` (where the tensors go) and ``compile_for_gpu`` (compiles a kernel for sm_80/86/89/90 without a GPU,
so that the compiled path, which the interpreter never sees, is type-checked on CPU machines too).
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ON_GPU = torch.cuda.is_available()


@pytest.fixture
def device() -> str:
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture
def compile_for_gpu():
    """``compile(kernel, pointer_types, constexprs, num_warps, num_stages, arch=90)`` -> kernel compiled for sm_<arch>.

    Every ``*_ptr`` parameter takes its Triton type from ``pointer_types`` (``"*bf16"``, ...), parameters listed in
    ``constexprs`` are constexprs, the float scalars named in ``float_args`` are fp32 and all other scalars int32.
    As a real launch with aligned tensors does, every pointer and every stride argument is specialised as a
    multiple of 16 (``tt.divisibility``): that is what lets Triton vectorise loads and pipeline them through
    shared memory, so without it the shared memory reported is about half the real figure.
    Nothing runs: this checks that the GPU path compiles and how much shared memory it needs.
    """
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from megagpt.kernels._common import triton_language_mode

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton's NVIDIA backend is not installed: cannot compile for a GPU")
    float_args = {"eps", "z_loss", "qk_scale_log2", "softmax_scale"}

    def compile_kernel(kernel, pointer_types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                       arch: int = 90):
        signature, attrs = {}, {}
        for index, name in enumerate(inspect.signature(kernel.fn).parameters):
            if name in constexprs:
                signature[name] = "constexpr"
                continue
            if name.endswith("_ptr"):
                signature[name] = pointer_types[name]
            else:
                signature[name] = "fp32" if name in float_args else "i32"
            if name.endswith("_ptr") or "stride" in name:
                attrs[(index,)] = [["tt.divisibility", 16]]
        source = ASTSource(fn=JITFunction(kernel.fn), signature=signature, constexprs=constexprs, attrs=attrs)
        # This conftest may have set TRITON_INTERPRET before triton was imported, so tl.sum & co. are interpreter
        # functions: switch both the variable and triton.language to compiled mode for the compile only.
        saved = os.environ.pop("TRITON_INTERPRET", None)
        try:
            with triton_language_mode(interpret=False):
                return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": num_warps, "num_stages": num_stages})
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved

    return compile_kernel
