"""The GPT decoder, written once for every parallel layout.

The model is an ordered list of layers (``gpt_layer_specs``):
    Embedding -> Block x num_layers -> final LayerNorm -> output head (tied: the Embedding again)
``GPT`` builds and runs that list on one device; a pipeline wrapper can turn the same specs
into DeepSpeed ``LayerSpec``/``TiedLayerSpec`` objects. All linears and the vocab embedding come
from a ``LayerFactory`` (megagpt/model/layers.py), so tensor-parallel versions drop in without
touching this file. The model never imports deepspeed and never reads config inside ``forward``.

Activation checkpointing is applied by whoever runs the list, around each ``Block``: ``GPT.forward``
here, ``PipelineModule(activation_checkpoint_interval=1, checkpointable_layers=CHECKPOINTABLE_LAYERS)``
for a pipeline. ``Block`` itself never checkpoints, so the two can never nest.

Tensor layouts: tokens ``[batch, seq]``; hidden states ``[batch, seq, d_model]``; logits
``[batch, seq, vocab_size]`` (padding columns of the padded vocab are never returned).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megagpt.config import ModelConfig
from megagpt.model.alibi import alibi_slopes
from megagpt.model.attention import causal_attention, check_backend_installed
from megagpt.model.fused_ops import LayerNorm
from megagpt.model.layers import LayerFactory


# Class names of the layers that activation checkpointing wraps. DeepSpeed's PipelineModule needs this
# list (``checkpointable_layers``): without it, it checkpoints every layer that has parameters, the
# Embedding with its integer tokens included, and fails ("element 0 of tensors does not require grad").
CHECKPOINTABLE_LAYERS = ("Block",)


def _residual_init_std(config: ModelConfig) -> float:
    # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * layers),
    # since each layer adds two such contributions (attention and MLP).
    return config.init_std / math.sqrt(2 * config.num_layers)


class Embedding(nn.Module):
    """Tokens ``[batch, seq]`` -> hidden ``[batch, seq, d_model]``; with tied embeddings also the output head."""

    def __init__(self, config: ModelConfig, layers: LayerFactory):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.max_positions = config.seq_len if config.position == "learned" else None
        self.layer_factory = layers
        self.word_embeddings = layers.vocab_embedding(config.padded_vocab_size, config.d_model,
                                                      init_std=config.init_std)
        self.position_embeddings = None
        if config.position == "learned":
            self.position_embeddings = nn.Embedding(config.seq_len, config.d_model)
            nn.init.normal_(self.position_embeddings.weight, mean=0.0, std=config.init_std)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """``start_pos``: absolute position of ``tokens[:, 0]`` (non-zero when decoding with a KV cache)."""
        hidden = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            end = start_pos + tokens.shape[1]
            if end > self.max_positions:
                raise ValueError(
                    f"model.position='learned' covers {self.max_positions} positions (model seq_len) but "
                    f"positions up to {end} were asked for; use position='alibi' to run longer sequences")
            positions = torch.arange(start_pos, end, device=tokens.device)
            hidden = hidden + self.position_embeddings(positions)
        return self.dropout(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied output head: hidden ``[..., d_model]`` -> logits ``[..., vocab_size]``."""
        return self.layer_factory.vocab_logits(hidden, self.word_embeddings.weight, self.vocab_size)


class LMHead(nn.Module):
    """Untied output head: hidden ``[..., d_model]`` -> logits ``[..., vocab_size]``."""

    def __init__(self, config: ModelConfig, layers: LayerFactory):
        super().__init__()
        self.vocab_size = config.vocab_size
        self.layer_factory = layers
        self.proj = layers.column_linear(config.d_model, config.padded_vocab_size, bias=False,
                                         init_std=config.init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer_factory.vocab_logits(hidden, self.proj.weight, self.vocab_size)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention: hidden ``[batch, seq, d_model]`` -> same shape.

    ``reduce_output=False``: under tensor parallelism return this rank's partial output projection
    (the parallel residual reduces attention + MLP together, see ``Block``)."""

    def __init__(self, config: ModelConfig, layers: LayerFactory, reduce_output: bool = True):
        super().__init__()
        if config.num_heads % layers.tp_size:
            raise ValueError(f"model.num_heads={config.num_heads} is not divisible by the tensor-parallel "
                             f"size {layers.tp_size}")
        self.num_heads = config.num_heads // layers.tp_size  # heads of this rank
        self.head_dim = config.resolved_head_dim
        self.backend = config.attention_backend
        if self.backend != "auto":
            check_backend_installed(self.backend, self.head_dim)
        # The fused QKV output is laid out [heads, 3, head_dim] so that splitting it by output
        # features across tensor-parallel ranks gives every rank whole heads (Megatron's layout).
        self.qkv = layers.column_linear(config.d_model, 3 * config.attention_width, bias=config.bias,
                                        init_std=config.init_std)
        self.proj = layers.row_linear(config.attention_width, config.d_model, bias=config.bias,
                                      init_std=_residual_init_std(config), reduce_output=reduce_output)
        self.slopes = None  # a plain attribute, not a buffer: .to(bf16) must not round the slopes
        if config.position == "alibi":
            self.slopes = alibi_slopes(config.num_heads, layers.tp_rank * self.num_heads, self.num_heads)
        self._slopes_on_device: dict[torch.device, torch.Tensor] = {}

    def _apply(self, *args, **kwargs):
        # Every move of the module (.to, .cuda, DeepSpeed's .bfloat16) passes here: cache the fp32 slopes on the
        # parameters' new device now, in eager code. Under torch.compile the forward only reads the cache; a
        # copy inside the forward would be a host-to-device copy (a sync) per layer per micro batch.
        module = super()._apply(*args, **kwargs)
        self._slopes_for(self.qkv.weight.device)  # eager here, so it fills the cache
        return module

    def _slopes_for(self, device: torch.device) -> torch.Tensor | None:
        if self.slopes is None:
            return None
        slopes = self._slopes_on_device.get(device)
        if slopes is None:
            slopes = self.slopes.to(device)
            # Under torch.compile, filling the cache is a side effect that Dynamo refuses inside a checkpointed
            # block (it falls back to eager for the whole forward); ``_apply`` fills it for the module's device.
            if not torch.compiler.is_compiling():
                self._slopes_on_device[device] = slopes
        return slopes

    def forward(self, hidden: torch.Tensor, kv_cache: Any = None) -> torch.Tensor:
        """``kv_cache``: this layer's cache, an object whose ``append(k, v)`` returns all keys and values."""
        batch, seq, _ = hidden.shape
        qkv = self.qkv(hidden).view(batch, seq, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [batch, heads, seq, head_dim]
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # [batch, heads, cached + seq, head_dim]
        out = causal_attention(q, k, v, self._slopes_for(q.device), backend=self.backend)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.proj(out)


class MLP(nn.Module):
    """GELU MLP (GPT-2's tanh approximation): hidden ``[..., d_model]`` -> same shape."""

    def __init__(self, config: ModelConfig, layers: LayerFactory, reduce_output: bool = True):
        super().__init__()
        self.fc = layers.column_linear(config.d_model, config.ffn_hidden_size, bias=config.bias,
                                       init_std=config.init_std)
        self.proj = layers.row_linear(config.ffn_hidden_size, config.d_model, bias=config.bias,
                                      init_std=_residual_init_std(config), reduce_output=reduce_output)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(hidden), approximate="tanh"))


class Block(nn.Module):
    """One transformer layer, pre-LayerNorm, sequential (GPT-2) or parallel residual.

    sequential: ``x = x + attn(ln_attn(x)); x = x + mlp(ln_mlp(x))``
    parallel:   ``x + (attn(ln_attn(x)) + mlp(ln_mlp(x)))``, or ``ln_attn`` for both when shared.

    Under tensor parallelism the parallel residual sums the attention and MLP partial outputs first
    and all-reduces once per layer instead of twice (dropout is linear once its mask is drawn, and
    the ranks of a tensor-parallel group draw the same masks).
    """

    def __init__(self, config: ModelConfig, layers: LayerFactory):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.layer_factory = layers
        self.ln_attn = LayerNorm(config.d_model, eps=config.layernorm_eps, bias=config.bias,
                                 fused=config.fused_kernels)
        self.ln_mlp = None
        if not config.shared_layernorm:
            self.ln_mlp = LayerNorm(config.d_model, eps=config.layernorm_eps, bias=config.bias,
                                    fused=config.fused_kernels)
        self.attention = SelfAttention(config, layers, reduce_output=not config.parallel_residual)
        self.mlp = MLP(config, layers, reduce_output=not config.parallel_residual)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden: torch.Tensor, kv_cache: Any = None) -> torch.Tensor:
        if self.parallel_residual:
            attn_in = self.ln_attn(hidden)
            mlp_in = attn_in if self.ln_mlp is None else self.ln_mlp(hidden)
            return hidden + self.layer_factory.reduce(self.dropout(self.attention(attn_in, kv_cache))
                                                      + self.dropout(self.mlp(mlp_in)))
        hidden = hidden + self.dropout(self.attention(self.ln_attn(hidden), kv_cache))
        return hidden + self.dropout(self.mlp(self.ln_mlp(hidden)))


@dataclass(frozen=True)
class LayerSpec:
    """One not-yet-built layer of the model's ordered layer list.

    ``tied_key``: layers with the same key share one module (the tied embedding / output head);
    ``tied_weight_attr`` is the dotted name of the shared weight (for a pipeline's gradient sync);
    ``forward_method``: the method called at this position (the tied head calls ``logits``).
    """

    module_class: type
    kwargs: dict = field(default_factory=dict)
    tied_key: str | None = None
    tied_weight_attr: str | None = None
    forward_method: str = "forward"

    def build(self) -> nn.Module:
        """Construct the module."""
        return self.module_class(**self.kwargs)


def gpt_layer_specs(config: ModelConfig, layers: LayerFactory | None = None) -> list[LayerSpec]:
    """The model as an ordered list: embedding, ``num_layers`` blocks, final LayerNorm, output head."""
    layers = layers if layers is not None else LayerFactory()
    common = {"config": config, "layers": layers}
    tied_key = "embedding" if config.tied_embeddings else None
    tied_attr = "word_embeddings.weight" if config.tied_embeddings else None
    specs = [LayerSpec(Embedding, common, tied_key=tied_key, tied_weight_attr=tied_attr)]
    specs += [LayerSpec(Block, common) for _ in range(config.num_layers)]
    specs.append(LayerSpec(LayerNorm, {"normalized_shape": config.d_model, "eps": config.layernorm_eps,
                                       "bias": config.bias, "fused": config.fused_kernels}))
    if config.tied_embeddings:
        specs.append(LayerSpec(Embedding, common, tied_key=tied_key, tied_weight_attr=tied_attr,
                               forward_method="logits"))
    else:
        specs.append(LayerSpec(LMHead, common))
    return specs


class GPT(nn.Module):
    """The decoder: tokens ``[batch, seq]`` -> logits ``[batch, seq, vocab_size]``. With a tensor-parallel
    ``layers`` factory each rank holds its slice and ``forward`` returns its vocabulary shard of the
    logits: train with ``loss`` and sample from ``gather_logits``, which work in either case.

    Parameters live in ``self.layers`` (built from ``gpt_layer_specs``); a tied head is not stored
    twice, so the state dict holds each tensor once.

    ``init_seed``: seed layer ``i`` of the list with ``init_seed + i`` before building it, so that any
    partition of the list into pipeline stages builds the same weights (None: draw every layer from
    the global RNG in turn).

    ``activation_checkpointing``: when true, a training forward (``self.training``, grad enabled, no
    KV cache) keeps only each Block's input and recomputes the Block's activations during backward
    (``torch.utils.checkpoint``, non-reentrant). It is a runtime switch, not part of ``ModelConfig``:
    it trades compute for memory and computes the same values; eval, generation and weights are unaffected.
    """

    def __init__(self, config: ModelConfig, layers: LayerFactory | None = None, *,
                 activation_checkpointing: bool = False, init_seed: int | None = None):
        super().__init__()
        self.config = config
        self.layer_factory = layers if layers is not None else LayerFactory()
        self.activation_checkpointing = activation_checkpointing
        self.layers = nn.ModuleList()
        built_by_key: dict[str, int] = {}
        for index, spec in enumerate(gpt_layer_specs(config, self.layer_factory)):
            if spec.tied_key is not None and spec.tied_key in built_by_key:
                continue
            if init_seed is not None:  # as a pipeline stage builds it (megagpt/parallel/pipeline.py)
                torch.manual_seed(init_seed + index)
            self.layers.append(spec.build())
            if spec.tied_key is not None:
                built_by_key[spec.tied_key] = len(self.layers) - 1
        self._num_blocks = config.num_layers
        self._tied_head = config.tied_embeddings

    @property
    def embedding(self) -> Embedding:
        return self.layers[0]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers[1: 1 + self._num_blocks]

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.layers[1 + self._num_blocks]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[..., d_model]`` -> logits ``[..., vocab_size]``."""
        if self._tied_head:
            return self.embedding.logits(hidden)
        return self.layers[2 + self._num_blocks](hidden)

    def forward(self, tokens: torch.Tensor, kv_cache: Any = None) -> torch.Tensor:
        """Logits for ``tokens``.

        ``kv_cache`` (see megagpt/generate.py): holds keys/values of earlier positions in
        ``.layers[i]`` and their count in ``.length``; ``tokens`` then continue after them.
        """
        start_pos = 0 if kv_cache is None else kv_cache.length
        hidden = self.embedding(tokens, start_pos)
        # Checkpoint only when a backward can follow: in eval or under no_grad nothing is saved anyway,
        # and a KV cache is appended to in forward, so a recompute would append twice.
        recompute = (self.activation_checkpointing and self.training and kv_cache is None
                     and torch.is_grad_enabled())
        for i, block in enumerate(self.blocks):
            if recompute:
                # use_reentrant=False: works when the block input needs no grad, supports torch.compile;
                # preserve_rng_state (default True) replays the same dropout masks on recompute.
                hidden = checkpoint(block, hidden, use_reentrant=False)
            else:
                hidden = block(hidden, None if kv_cache is None else kv_cache.layers[i])
        return self.head(self.final_norm(hidden))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy of ``forward``'s logits (vocab-parallel under tensor parallelism:
        the logits are then this rank's vocabulary shard and are never gathered). With ``model.fused_kernels``
        the single-shard loss runs the fused Triton cross-entropy on CUDA."""
        return self.layer_factory.loss(logits, targets, ignore_index, fused=self.config.fused_kernels)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full ``[..., vocab_size]`` logits from ``forward``'s (a no-op without tensor parallelism)."""
        return self.layer_factory.gather_logits(logits, self.config.vocab_size)

    def num_parameters(self) -> int:
        """Number of distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())
