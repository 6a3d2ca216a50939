"""Parameter names, layouts and configs between megagpt's GPT and the two Hugging Face architectures.

* GPT-2 (``GPT2LMHeadModel``, built into transformers): only for models computing exactly GPT-2's function
  (``gpt2_problems`` lists what stands in the way). Its linears are ``Conv1D`` (weights stored ``[in, out]``)
  and its fused QKV output is ``[q | k | v]``, each ``[heads, head_dim]``; megagpt's is ``[heads, 3, head_dim]``.
* custom (``MegaGPTForCausalLM``, megagpt/hf/modeling_megagpt.py): megagpt's own layout under other names.

Both store the vocabulary unpadded (``vocab_size`` rows): megagpt pads its embedding and head to
``make_vocab_size_divisible_by`` but never reads the padding rows, so they are dropped on export and filled
with zeros on import.
"""
from __future__ import annotations

import torch

from megagpt.config import ModelConfig

# GPT-2 config fields that change its function in ways megagpt cannot represent, with the value megagpt needs.
GPT2_REQUIRED = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                 "add_cross_attention": False, "scale_attn_weights": True}
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation megagpt uses


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``rows`` (megagpt's padded vocabulary)."""
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _block_names(num_layers: int):
    """(megagpt block index, 0-based Hugging Face layer index) pairs: megagpt's blocks are layers 1..L."""
    return [(i, i - 1) for i in range(1, num_layers + 1)]


# ---- GPT-2 --------------------------------------------------------------------------------------------------
def gpt2_problems(mc: ModelConfig) -> list[str]:
    """Why ``GPT2LMHeadModel`` cannot compute ``mc``'s function (empty: it can), each naming the field."""
    problems = []
    if mc.position != "learned":
        problems.append(f"model.position={mc.position!r} (GPT-2 has learned positions only)")
    if mc.parallel_residual:
        problems.append("model.parallel_residual=true (GPT-2's residual is sequential)")
    if mc.shared_layernorm:
        problems.append("model.shared_layernorm=true (GPT-2 has two LayerNorms per block)")
    if not mc.bias:
        problems.append("model.bias=false (GPT-2 has biases in every linear and LayerNorm)")
    if mc.attention_width != mc.d_model:
        problems.append(f"model.head_dim={mc.resolved_head_dim} with num_heads={mc.num_heads} is not "
                        f"d_model={mc.d_model} wide (GPT-2 needs head_dim * num_heads == d_model)")
    return problems


def gpt2_config(mc: ModelConfig) -> dict:
    """``GPT2Config`` keyword arguments for ``mc`` (which must have no ``gpt2_problems``)."""
    return dict(vocab_size=mc.vocab_size, n_positions=mc.seq_len, n_embd=mc.d_model, n_layer=mc.num_layers,
                n_head=mc.num_heads, n_inner=mc.ffn_hidden_size, activation_function="gelu_new",
                layer_norm_epsilon=mc.layernorm_eps, initializer_range=mc.init_std,
                # megagpt drops the embedding output and each residual branch, never attention probabilities
                embd_pdrop=mc.dropout, resid_pdrop=mc.dropout, attn_pdrop=0.0,
                tie_word_embeddings=mc.tied_embeddings, bos_token_id=None, eos_token_id=None)


def to_gpt2(weights: dict[str, torch.Tensor], mc: ModelConfig) -> dict[str, torch.Tensor]:
    """megagpt state dict -> ``GPT2LMHeadModel`` state dict (``lm_head.weight`` only when untied)."""
    heads, head_dim, d = mc.num_heads, mc.resolved_head_dim, mc.d_model
    out = {"transformer.wte.weight": weights["layers.0.word_embeddings.weight"][: mc.vocab_size],
           "transformer.wpe.weight": weights["layers.0.position_embeddings.weight"]}
    for ours, theirs in _block_names(mc.num_layers):
        src, dst = f"layers.{ours}.", f"transformer.h.{theirs}."
        for a, b in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2")):
            out[dst + b + ".weight"] = weights[src + a + ".weight"]
            out[dst + b + ".bias"] = weights[src + a + ".bias"]
        # [heads, 3, head_dim] -> [3, heads, head_dim] output features, then Conv1D's [in, out]
        qkv_w = weights[src + "attention.qkv.weight"].view(heads, 3, head_dim, d).transpose(0, 1)
        out[dst + "attn.c_attn.weight"] = qkv_w.reshape(3 * d, d).t()
        out[dst + "attn.c_attn.bias"] = weights[src + "attention.qkv.bias"].view(heads, 3, head_dim) \
            .transpose(0, 1).reshape(3 * d)
        for a, b in (("attention.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[dst + b + ".weight"] = weights[src + a + ".weight"].t()
            out[dst + b + ".bias"] = weights[src + a + ".bias"]
    final = f"layers.{mc.num_layers + 1}."
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = weights[final + "weight"], weights[final + "bias"]
    if not mc.tied_embeddings:
        out["lm_head.weight"] = weights[f"layers.{mc.num_layers + 2}.proj.weight"][: mc.vocab_size]
    return {name: t.contiguous() for name, t in out.items()}


def model_config_from_gpt2(config: dict, source: str, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """The megagpt ModelConfig of a GPT-2 ``config.json``; ValueError naming a field megagpt cannot represent."""
    for field, value in GPT2_REQUIRED.items():
        if config.get(field, value) != value:
            raise ValueError(f"{source}: {field}={config[field]!r} is not supported by megagpt (needs {value!r})")
    activation = config.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise ValueError(f"{source}: activation_function={activation!r} is not supported by megagpt (its GELU is "
                         f"the tanh approximation: one of {list(GPT2_ACTIVATIONS)})")
    d = config["n_embd"]
    inner = config.get("n_inner") or 4 * d
    return ModelConfig(vocab_size=config["vocab_size"], seq_len=config["n_positions"], d_model=d,
                       num_layers=config["n_layer"], num_heads=config["n_head"], mlp_ratio=inner / d,
                       position="learned", parallel_residual=False, shared_layernorm=False, bias=True,
                       tied_embeddings=config.get("tie_word_embeddings", True),
                       dropout=float(config.get("resid_pdrop", 0.0)),
                       layernorm_eps=config.get("layer_norm_epsilon", 1e-5),
                       make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                       init_std=config.get("initializer_range", 0.02))


def from_gpt2(state: dict[str, torch.Tensor], mc: ModelConfig) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` (or ``GPT2Model``: names without ``transformer.``) state dict -> megagpt's."""
    state = {name.removeprefix("transformer."): t for name, t in state.items()}
    take = state.pop  # every tensor is used once; what is left at the end is not GPT-2's
    heads, head_dim, d = mc.num_heads, mc.resolved_head_dim, mc.d_model
    padded = mc.padded_vocab_size
    out = {"layers.0.word_embeddings.weight": pad_rows(take("wte.weight"), padded),
           "layers.0.position_embeddings.weight": take("wpe.weight")}
    for ours, theirs in _block_names(mc.num_layers):
        src, dst = f"h.{theirs}.", f"layers.{ours}."
        for a, b in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2")):
            out[dst + a + ".weight"] = take(src + b + ".weight")
            out[dst + a + ".bias"] = take(src + b + ".bias")
        qkv_w = take(src + "attn.c_attn.weight").t().reshape(3, heads, head_dim, d).transpose(0, 1)
        out[dst + "attention.qkv.weight"] = qkv_w.reshape(3 * d, d)
        out[dst + "attention.qkv.bias"] = take(src + "attn.c_attn.bias").view(3, heads, head_dim) \
            .transpose(0, 1).reshape(3 * d)
        for a, b in (("attention.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[dst + a + ".weight"] = take(src + b + ".weight").t()
            out[dst + a + ".bias"] = take(src + b + ".bias")
    final = f"layers.{mc.num_layers + 1}."
    out[final + "weight"], out[final + "bias"] = take("ln_f.weight"), take("ln_f.bias")
    if not mc.tied_embeddings:
        out[f"layers.{mc.num_layers + 2}.proj.weight"] = pad_rows(take("lm_head.weight"), padded)
    if state:
        raise ValueError(f"tensors that are not GPT-2 parameters: {sorted(state)[:5]}")
    return {name: t.contiguous() for name, t in out.items()}


# ---- custom code (MegaGPTForCausalLM) ---------------------------------------------------------------------
# megagpt block-relative names are kept as they are under model.layers.{i-1}.
def custom_config(mc: ModelConfig) -> dict:
    """``MegaGPTConfig`` keyword arguments for ``mc``."""
    return dict(vocab_size=mc.vocab_size, max_position_embeddings=mc.seq_len, hidden_size=mc.d_model,
                num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads, head_dim=mc.resolved_head_dim,
                intermediate_size=mc.ffn_hidden_size, position_embedding_type=mc.position,
                parallel_residual=mc.parallel_residual, shared_layernorm=mc.shared_layernorm, use_bias=mc.bias,
                layer_norm_eps=mc.layernorm_eps, hidden_dropout=mc.dropout, initializer_range=mc.init_std,
                tie_word_embeddings=mc.tied_embeddings)


def to_custom(weights: dict[str, torch.Tensor], mc: ModelConfig) -> dict[str, torch.Tensor]:
    """megagpt state dict -> ``MegaGPTForCausalLM`` state dict (``lm_head.weight`` only when untied)."""
    L = mc.num_layers
    out = {}
    for name, tensor in weights.items():
        index, rest = name.removeprefix("layers.").split(".", 1)
        index = int(index)
        if index == 0:
            if rest == "word_embeddings.weight":
                tensor = tensor[: mc.vocab_size]
            out[f"model.{rest}"] = tensor
        elif index <= L:
            out[f"model.layers.{index - 1}.{rest}"] = tensor
        elif index == L + 1:
            out[f"model.final_norm.{rest}"] = tensor
        elif index == L + 2 and rest == "proj.weight":
            out["lm_head.weight"] = tensor[: mc.vocab_size]
        else:
            raise ValueError(f"unexpected megagpt parameter {name}")
    return {name: t.contiguous() for name, t in out.items()}


def model_config_from_custom(config: dict, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """The megagpt ModelConfig of one of our custom-code exports' ``config.json``."""
    d = config["hidden_size"]
    return ModelConfig(vocab_size=config["vocab_size"], seq_len=config["max_position_embeddings"], d_model=d,
                       num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                       head_dim=config["head_dim"], mlp_ratio=config["intermediate_size"] / d,
                       position=config["position_embedding_type"], parallel_residual=config["parallel_residual"],
                       shared_layernorm=config["shared_layernorm"], bias=config["use_bias"],
                       tied_embeddings=config.get("tie_word_embeddings", True),
                       dropout=float(config.get("hidden_dropout", 0.0)), layernorm_eps=config["layer_norm_eps"],
                       make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                       init_std=config.get("initializer_range", 0.02))


def from_custom(state: dict[str, torch.Tensor], mc: ModelConfig) -> dict[str, torch.Tensor]:
    """``MegaGPTForCausalLM`` state dict -> megagpt's (vocabulary rows padded with zeros)."""
    L, padded = mc.num_layers, mc.padded_vocab_size
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            if not mc.tied_embeddings:
                out[f"layers.{L + 2}.proj.weight"] = pad_rows(tensor, padded)
        elif name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            out[f"layers.{int(index) + 1}.{rest}"] = tensor
        elif name.startswith("model.final_norm."):
            out[f"layers.{L + 1}.{name.removeprefix('model.final_norm.')}"] = tensor
        elif name == "model.word_embeddings.weight":
            out["layers.0.word_embeddings.weight"] = pad_rows(tensor, padded)
        elif name == "model.position_embeddings.weight":
            out["layers.0.position_embeddings.weight"] = tensor
        else:
            raise ValueError(f"unexpected parameter {name} in a MegaGPT checkpoint")
    return {name: t.contiguous() for name, t in out.items()}


__all__ = ["GPT2_ACTIVATIONS", "GPT2_REQUIRED", "custom_config", "from_custom", "from_gpt2", "gpt2_config",
           "gpt2_problems", "model_config_from_custom", "model_config_from_gpt2", "pad_rows", "to_custom", "to_gpt2"]
