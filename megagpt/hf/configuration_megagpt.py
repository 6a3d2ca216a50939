"""Hugging Face configuration of a megagpt GPT, shipped as custom code beside an exported model.

This file is copied into every ``arch="custom"`` export (megagpt/hf/export.py) and loaded by
``AutoConfig.from_pretrained(dir, trust_remote_code=True)``: it imports only transformers, because the people
who load the export do not have megagpt installed. Field by field it is megagpt's ``ModelConfig``
(megagpt/config/model.py) under Hugging Face's usual names; written for transformers 5 (dataclass configs).
"""
from transformers import PreTrainedConfig

POSITION_EMBEDDING_TYPES = ("alibi", "learned", "none")


class MegaGPTConfig(PreTrainedConfig):
    """A pre-LayerNorm GPT decoder: ALiBi, learned or no positions; sequential (GPT-2) or parallel residual.

    megagpt name -> this name: vocab_size, seq_len -> max_position_embeddings (for ALiBi and no positions only
    the trained length, not a limit), d_model -> hidden_size, num_layers -> num_hidden_layers, num_heads ->
    num_attention_heads, head_dim (resolved: never None once built), MLP width -> intermediate_size,
    position -> position_embedding_type, parallel_residual, shared_layernorm, bias -> use_bias, layernorm_eps ->
    layer_norm_eps, tied_embeddings -> tie_word_embeddings, dropout -> hidden_dropout, init_std ->
    initializer_range."""

    model_type = "megagpt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    head_dim: int | None = None
    intermediate_size: int = 3072
    position_embedding_type: str = "alibi"
    parallel_residual: bool = True
    shared_layernorm: bool = False
    use_bias: bool = True
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                                 f"{self.num_attention_heads}; set head_dim in config.json")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(f"position_embedding_type={self.position_embedding_type!r} is not one of "
                             f"{list(POSITION_EMBEDDING_TYPES)}")
        if self.shared_layernorm and not self.parallel_residual:
            raise ValueError("shared_layernorm=true needs parallel_residual=true")
        super().__post_init__(**kwargs)


__all__ = ["MegaGPTConfig"]
