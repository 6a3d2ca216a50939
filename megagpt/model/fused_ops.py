"""The model's LayerNorm and language-model loss: megagpt's fused Triton kernels on CUDA, plain PyTorch elsewhere.

``model.fused_kernels`` (default true) switches both:

- ``LayerNorm`` is an ``nn.LayerNorm`` (same parameters, same state dict) whose forward runs
  ``megagpt.kernels.fused_layer_norm`` (fp32 statistics, one pass per row) on CUDA tensors of a width the kernel
  holds (up to 16384 fp32 / 32768 16-bit elements); under ``torch.compile`` it stays the plain op, which
  Inductor fuses itself (the Triton launcher is a graph break, one per LayerNorm).
- ``language_model_loss`` runs ``megagpt.kernels.fused_cross_entropy`` on CUDA: it reads the logits in their own
  dtype and never builds the fp32 ``[batch, seq, vocab]`` copy, its softmax or its fp32 gradient that
  ``F.cross_entropy(logits.float())`` does (gpt1b at micro batch 8 x 2048 and a 50k vocab: ~0.8 GB each).

The vocab-parallel loss of tensor parallelism (megagpt/parallel/layers.py) keeps its own form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Widest row (bytes) the fused LayerNorm holds in registers; kernels/layernorm.py refuses wider ones.
_FUSED_LAYER_NORM_MAX_ROW_BYTES = 65536
_FUSED_LAYER_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_kernels_run_on(device: torch.device) -> bool:
    """Whether the fused kernels run for tensors on ``device``: CUDA only (tests widen this to the interpreter)."""
    return device.type == "cuda"


def _import_kernels():
    try:
        import megagpt.kernels as kernels
    except ImportError as err:
        raise ImportError(
            f"model.fused_kernels=true needs megagpt's Triton kernels on CUDA, which could not be imported ({err}); "
            "install triton (it comes with PyTorch's CUDA wheels) or set model.fused_kernels=false") from err
    return kernels


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension that uses the fused Triton kernel where it applies (see above)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True, fused: bool = True):
        super().__init__(normalized_shape, eps=eps, bias=bias)
        self.fused = fused

    def _runs_fused(self, x: torch.Tensor) -> bool:
        return (self.fused and fused_kernels_run_on(x.device) and not torch.compiler.is_compiling()
                and x.dtype in _FUSED_LAYER_NORM_DTYPES  # fp64 (checks, debugging) keeps its precision
                and x.shape[-1] * x.element_size() <= _FUSED_LAYER_NORM_MAX_ROW_BYTES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_fused(x):
            return _import_kernels().fused_layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused={self.fused}"


@torch.compiler.disable  # Dynamo cannot trace the Triton launcher; one graph break at the loss is cheap
def _fused_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return _import_kernels().fused_cross_entropy(logits, targets, ignore_index=ignore_index)


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                        fused: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; logits ``[batch, seq, vocab]``, targets ``[batch, seq]``.

    ``fused``: on CUDA, the fused Triton cross-entropy (no fp32 copy of the logits); otherwise
    ``F.cross_entropy`` on fp32 logits (a log-softmax over 50k entries in bf16 is lossy).
    """
    if fused and fused_kernels_run_on(logits.device):
        return _fused_loss(logits, targets, ignore_index)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=ignore_index)
