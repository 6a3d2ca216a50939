"""bitsandbytes, imported without reaching the Hugging Face Hub.

bitsandbytes >= 0.48, on a CPU with AVX512-BF16 and with the ``kernels`` package installed (transformers pulls it
in), calls ``kernels.get_kernel("kernels-community/quantization-bitsandbytes")`` while it is imported: a DNS lookup
and an HTTPS request to huggingface.co, and with a trusting configuration a download of code that then runs. The
kernel is a 4-bit inference GEMM, which training with 8-bit optimizers never calls. megagpt never fetches from a
hub at run time, so its import of bitsandbytes hides ``kernels`` for the length of that import: bitsandbytes then
keeps its own CPU path (what it does on every CPU without AVX512-BF16), and transformers still finds ``kernels``
afterwards. The warning bitsandbytes logs about the missing kernel (advice to ``pip install kernels``) is
dropped for that import only.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from types import ModuleType

_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _HUB_KERNEL_WARNING not in record.getMessage()


@contextlib.contextmanager
def _without_hub_kernels():
    hidden = {name: module for name, module in sys.modules.items()
              if name == "kernels" or name.startswith("kernels.")}
    for name in hidden:
        del sys.modules[name]
    sys.modules["kernels"] = None  # `from kernels import get_kernel` now raises ImportError
    logger, drop = logging.getLogger("bitsandbytes.backends.cpu.ops"), _DropHubKernelWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
        del sys.modules["kernels"]
        sys.modules.update(hidden)


def import_bitsandbytes() -> ModuleType:
    """The ``bitsandbytes`` module, imported (once) so that it fetches nothing from the Hugging Face Hub.

    Every megagpt import of bitsandbytes goes through here; once it has run, ``import bitsandbytes.x`` is
    an ordinary import of an already loaded package.
    """
    if "bitsandbytes" not in sys.modules:
        with _without_hub_kernels():
            import bitsandbytes  # noqa: F401
    return sys.modules["bitsandbytes"]
