"""Fused cross-entropy (Triton) against its float64 PyTorch reference: loss and dlogits.

Runs compiled on CUDA when present, else in the Triton interpreter (see conftest.py). Logits are O(3) so that
softmax is peaked. Tolerances (absolute and relative, torch.testing.assert_close): the loss is computed in fp32
from the (rounded) inputs whatever their dtype, so 1e-5 for every dtype; dlogits are rounded to the input dtype:
fp32 1e-6, fp16 1e-3, bf16 1e-2 (values below 1, 2**-11 and 2**-8 relative rounding).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megagpt.kernels import cross_entropy_reference, fused_cross_entropy
from megagpt.kernels import cross_entropy as cross_entropy_module

ON_GPU = torch.cuda.is_available()
LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_inputs(shape, vocab, dtype, device, ignored=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * 3).to(device=device, dtype=dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    flat = targets.view(-1)
    for row in ignored:
        flat[row] = -100
    return logits, targets.to(device)


def check_against_reference(logits, targets, z_loss=0.0, reduction="mean", **kwargs):
    logits = logits.detach().requires_grad_()
    loss = fused_cross_entropy(logits, targets, z_loss=z_loss, reduction=reduction, **kwargs)
    logits64 = logits.detach().double().requires_grad_()
    ref = cross_entropy_reference(logits64, targets, z_loss=z_loss, reduction=reduction)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    torch.testing.assert_close(loss.double(), ref, atol=LOSS_TOLERANCE, rtol=LOSS_TOLERANCE)
    grad_out = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.device)
    loss.backward(grad_out)
    ref.backward(grad_out.double())
    tol = GRAD_TOLERANCE[logits.dtype]
    assert logits.grad.dtype == logits.dtype
    torch.testing.assert_close(logits.grad.double(), logits64.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "shape, vocab, dtype",
    [
        ((7,), 50, torch.float32),  # vocab below one block
        ((2, 5), 300, torch.float32),
        ((3, 4), 1000, torch.float16),
        ((6,), 9000, torch.float32),  # three 4096-wide blocks, the last partial
        ((2, 3), 5000, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_matches_reference(shape, vocab, dtype, z_loss, device):
    logits, targets = make_inputs(shape, vocab, dtype, device, ignored=(1, 4))
    check_against_reference(logits, targets, z_loss=z_loss)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction, device):
    logits, targets = make_inputs((3, 5), 257, torch.float32, device, ignored=(0, 7, 8))
    check_against_reference(logits, targets, z_loss=1e-3, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_rows_in_several_launches(reduction, device):
    # 11 rows in launches of 3 (the last one short): offsets, row slicing and the mean's count must span launches.
    logits, targets = make_inputs((11,), 300, torch.float16, device, ignored=(2, 9))
    check_against_reference(logits, targets, z_loss=1e-2, reduction=reduction, max_rows_per_launch=3)


def test_launch_chunks_keep_int32_offsets():
    # 32k tokens of a 128k vocabulary: 2**32 elements, more than an int32 offset reaches.
    chunks = list(cross_entropy_module._row_chunks(32768, 131072, None))
    assert all((end - start) * 131072 <= 2**31 - 1 for start, end in chunks)
    assert chunks[0][0] == 0 and chunks[-1][1] == 32768
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert len(chunks) == 3
    assert list(cross_entropy_module._row_chunks(10, 50, None)) == [(0, 10)]


def test_custom_ignore_index(device):
    logits, targets = make_inputs((8,), 40, torch.float32, device)
    targets[3] = 7
    loss = fused_cross_entropy(logits, targets, ignore_index=7)
    torch.testing.assert_close(loss.double(), cross_entropy_reference(logits.double(), targets, ignore_index=7),
                               atol=LOSS_TOLERANCE, rtol=LOSS_TOLERANCE)


def test_all_ignored_mean_is_nan_like_torch(device):
    logits, targets = make_inputs((4,), 30, torch.float32, device, ignored=range(4))
    logits.requires_grad_()
    loss = fused_cross_entropy(logits, targets)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits.detach(), targets))
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_saves_no_fp32_copy_of_the_logits(device):
    logits, targets = make_inputs((6,), 500, torch.float16, device)
    logits.requires_grad_()
    loss = fused_cross_entropy(logits, targets)
    saved = loss.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].dtype == torch.float16 and big[0].data_ptr() == logits.data_ptr()
    assert all(t.numel() <= 6 for t in saved if t is not big[0])


def test_reference_matches_torch_cross_entropy():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(9, 33, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 33, (9,), generator=gen)
    targets[4] = -100
    for reduction in ("mean", "sum", "none"):
        torch.testing.assert_close(cross_entropy_reference(logits, targets, reduction=reduction),
                                   F.cross_entropy(logits, targets, reduction=reduction))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, t: (x, t[:3]), "targets must have shape"),
        (lambda x, t: (x, t.float()), "int64 or int32"),
        (lambda x, t: (x.long(), t), "floating-point"),
    ],
)
def test_rejects_bad_inputs(change, message, device):
    logits, targets = make_inputs((5,), 50, torch.float32, device)
    with pytest.raises(ValueError, match=message):
        fused_cross_entropy(*change(logits, targets))


@pytest.mark.skipif(ON_GPU, reason="on CUDA the range check is a device-side assert (no host sync), fatal there")
def test_rejects_targets_outside_the_vocabulary(device):
    logits, targets = make_inputs((5,), 50, torch.float32, device)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 50\) or equal ignore_index=-100; found 60"):
        fused_cross_entropy(logits, targets.clone().fill_(60))


@pytest.mark.skipif(not ON_GPU, reason="host synchronisation exists on CUDA only")
def test_no_host_sync_per_call(device):
    logits, targets = make_inputs((4, 7), 5000, torch.bfloat16, device, ignored=(3,))
    logits.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_cross_entropy(logits, targets, z_loss=1e-4).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_row_starting_with_a_block_of_minus_infinity(device):
    # Masked vocabulary entries: the first 4096-wide block of row 0 is all -inf, the rest finite; row 1 is -inf
    # everywhere except the target. The online log-sum-exp must not compute -inf - -inf = nan.
    logits, targets = make_inputs((3,), 9000, torch.float32, device)
    logits[0, :4096] = float("-inf")
    targets[0] = 5000
    logits[1, :] = float("-inf")
    logits[1, 8000] = 2.0
    targets[1] = 8000
    check_against_reference(logits, targets, z_loss=1e-3, reduction="none")


def test_rejects_unknown_reduction(device):
    logits, targets = make_inputs((5,), 50, torch.float32, device)
    with pytest.raises(ValueError, match="reduction"):
        fused_cross_entropy(logits, targets, reduction="avg")


@pytest.mark.parametrize("arch", [86, 90, pytest.param(80, marks=pytest.mark.slow),
                                  pytest.param(89, marks=pytest.mark.slow)])
def test_gpu_path_compiles_and_fits(arch, compile_for_gpu):
    # The smallest per-block shared memory of these architectures (sm_86 / sm_89): 101,376 bytes.
    pointers = {"logits_ptr": "*bf16", "dlogits_ptr": "*bf16", "targets_ptr": "*i64", "loss_ptr": "*fp32",
                "lse_ptr": "*fp32", "grad_ptr": "*fp32"}
    for kernel in (cross_entropy_module._cross_entropy_fwd, cross_entropy_module._cross_entropy_bwd):
        compiled = compile_for_gpu(kernel, pointers, {"BLOCK_V": 4096}, num_warps=8, arch=arch)
        assert compiled.metadata.shared <= 101376, (kernel.__name__, arch)
