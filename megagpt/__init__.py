"""megagpt: GPT pretraining with DeepSpeed, Megatron-style parallelism and Triton ALiBi kernels."""

__version__ = "0.1.0"
