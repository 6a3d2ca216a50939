"""What every megagpt Triton kernel needs besides its math: choosing interpreter or GPU at launch time.

Why launch time: ``triton.jit`` decides between the compiler and the CPU interpreter when the decorator runs.
For our kernels that is when a kernel module is imported; for triton.language's own ``@jit`` functions
(``tl.sum``, ``tl.max``, ``tl.zeros``, ``tl.cdiv``, ...) it is when triton itself is imported, which bitsandbytes,
torch or another test may do before ``TRITON_INTERPRET`` is set. An interpreted kernel calling a compiled
``tl.sum`` fails ("Cannot call @triton.jit'd outside of the scope of a kernel"), and the compiler cannot use an
interpreted one. So ``TritonKernel`` keeps the plain Python function, builds the interpreted or the compiled (and
kernel on first use in each mode, reads ``TRITON_INTERPRET`` through ``triton.knobs`` at every launch,
and, only when triton.language was decorated for the other mode, swaps its ``@jit`` functions for the launch
(``triton_language_mode``). After each interpreted launch it also puts back whatever the interpreter left
patched in triton.language (triton 3.6 never undoes the patches made for nested calls such as ``tl.max``, and
the compiler would then fail on a later GPU compile in the same process).

Interpreter limits this module accounts for (see /work/shared/PITFALLS.md): ``@triton.autotune`` fails there (and
timing-based tuning would break exact resume on a GPU anyway: kernels/attention_configs.py), so a kernel with
block-size meta-parameters names a fixed interpreter config; bf16 arithmetic is wrong there, so kernels take an
``UPCAST``-style constexpr from ``upcast_after_load``.

Kernels written with ``TritonKernel`` must not call other ``@triton.jit`` helpers: the interpreted kernel would
find the compiled helper in the module globals (and the reverse), so helpers are written inline.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Iterator

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Modules of triton.language holding @triton.jit functions that kernels call as tl.<name>.
_LANGUAGE_MODULES = ("triton.language", "triton.language.standard", "triton.language.random")
# What the interpreter patches: these modules' attributes and these classes' attributes.
_PATCHED_MODULES = _LANGUAGE_MODULES + ("triton.language.core", "triton.language.math")
_PATCHED_CLASSES = (triton.language.core.tensor, triton.language.core.dtype)
_converted: dict[int, object] = {}


def interpreter_active() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the CPU interpreter, read now (not at import time)."""
    return bool(triton.knobs.runtime.interpret)


def upcast_after_load(dtype: torch.dtype) -> bool:
    """Whether a kernel must convert loaded tiles to fp32 before any arithmetic.

    The interpreter stores bf16 as raw 16-bit integers, so its bf16 arithmetic and bf16 ``tl.dot`` are wrong
    while loads, stores and casts are right. On a GPU the native bf16 tensor-core path is kept.
    """
    return interpreter_active() and dtype == torch.bfloat16


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError unless ``tensor`` can be handed to a Triton kernel in the current mode."""
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu" and interpreter_active():
        return
    raise ValueError(
        f"{name} is on device '{tensor.device}': megagpt's Triton kernels need CUDA tensors, or CPU tensors with "
        f"TRITON_INTERPRET=1 set (the slow Triton interpreter, meant for tests)"
    )


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError when the named tensors do not all live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must share one device, got {devices}")


def launch_device(args, kwargs) -> torch.device | None:
    """The CUDA device of the first CUDA tensor among a launch's arguments, or None when there is none.

    Triton compiles for and launches on the *current* CUDA device, not on the device of the tensors it is handed:
    a model on ``cuda:1`` (``tools/generate.py --device cuda:1``, lm-eval with ``device=cuda:1``) would otherwise
    run on GPU 0 with GPU 1 pointers.
    """
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return value.device
    return None


def on_launch_device(args, kwargs) -> contextlib.AbstractContextManager:
    """A context that makes the tensors' CUDA device current for a launch (a no-op for CPU tensors)."""
    device = launch_device(args, kwargs)
    return torch.cuda.device(device) if device is not None else contextlib.nullcontext()


def num_persistent_programs(device: torch.device, interpreter_programs: int = 4) -> int:
    """How many programs a persistent-style kernel (each looping over rows) should launch."""
    if device.type == "cuda" and not interpreter_active():
        # Two waves of programs over the SMs: enough to hide latency, few enough that the
        # per-program partial sums stay small.
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return interpreter_programs


def _language_is_interpreted() -> bool:
    return isinstance(triton.language.standard.sum, InterpretedFunction)


@contextlib.contextmanager
def triton_language_mode(interpret: bool) -> Iterator[None]:
    """Within the block, triton.language's ``@jit`` functions are interpreted (or compiled) as ``interpret`` says.

    A no-op when triton was imported in that mode already (the usual case). Otherwise every module-level
    ``@jit`` function of triton.language is replaced, for the block only, by its twin for the other mode (one
    twin per function, kept, so that identity checks such as the interpreter's ``combine_fn ==
    tl.standard._sum_combine`` still hold). Not thread-safe: launches in other threads during the block see the
    swapped functions.
    """
    if _language_is_interpreted() == interpret:
        yield
        return
    wrong_kind = JITFunction if interpret else InterpretedFunction
    swapped = []
    for module_name in _LANGUAGE_MODULES:
        module = importlib.import_module(module_name)
        for name, value in list(vars(module).items()):
            if isinstance(value, wrong_kind):
                if id(value) not in _converted:
                    _converted[id(value)] = InterpretedFunction(value.fn) if interpret else JITFunction(value.fn)
                swapped.append((module, name, value))
                setattr(module, name, _converted[id(value)])
    try:
        yield
    finally:
        for module, name, value in swapped:
            setattr(module, name, value)


@contextlib.contextmanager
def _restoring_triton_language() -> Iterator[None]:
    """Undo, at the end of the block, every change to triton.language's module and class attributes.

    Names the interpreter added to module namespaces stay: the interpreter's rewritten functions (cached) look
    them up there on later calls.
    """
    modules = [importlib.import_module(name) for name in _PATCHED_MODULES]
    module_before = [dict(vars(module)) for module in modules]
    class_before = [dict(vars(cls)) for cls in _PATCHED_CLASSES]
    try:
        yield
    finally:
        for module, before in zip(modules, module_before):
            for name, value in list(vars(module).items()):
                if name in before and before[name] is not value:
                    setattr(module, name, before[name])
        for cls, before in zip(_PATCHED_CLASSES, class_before):
            for name in list(vars(cls)):
                if name not in before:
                    delattr(cls, name)
            for name, value in before.items():
                if vars(cls).get(name) is not value and name not in ("__dict__", "__weakref__"):
                    setattr(cls, name, value)


class TritonKernel:
    """A Triton kernel compiled for GPUs or interpreted on CPU, chosen each time it is launched.

    ``kernel[grid](*args, **kwargs)`` launches like a ``@triton.jit`` function, on the device of its CUDA tensor
    arguments (``on_launch_device``). In the interpreter the meta-parameters of ``interpreter_config`` are added
    to every launch; on a GPU the caller passes them (``kernel.compile_only`` lets it check a choice first).
    """

    def __init__(self, fn: Callable, *, interpreter_config: dict | None = None) -> None:
        self.fn = fn
        self.interpreter_config = dict(interpreter_config or {})
        self._compiled = None
        self._interpreted = None

    @property
    def __name__(self) -> str:
        return self.fn.__name__

    def _compiled_kernel(self):
        if self._compiled is None:
            self._compiled = triton.runtime.jit.JITFunction(self.fn)
        return self._compiled

    def _interpreted_kernel(self):
        if self._interpreted is None:
            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def __getitem__(self, grid):
        interpret = interpreter_active()
        kernel = self._interpreted_kernel() if interpret else self._compiled_kernel()
        fixed = self.interpreter_config if interpret else {}

        def launch(*args, **kwargs):
            if not interpret:
                with on_launch_device(args, kwargs), triton_language_mode(False):
                    return kernel[grid](*args, **kwargs)
            with _restoring_triton_language(), triton_language_mode(True):
                return kernel[grid](*args, **fixed, **kwargs)

        return launch

    def compile_only(self, grid, *args, **kwargs):
        """Compile (GPU only, nothing runs) for the tensors' device and return Triton's compiled kernel.

        Its ``metadata.shared`` is the shared memory per block a launch with these arguments would need; the
        result is cached by Triton, so the launch that follows does not compile again.
        """
        if interpreter_active():
            raise RuntimeError(f"{self.__name__}: compile_only needs the GPU path (TRITON_INTERPRET is set)")
        with on_launch_device(args, kwargs), triton_language_mode(False):
            return self._compiled_kernel().warmup(*args, grid=grid, **kwargs)


def triton_kernel(fn: Callable | None = None, *, interpreter_config: dict | None = None):
    """Decorator form of ``TritonKernel``: use instead of ``@triton.jit``."""

    def wrap(f: Callable) -> TritonKernel:
        return TritonKernel(f, interpreter_config=interpreter_config)

    return wrap(fn) if fn is not None else wrap
