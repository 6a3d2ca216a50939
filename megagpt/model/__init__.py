"""The GPT decoder: blocks, ALiBi, attention backends and the swappable layer factory."""
from megagpt.model.alibi import alibi_bias, alibi_slopes
from megagpt.model.attention import causal_attention
from megagpt.model.fused_ops import LayerNorm, language_model_loss
from megagpt.model.gpt import CHECKPOINTABLE_LAYERS, GPT, Block, Embedding, LayerSpec, LMHead, gpt_layer_specs
from megagpt.model.layers import LayerFactory

__all__ = [
    "CHECKPOINTABLE_LAYERS", "GPT", "Block", "Embedding", "LMHead", "LayerNorm", "LayerSpec", "LayerFactory",
    "gpt_layer_specs", "language_model_loss", "causal_attention", "alibi_slopes", "alibi_bias",
]
