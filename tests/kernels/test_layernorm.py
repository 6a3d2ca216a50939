"""Fused LayerNorm (Triton) against its float64 PyTorch reference: output, dX, dW and dB.

Runs compiled on CUDA when present, else in the Triton interpreter (see conftest.py). Tolerances (absolute and
relative, torch.testing.assert_close) per dtype, for O(1) inputs: fp32 1e-5 (fp32 statistics and rounding; dW/dB
sum over the rows in a different order than float64); fp16 1e-2 and bf16 5e-2 (outputs and gradients rounded to
the input dtype: 2**-11 and 2**-8 relative, and dW summed over rows grows to a few units).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagpt.kernels import fused_layer_norm, layer_norm_reference
from megagpt.kernels import layernorm as layernorm_module

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def check_against_reference(shape, dtype, with_bias, device, eps=1e-5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(hidden, generator=gen) + 1).to(device=device, dtype=dtype).requires_grad_()
    bias = torch.randn(hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_() if with_bias else None
    grad_out = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    y = fused_layer_norm(x, weight, bias, eps)
    y.backward(grad_out)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    b64 = bias.detach().double().requires_grad_() if with_bias else None
    y64 = layer_norm_reference(x64, w64, b64, eps)
    y64.backward(grad_out.double())

    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y64, atol=tol, rtol=tol)
    pairs = [("dx", x.grad, x64.grad), ("dweight", weight.grad, w64.grad)]
    if with_bias:
        pairs.append(("dbias", bias.grad, b64.grad))
    for name, got, want in pairs:
        assert got.dtype == dtype, name
        # dW and dB sum over the rows: scale the absolute tolerance with their count.
        atol = tol * (shape[0] * (shape[1] if len(shape) > 2 else 1)) ** 0.5 if name != "dx" else tol
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "shape, dtype, with_bias",
    [
        ((3, 1), torch.float32, True),  # hidden 1: output is the bias, dX is zero
        ((7, 33), torch.float32, True),  # 7 rows > the interpreter's 4 backward programs: several rows each
        ((2, 5, 100), torch.float32, False),
        ((9, 768), torch.float16, True),
        ((4, 3, 257), torch.float16, False),
        ((6, 130), torch.bfloat16, True),
        ((2, 8192), torch.float32, True),
    ],
)
def test_matches_reference(shape, dtype, with_bias, device):
    check_against_reference(shape, dtype, with_bias, device)


def test_large_eps(device):
    check_against_reference((5, 40), torch.float32, True, device, eps=0.5)


def test_mixed_dtypes_fp32_weights_bf16_activations(device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 64, generator=gen).to(device, torch.bfloat16)
    weight = torch.randn(64, generator=gen).to(device).requires_grad_()
    bias = torch.randn(64, generator=gen).to(device).requires_grad_()
    y = fused_layer_norm(x, weight, bias)
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    ref = layer_norm_reference(x.double(), weight.detach().double(), bias.detach().double())
    torch.testing.assert_close(y.double(), ref, atol=5e-2, rtol=5e-2)


def test_reference_matches_torch_layer_norm():
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(4, 37, generator=gen, dtype=torch.float64), torch.randn(37, dtype=torch.float64), None
    torch.testing.assert_close(layer_norm_reference(x, w, b, 1e-5), F.layer_norm(x, (37,), w, b, 1e-5))


def test_saves_only_row_statistics(device):
    x = torch.randn(6, 50, device=device, requires_grad=True)
    y = fused_layer_norm(x, torch.ones(50, device=device))
    saved = y.grad_fn.saved_tensors
    stats = [t for t in saved if t.shape == (6,)]
    assert len(stats) == 2 and all(t.dtype == torch.float32 for t in stats), [tuple(t.shape) for t in saved]
    assert sum(t.numel() for t in saved) == x.numel() + 50 + 2 * 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight": torch.ones(7)}, "weight must have shape"),
        ({"bias": torch.ones(7)}, "bias must have shape"),
        ({"x": torch.ones(2, 20000)}, "hidden sizes"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_rejects_bad_inputs(kwargs, message, device):
    args = {"x": torch.ones(2, 8), "weight": torch.ones(8), "bias": None, "eps": 1e-5}
    args.update(kwargs)
    if "x" in kwargs:
        args["weight"] = torch.ones(args["x"].shape[-1])
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=message):
        fused_layer_norm(**args)


@pytest.mark.parametrize("arch", [86] + [pytest.param(arch, marks=pytest.mark.slow) for arch in (80, 89, 90)])
def test_gpu_path_compiles_and_fits(arch, compile_for_gpu):
    # gpt1b's hidden size 2048 and the widest bf16 row the kernel takes (32768); sm_86 / sm_89 have the
    # smallest shared memory per block of these architectures, 101,376 bytes.
    pointers = {name: "*bf16" for name in ("x_ptr", "y_ptr", "w_ptr", "b_ptr", "dy_ptr", "dx_ptr")}
    pointers.update({name: "*fp32" for name in ("mean_ptr", "rstd_ptr", "dw_partial_ptr", "db_partial_ptr")})
    for block_h in (2048, 32768):
        for kernel in (layernorm_module._layer_norm_fwd, layernorm_module._layer_norm_bwd):
            compiled = compile_for_gpu(kernel, pointers, {"HAS_BIAS": True, "BLOCK_H": block_h},
                                       num_warps=layernorm_module._num_warps(block_h), arch=arch)
            assert compiled.metadata.shared <= 101376, (kernel.__name__, block_h, arch)
