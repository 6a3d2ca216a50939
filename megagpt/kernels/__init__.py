"""megagpt's Triton kernels, imported as ``megagpt.kernels``.

The kernel modules live in the repository's top-level ``kernels/`` folder, each beside a plain PyTorch reference of
the same function. That folder has no ``__init__.py`` on purpose: ``kernels`` is also the name of a PyPI package
(transformers imports names from it, bitsandbytes probes it), and every entry point that puts the repository root on
``sys.path`` (``python -m pytest``, ``python tools/*.py``, ``deepspeed megagpt/pretrain.py``) would otherwise let
our folder shadow it. A folder without ``__init__.py`` is at most a namespace-package portion, and the import system
prefers a regular package found anywhere on ``sys.path`` over it, so ``import kernels`` always gives the PyPI one.

Where the modules are found:
- a regular install (``pip install .``, a wheel): setup.py copies ``kernels/*.py`` into this package, beside this file;
- a source checkout or an editable install: this package's ``__path__`` gains the checkout's ``kernels/`` folder.
"""
import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.exists(_os.path.join(_here, "alibi_attention.py")):
    _checkout_kernels = _os.path.join(_os.path.dirname(_os.path.dirname(_here)), "kernels")
    if not _os.path.exists(_os.path.join(_checkout_kernels, "alibi_attention.py")):
        raise ImportError(
            f"megagpt.kernels: the kernel modules are neither in {_here} (a regular install) nor in "
            f"{_checkout_kernels} (a source checkout); reinstall megagpt with `bash tools/install.sh` or `pip install .`"
        )
    __path__.append(_checkout_kernels)  # noqa: F821 - a package's __path__ is defined by the import system

from .alibi_attention import alibi_flash_attention  # noqa: E402
from .alibi_attention_reference import alibi_attention_reference, alibi_causal_bias  # noqa: E402
from .cross_entropy import fused_cross_entropy  # noqa: E402
from .cross_entropy_reference import cross_entropy_reference  # noqa: E402
from .layernorm import fused_layer_norm  # noqa: E402
from .layernorm_reference import layer_norm_reference  # noqa: E402

__all__ = [
    "alibi_flash_attention",
    "alibi_attention_reference",
    "alibi_causal_bias",
    "fused_cross_entropy",
    "cross_entropy_reference",
    "fused_layer_norm",
    "layer_norm_reference",
]
