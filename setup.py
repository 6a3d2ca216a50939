"""megagpt: a DeepSpeed/Megatron-style GPT pretraining system.

The C++ data helpers in csrc/ are compiled here, at install time, never at run time.
The Triton kernels live in the top-level kernels/ folder (no __init__.py, so it never shadows the PyPI package
``kernels``) and are imported as ``megagpt.kernels``: a regular install copies them into that package (below), a
checkout or editable install finds them through its ``__path__`` (megagpt/kernels/__init__.py).

For reproducible installs use ``bash tools/install.sh`` (requirements/cpu.lock); the bounds below are loose on
purpose, for people installing megagpt into an environment of their own.
"""
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

helpers = Pybind11Extension(
    "megagpt.data._helpers",
    ["csrc/helpers.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)


class build_py_with_kernels(build_py):
    """A regular build also ships the top-level kernels/*.py inside megagpt/kernels/."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable: megagpt.kernels.__path__ reaches the checkout's kernels/ folder
        target = os.path.join(self.build_lib, "megagpt", "kernels")
        for name in sorted(os.listdir("kernels")):
            if name.endswith(".py"):
                self.copy_file(os.path.join("kernels", name), os.path.join(target, name))


setup(
    name="megagpt",
    version="0.1.0",
    description="GPT pretraining with DeepSpeed, Megatron-style parallelism and Triton ALiBi kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["megagpt", "megagpt.*"]),
    ext_modules=[helpers],
    cmdclass={"build_ext": build_ext, "build_py": build_py_with_kernels},
    install_requires=[
        # torch is deliberately absent here: the install scripts pin it first
        # (tools/install.sh), so that pip never resolves an unpinned torch.
        "numpy<2.4",  # triton 3.6's interpreter breaks on numpy>=2.4 (triton issue 9171)
        "ftfy>=6.1",
        "tiktoken>=0.5",
        "tokenizers>=0.15",
        "zstandard>=0.21",
        "tqdm",
        "pyarrow>=12",
        "safetensors",
    ],
    extras_require={
        # xxhash: checkpoint manifests (megagpt/checkpoint_dir.py)
        "train": ["deepspeed>=0.15", "bitsandbytes>=0.43", "triton>=3.0", "tensorboard", "matplotlib", "xxhash>=3"],
        "hf": ["transformers>=5.0"],  # the exported custom code uses transformers 5 configs
        # EleutherAI's harness (megagpt/lm_eval_adapter.py, tools/lm_eval.py); accelerate: its "hf" model
        "eval": ["lm_eval>=0.4.5", "accelerate>=0.26"],
        "flash": ["flash-attn>=2.4"],
        # megatron-core is a test oracle: our .bin/.idx files and C++ helpers are compared with Megatron-LM's own.
        "dev": ["pytest>=7", "pybind11>=2.10", "megatron-core==0.16.1"],
    },
)
