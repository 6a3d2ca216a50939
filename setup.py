"""megagpt: a DeepSpeed/Megatron-style GPT pretraining system.

The C++ data helpers in csrc/ are compiled here, at install time, never at run time.
The Triton kernels live in the top-level kernels/ folder but are installed as
``megagpt.kernels``: a top-level module named ``kernels`` would clash with the
PyPI package of that name, which bitsandbytes tries to import.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

helpers = Pybind11Extension(
    "megagpt.data._helpers",
    ["csrc/helpers.cpp"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="megagpt",
    version="0.1.0",
    description="GPT pretraining with DeepSpeed, Megatron-style parallelism and Triton ALiBi kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["megagpt", "megagpt.*"]) + ["megagpt.kernels"],
    package_dir={"megagpt.kernels": "kernels"},
    ext_modules=[helpers],
    cmdclass={"build_ext": build_ext},
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
        "train": ["deepspeed>=0.15", "bitsandbytes>=0.43", "triton>=3.0", "tensorboard", "matplotlib"],
        "hf": ["transformers>=5.0"],  # the exported custom code uses transformers 5 configs
        # EleutherAI's harness (megagpt/lm_eval_adapter.py, tools/lm_eval.py); accelerate: its "hf" model
        "eval": ["lm_eval>=0.4.5", "accelerate>=0.26"],
        "flash": ["flash-attn>=2.4"],
        # megatron-core is a test oracle: our .bin/.idx files and C++ helpers are compared with Megatron-LM's own.
        "dev": ["pytest>=7", "pybind11>=2.10", "megatron-core==0.16.1"],
    },
)
