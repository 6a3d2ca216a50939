"""Causal self-attention with optional ALiBi bias, behind one backend switch.

Layout everywhere: ``q`` is ``[batch, heads, seq_q, head_dim]``, ``k`` and ``v`` are
``[batch, heads, seq_k, head_dim]`` with ``seq_q <= seq_k``; the queries are the LAST ``seq_q``
positions (so a KV-cached decode step is ``seq_q = 1``). ``slopes`` is a float32 ``[heads]``
tensor for ALiBi, or None for plain causal attention (learned or no positions). The bias of head
``h`` is ``-slopes[h] * (i - j)`` added to the scaled score of query ``i`` and key ``j``.

Backends:
  * ``reference``: plain PyTorch, materialises the scores, math in at least float32; the ground truth.
  * ``sdpa``: ``F.scaled_dot_product_attention`` with an additive bias (default on CPU).
  * ``flex``: PyTorch FlexAttention with an ALiBi ``score_mod`` (compiled on CUDA, eager on CPU,
    where it has no backward). Meant for training and prefill: every new (seq_q, seq_k) shape
    builds a block mask and, on CUDA, recompiles, so use ``triton`` or ``sdpa`` to decode.
  * ``triton``: ``megagpt.kernels.alibi_flash_attention`` (default on CUDA for the head dims and dtypes it
    supports: head_dim 16, 32, 64, 128; fp16, bf16, fp32).
  * ``flash``: flash-attn's ``alibi_slopes`` (CUDA only, optional package, fp16/bf16 only).

``auto`` never hands a kernel a shape it cannot run: on CUDA it is ``triton`` where the kernel supports the head
dim and dtype, else ``sdpa`` (with a one-line notice). An explicit ``triton`` with an unsupported head dim is
refused when the model is built; ``flash`` on fp32 tensors (the evaluation tools' default dtype) runs ``auto``'s
choice instead, with a notice.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from megagpt.config import ATTENTION_BACKENDS
from megagpt.model.alibi import alibi_bias


# The Triton kernel's limits (kernels/alibi_attention.py checks them again at every call).
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
_notices_given: set[str] = set()


def _notice_once(message: str) -> None:
    """Warn with ``message`` the first time only (attention runs per layer and step; one line is enough)."""
    if message not in _notices_given:
        _notices_given.add(message)
        warnings.warn(message, stacklevel=3)


def resolve_backend(name: str, device: torch.device, head_dim: int | None = None,
                    dtype: torch.dtype | None = None) -> str:
    """The backend that runs: ``"auto"`` becomes ``device``'s default for this head dim and dtype (when given),
    and ``flash`` on an fp32/fp64 input becomes ``auto``'s choice; a one-line notice says when that falls back."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not one of {list(ATTENTION_BACKENDS)}")
    if name == "flash" and dtype is not None and dtype not in FLASH_DTYPES:
        chosen = resolve_backend("auto", device, head_dim, dtype)
        _notice_once(f"attention_backend='flash' needs fp16/bf16 tensors, got {dtype}: using '{chosen}' instead")
        return chosen
    if name != "auto":
        return name
    if device.type != "cuda":
        return "sdpa"
    problems = []
    if head_dim is not None and head_dim not in TRITON_HEAD_DIMS:
        problems.append(f"head_dim {head_dim} (it supports {TRITON_HEAD_DIMS})")
    if dtype is not None and dtype not in TRITON_DTYPES:
        problems.append(f"dtype {dtype}")
    if problems:
        _notice_once(f"attention_backend='auto': the triton kernel does not support {' and '.join(problems)}; "
                     f"using 'sdpa'")
        return "sdpa"
    return "triton"


def check_backend_installed(name: str, head_dim: int | None = None) -> None:
    """Raise ValueError now (at model build time) if ``name`` needs a package that is missing or cannot run
    this ``head_dim`` at all."""
    if name == "flash":
        _import_flash_attn()
        if head_dim is not None and (head_dim % 8 or head_dim > 256):
            raise ValueError(f"attention_backend='flash' (flash-attn) needs a head_dim that is a multiple of 8 up "
                             f"to 256, the model has {head_dim}; use 'auto', 'triton' or 'sdpa'")
    elif name == "triton":
        _import_triton_kernel()
        if head_dim is not None and head_dim not in TRITON_HEAD_DIMS:
            raise ValueError(f"attention_backend='triton' supports head_dim {TRITON_HEAD_DIMS}, the model has "
                             f"{head_dim}; use attention_backend='auto' (sdpa for this head dim), 'sdpa' or 'flex'")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor | None,
                     backend: str = "auto", softmax_scale: float | None = None) -> torch.Tensor:
    """Causal attention of ``q`` over ``k, v`` (layout in the module docstring); returns q's shape."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    assert k.shape == v.shape and k.shape[:2] == (batch, heads) and k.shape[3] == head_dim, (q.shape, k.shape)
    if seq_q > seq_k:
        raise ValueError(f"attention got {seq_q} queries but only {seq_k} keys; queries must be the last keys")
    if slopes is not None:
        assert slopes.shape == (heads,), (slopes.shape, heads)
        slopes = slopes.to(device=q.device, dtype=torch.float32)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    backend = resolve_backend(backend, q.device, head_dim, q.dtype)
    return _BACKENDS[backend](q, k, v, slopes, softmax_scale)


# ---- masks and biases ---------------------------------------------------------------------
def causal_mask(seq_q: int, seq_k: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[seq_q, seq_k]``, True where query (at absolute position seq_k - seq_q + r) may see the key."""
    query_pos = torch.arange(seq_k - seq_q, seq_k, device=device)
    return torch.arange(seq_k, device=device)[None, :] <= query_pos[:, None]


def causal_bias(slopes: torch.Tensor | None, seq_q: int, seq_k: int, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
    """Additive bias ``[heads or 1, seq_q, seq_k]``: ALiBi (if slopes) plus -inf above the causal diagonal."""
    if slopes is None:
        bias = torch.zeros(1, seq_q, seq_k, device=device, dtype=dtype)
    else:
        bias = alibi_bias(slopes.to(device=device, dtype=dtype), seq_q, seq_k)
    return bias.masked_fill(~causal_mask(seq_q, seq_k, device), float("-inf"))


# ---- backends -----------------------------------------------------------------------------
def reference_attention(q, k, v, slopes, softmax_scale):
    """Plain PyTorch: materialised scores, math in float32 (or float64 for float64 inputs)."""
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    scores = torch.matmul(qf, kf.transpose(-2, -1)) * softmax_scale  # [b, h, seq_q, seq_k]
    scores = scores + causal_bias(slopes, q.shape[2], k.shape[2], q.device, compute_dtype)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).to(q.dtype)


def sdpa_attention(q, k, v, slopes, softmax_scale):
    """``scaled_dot_product_attention``; ALiBi and the causal mask become one additive bias."""
    seq_q, seq_k = q.shape[2], k.shape[2]
    if slopes is None and seq_q == seq_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
    if slopes is None and seq_q == 1:  # the one query is the last position: it sees every key
        return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale)
    # The bias is built in float32 and then cast: at 8k positions ALiBi values reach thousands,
    # where bf16 would lose the per-step slope differences even before the cast.
    bias = causal_bias(slopes, seq_q, seq_k, q.device, torch.float32).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], scale=softmax_scale)


@functools.lru_cache(maxsize=16)
def _flex_block_mask(seq_q: int, seq_k: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = seq_k - seq_q

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    # device must be given explicitly: the default is "cuda" even for CPU tensors.
    return create_block_mask(causal, B=None, H=None, Q_LEN=seq_q, KV_LEN=seq_k, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention_backend(q, k, v, slopes, softmax_scale):
    """FlexAttention with an ALiBi ``score_mod``; compiled on CUDA, eager (forward only) on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    seq_q, seq_k = q.shape[2], k.shape[2]
    offset = seq_k - seq_q
    block_mask = _flex_block_mask(seq_q, seq_k, str(q.device))
    slopes_for_scores = None
    if slopes is not None:
        slopes_for_scores = slopes.to(q.dtype) if q.dtype == torch.float64 else slopes

    def alibi_score_mod(score, b, h, q_idx, kv_idx):
        return score - slopes_for_scores[h] * (q_idx + offset - kv_idx)

    score_mod = None if slopes is None else alibi_score_mod

    if q.is_cuda:
        return _compiled_flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                          scale=softmax_scale)
    with warnings.catch_warnings():
        # Eager is chosen deliberately on CPU (Inductor's CPU compile is slow and adds no backward);
        # silence the "called without torch.compile" advice.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=softmax_scale)


def _import_triton_kernel():
    try:
        from megagpt.kernels import alibi_flash_attention
    except ImportError as err:
        raise ValueError(
            "attention_backend='triton' needs megagpt.kernels.alibi_flash_attention, which could not be "
            f"imported ({err}); install triton (pip install -e '.[train]') or choose another backend") from err
    return alibi_flash_attention


# Dynamo cannot trace our launcher (``TritonKernel`` picks interpreter or compiler at launch time and
# patches triton.language; under the interpreter Dynamo fails inside triton's numpy code). So under
# torch.compile the attention call is a graph break and runs eagerly, with its own autograd backward,
# while the code around it is compiled in pieces. Registering the kernel as a torch.library custom op
# would remove the break; that needs doing and measuring on a GPU (docs/model.md).
@torch.compiler.disable
def triton_attention(q, k, v, slopes, softmax_scale):
    """``megagpt.kernels.alibi_flash_attention``; zero slopes give plain causal attention.

    It needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests); the kernel says so otherwise.
    """
    kernel = _import_triton_kernel()
    if slopes is None:
        slopes = torch.zeros(q.shape[1], device=q.device, dtype=torch.float32)
    return kernel(q, k, v, slopes, softmax_scale=softmax_scale)


def _import_flash_attn():
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise ValueError("attention_backend='flash' needs the optional flash-attn package "
                         "(pip install flash-attn, CUDA only); it is not installed. "
                         "Choose 'triton', 'flex', 'sdpa' or 'reference' instead.") from err
    return flash_attn_func


def flash_attention(q, k, v, slopes, softmax_scale):
    """flash-attn with ``alibi_slopes``; its causal mask is aligned to the bottom right like ours."""
    flash_attn_func = _import_flash_attn()
    if not q.is_cuda:
        raise ValueError(f"attention_backend='flash' needs CUDA tensors, got tensors on {q.device}")
    # flash-attn's layout is [batch, seq, heads, head_dim].
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          softmax_scale=softmax_scale, causal=True, alibi_slopes=slopes)
    return out.transpose(1, 2)


_BACKENDS = {
    "reference": reference_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention_backend,
    "triton": triton_attention,
    "flash": flash_attention,
}
