"""Block sizes of the ALiBi attention kernels, chosen by rule, never by timing.

Why not ``triton.autotune``: it times every config in each new process, so a resumed run may pick other block
sizes (another summation order, other losses) than the uninterrupted run did; it re-times mid-training at every
new sequence length (warmup stages, evaluation) with a 256 MB scratch buffer; and a config that does not fit the
GPU's shared memory is scored "infinite" and, when it is the only one left, launched anyway (``OutOfResources``).

The rule instead: each kernel has a fixed preference list per input-dtype class (``CANDIDATES``, best first on
the GPUs they were sized for). For one launch key, (GPU model, kernel, dtype, head dim, length bucket, operand
alignment), the chosen config is the first candidate that

1. does not tile far past the input: its row block is at most the length rounded up to a power of two (at least
   16), when any candidate passes that test (short evaluation / decode shapes);
2. fits the GPU's shared memory per block, measured on the compiled kernel (``metadata.shared``), which is exact
   and depends only on the code, the GPU architecture and Triton's version;
3. does not spill registers (known only after loading on a GPU); when every fitting candidate spills, the first
   that fits is taken.

So the same shape on the same GPU model always gets the same config (resumed runs repeat the uninterrupted
one), and a config that does not fit is never launched: when none fits, the launch is refused with a message.
The compile-only tests (tests/kernels/test_attention_configs.py) run this rule for sm_80, sm_86, sm_89 and
sm_90 on a CPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import triton
from triton.runtime.autotuner import OutOfResources

from ._common import interpreter_active

KERNELS = ("fwd", "dkdv", "dq")

# Opt-in shared memory per block by compute capability (CUDA programming guide, "Technical Specifications"):
# what the compile-only tests check against. At run time the launching GPU's own figure is used.
SHARED_MEMORY_PER_BLOCK = {
    (8, 0): 166912,  # A100, A800
    (8, 6): 101376,  # RTX 3090, A5000, A6000, A40
    (8, 9): 101376,  # RTX 4090, L4, L40
    (9, 0): 232448,  # H100, H200
}


@dataclass(frozen=True)
class BlockConfig:
    """One launch config: query-row block, key-row block, warps and software-pipelining stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        """The keyword arguments a Triton launch takes for this config."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    def row_block(self, kernel: str) -> int:
        """The block along the dimension one program owns: keys for dK/dV, queries otherwise."""
        return self.meta()[row_block_name(kernel)]


def row_block_name(kernel: str) -> str:
    """The meta-parameter that blocks the dimension one program of ``kernel`` owns (its grid's rows)."""
    return "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"


def _configs(*tuples) -> tuple[BlockConfig, ...]:
    return tuple(BlockConfig(*t) for t in tuples)


# Best first. The first entries are the fast ones on an H100 and A100; the later ones keep every head dim
# (up to 128) within the 101,376 bytes of sm_86 / sm_89, and the smallest ones serve short inputs.
# fp32 ("ieee" dots) needs about twice the shared memory of fp16/bf16 and is a test/evaluation path.
CANDIDATES: dict[str, dict[str, tuple[BlockConfig, ...]]] = {
    "fwd": {
        "16bit": _configs((128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2),
                          (16, 32, 4, 2)),
        "fp32": _configs((64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1)),
    },
    "dkdv": {
        "16bit": _configs((32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
        "fp32": _configs((32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)),
    },
    "dq": {
        "16bit": _configs((128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
        "fp32": _configs((64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1)),
    },
}


class CompiledFacts(NamedTuple):
    """What compiling one config tells: shared memory per block (bytes), register spills (None: not known)."""

    shared: int
    spills: int | None = None


def dtype_class(dtype: torch.dtype) -> str:
    """The candidate list an input dtype uses."""
    return "fp32" if dtype == torch.float32 else "16bit"


def length_bucket(rows: int) -> int:
    """Lengths that share a config: the next power of two (KV-cache decoding must not re-select every step)."""
    return triton.next_power_of_2(max(int(rows), 1))


def candidate_configs(kernel: str, dtype: torch.dtype, rows: int) -> tuple[BlockConfig, ...]:
    """The candidates for ``kernel`` in preference order, those that tile past ``rows`` dropped when possible."""
    if kernel not in CANDIDATES:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
    configs = CANDIDATES[kernel][dtype_class(dtype)]
    limit = max(16, length_bucket(rows))
    short = tuple(c for c in configs if c.row_block(kernel) <= limit)
    return short or configs


def select_config(kernel: str, dtype: torch.dtype, head_dim: int, rows: int, shared_limit: int,
                  compile_config: Callable[[BlockConfig], CompiledFacts]) -> BlockConfig:
    """The config ``kernel`` launches with (rule in the module docstring); raises RuntimeError when none fits.

    ``compile_config`` compiles one candidate for the target GPU and reports its ``CompiledFacts``;
    ``shared_limit`` is the GPU's shared memory per block in bytes.
    """
    first_fitting = None
    measured = []
    for config in candidate_configs(kernel, dtype, rows):
        facts = compile_config(config)
        measured.append(f"{config}: {facts.shared} B")
        if facts.shared > shared_limit:
            continue
        if not facts.spills:
            return config
        first_fitting = first_fitting or config
    if first_fitting is not None:
        return first_fitting
    raise RuntimeError(
        f"no launch config of the attention kernel '{kernel}' fits this GPU's {shared_limit} bytes of shared "
        f"memory per block ({dtype}, head_dim {head_dim}): {'; '.join(measured)}. Use attention_backend='sdpa' "
        f"or 'flex', or a 16-bit dtype, and report this (kernels/attention_configs.py)")


# ---- the choice on a GPU ---------------------------------------------------------------------------------------
_CHOSEN: dict[tuple, BlockConfig] = {}  # launch key -> the config chosen for it in this process


def chosen_configs() -> dict:
    """The GPU launch configs chosen so far in this process, by launch key (for logs; empty on CPU)."""
    return dict(_CHOSEN)


def _alignment(args) -> tuple[bool, ...]:
    """Which pointer and integer arguments are multiples of 16: what Triton specialises a compile on."""
    values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args
              if isinstance(a, torch.Tensor) or (isinstance(a, int) and not isinstance(a, bool))]
    return tuple(value % 16 == 0 for value in values)


def _gpu_shared_memory_limit(device: torch.device) -> int:
    """Shared memory per block that Triton's launcher allows on ``device`` (what OutOfResources checks)."""
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


def _compile_facts(kernel, args, launch_args: dict, config, shared_limit: int) -> CompiledFacts:
    """Compile ``kernel`` for the tensors' GPU with ``config`` (nothing runs) and read what the compile tells."""
    compiled = kernel.compile_only((1,), *args, **launch_args, **config.meta())
    spills = None
    if compiled.metadata.shared <= shared_limit:
        # Triton learns the register spills only when it loads the binary (a private step, done at first launch
        # anyway); older or newer versions without it just leave spills unknown.
        with torch.cuda.device(args[0].device):
            try:
                compiled._init_handles()
                spills = getattr(compiled, "n_spills", None)
            except AttributeError:
                pass
            except OutOfResources:  # e.g. more threads than the binary's register use allows: cannot launch
                return CompiledFacts(shared_limit + 1, spills)
    return CompiledFacts(compiled.metadata.shared, spills)


def gpu_launch_meta(kernel, name: str, args, launch_args: dict, rows: int) -> dict:
    """Meta-parameters for a GPU launch, chosen once per launch key by rule (``attention_configs``).

    ``args`` are the kernel's positional arguments (q first), ``launch_args`` its constexprs (``HEAD_DIM``,
    ``INT64_OFFSETS``, ...), ``rows`` the length the grid's row blocks cover. Empty in the interpreter, where the
    kernel's ``interpreter_config`` applies.
    """
    if interpreter_active():
        return {}
    q = args[0]
    device = q.device
    key = (name, *_device_identity(device.index), q.dtype, launch_args["HEAD_DIM"], launch_args["INT64_OFFSETS"],
           length_bucket(rows), _alignment(args))
    config = _CHOSEN.get(key)
    if config is None:
        limit = _gpu_shared_memory_limit(device)
        config = _CHOSEN[key] = select_config(name, q.dtype, launch_args["HEAD_DIM"], rows, limit,
                                              lambda c: _compile_facts(kernel, args, launch_args, c, limit))
    return config.meta()


@functools.cache
def _device_identity(index: int) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of CUDA device ``index``: looked up once, not at every launch."""
    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


# ---- launch geometry -------------------------------------------------------------------------------------------
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y (and z); gridDim.x reaches 2**31 - 1
_INT32_MAX = 2**31 - 1


def head_chunks(batch_heads: int, limit: int = MAX_GRID_Y):
    """``(first, count)`` slices of the ``batch * heads`` grid axis, each within CUDA's grid-y limit.

    Batched evaluation or decoding passes 65,535 (e.g. 2,048 sequences of 32 heads); each slice is one launch
    whose programs add ``first`` to their ``program_id(1)``.
    """
    if batch_heads < 1:
        raise ValueError(f"batch * heads must be positive, got {batch_heads}")
    for first in range(0, batch_heads, limit):
        yield first, min(limit, batch_heads - first)


def needs_int64_offsets(*tensors: torch.Tensor, block_rows: int = 128) -> bool:
    """Whether a row's element offset (``row * row_stride + column``) can pass int32 in these ``[b, h, s, d]`` tensors.

    The kernels add batch and head offsets in int64 already; within one (batch, head) the per-row products are
    int32 unless the kernel is told otherwise. They wrap for long strided inputs: q/k/v sliced from a fused
    ``[batch, seq, heads, 3, head_dim]`` QKV have a row stride of ``3 * heads * head_dim``, so d_model 8192
    passes 2**31 at ~87k tokens. Rows up to one block past the end count: padded rows' addresses are computed
    (under a mask) too.
    """
    return any((t.shape[2] + block_rows) * abs(t.stride(2)) + t.shape[3] > _INT32_MAX for t in tensors)
