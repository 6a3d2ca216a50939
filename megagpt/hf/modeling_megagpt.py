"""A megagpt GPT as Hugging Face custom code: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

Copied into every ``arch="custom"`` export (megagpt/hf/export.py). It imports only torch and transformers (the
people who load an export do not have megagpt installed) and computes exactly megagpt's function
(megagpt/model/gpt.py) for every model config:

* positions: ALiBi, learned, or none. ALiBi adds ``-slope_h * (i - j)`` to the score of query ``i`` and key
  ``j`` AFTER the ``1/sqrt(head_dim)`` scaling, in float32 (megagpt/model/attention.py). Falcon adds it before
  the scaling and in the model dtype, BLOOM and MPT differ in their norms and residuals: none of them is this
  function, hence this file.
* residual: sequential (GPT-2) ``x + attn(ln_attn(x))`` then ``+ mlp(ln_mlp(x))``, or parallel
  ``x + attn(ln_attn(x)) + mlp(ln_mlp(x))`` (``ln_attn`` feeding both with ``shared_layernorm``);
* biases or none, ``head_dim * heads`` free of ``hidden_size``, tied or untied output head, tanh GELU.

The fused QKV projection keeps megagpt's layout: output features ``[heads, 3 (q, k, v), head_dim]``.
Attention scores, bias and softmax are computed in float32 whatever the weights' dtype, as megagpt's reference
backend does. Generation uses transformers' ``Cache`` (``DynamicCache.update(key, value, layer_idx)``), passed as
``cache`` (transformers >= 5.2x) or ``past_key_values`` (earlier releases; both are accepted, and outputs use
the field name the installed transformers declares);
``attention_mask`` masks padding keys, which is exact for left padding: ALiBi depends on ``i - j`` only, and
learned positions are taken from ``position_ids`` (``generate`` derives them from the mask).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_megagpt import MegaGPTConfig

# transformers renamed the cache argument and output field from ``past_key_values`` to ``cache`` (5.2x); the old
# names still work there with a deprecation warning. Use whichever the installed release declares.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _the_cache(cache, past_key_values):
    if cache is not None and past_key_values is not None:
        raise ValueError("give the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


# ---- ALiBi (Press et al., 2022), as megagpt/model/alibi.py ------------------------------------------------
def _power_of_two_slopes(num_heads):
    start = 2.0 ** (-(2.0 ** -(math.log2(num_heads) - 3)))
    return [start * start**k for k in range(num_heads)]


def alibi_slopes(num_heads):
    """The authors' slopes: a geometric sequence; for a head count that is not a power of two, the nearest
    smaller power of two's slopes, then every other slope of the next larger one."""
    if math.log2(num_heads).is_integer():
        return _power_of_two_slopes(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return _power_of_two_slopes(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def attention_bias(slopes, past, seq, key_mask, device):
    """Additive float32 bias ``[batch or 1, heads or 1, seq, past + seq]``: ALiBi, the causal mask and padding.

    Queries are the last ``seq`` of the ``past + seq`` keys. Padding keys get the most negative finite float, not
    -inf: a padding query whose every visible key is padding then gets finite (unused) values instead of NaN,
    which the next layer would spread into real positions through ``0 * NaN``."""
    total = past + seq
    query_pos = torch.arange(past, total, device=device, dtype=torch.float32)
    key_pos = torch.arange(total, device=device, dtype=torch.float32)
    distance = query_pos[:, None] - key_pos[None, :]  # [seq, total], i - j
    if slopes is None:
        bias = torch.zeros(1, 1, seq, total, device=device, dtype=torch.float32)
    else:
        bias = (-slopes[:, None, None] * distance[None])[None]  # [1, heads, seq, total]
    if key_mask is not None:
        bias = bias.masked_fill(~key_mask[:, None, None, :], torch.finfo(torch.float32).min)
    return bias.masked_fill(distance < 0, float("-inf"))


# ---- layers -----------------------------------------------------------------------------------------------
class MegaGPTAttention(nn.Module):
    """Causal self-attention with megagpt's fused QKV layout; hidden ``[b, s, d]`` -> same shape."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        width = self.num_heads * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * width, bias=config.use_bias)
        self.proj = nn.Linear(width, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden, bias, past_key_values=None):
        batch, seq, _ = hidden.shape
        qkv = self.qkv(hidden).view(batch, seq, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, heads, seq, head_dim]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        # float32 math (megagpt's reference backend): the ALiBi bias reaches thousands at long contexts.
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias,
                                             scale=1.0 / math.sqrt(self.head_dim))
        out = out.to(hidden.dtype).transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.proj(out)


class MegaGPTMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.use_bias)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden):
        return self.proj(F.gelu(self.fc(hidden), approximate="tanh"))


class MegaGPTBlock(nn.Module):
    """Pre-LayerNorm block, sequential or parallel residual (megagpt/model/gpt.py ``Block``)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.ln_attn = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.use_bias)
        self.ln_mlp = None
        if not config.shared_layernorm:
            self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.use_bias)
        self.attention = MegaGPTAttention(config, layer_idx)
        self.mlp = MegaGPTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden, bias, past_key_values=None):
        if self.parallel_residual:
            attn_in = self.ln_attn(hidden)
            mlp_in = attn_in if self.ln_mlp is None else self.ln_mlp(hidden)
            return hidden + (self.dropout(self.attention(attn_in, bias, past_key_values))
                             + self.dropout(self.mlp(mlp_in)))
        hidden = hidden + self.dropout(self.attention(self.ln_attn(hidden), bias, past_key_values))
        return hidden + self.dropout(self.mlp(self.ln_mlp(hidden)))


# ---- models -----------------------------------------------------------------------------------------------
class MegaGPTPreTrainedModel(PreTrainedModel):
    config_class = MegaGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["MegaGPTBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]


class MegaGPTModel(MegaGPTPreTrainedModel):
    """Embeddings, blocks and the final LayerNorm: ``input_ids [b, s]`` -> hidden ``[b, s, hidden_size]``."""

    def __init__(self, config):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = None
        if config.position_embedding_type == "learned":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(MegaGPTBlock(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.use_bias)
        self._slopes = {}  # per device; a plain dict, not a buffer: casting the model must not round the slopes
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def _slopes_on(self, device):
        if self.config.position_embedding_type != "alibi":
            return None
        if device not in self._slopes:
            self._slopes[device] = torch.tensor(alibi_slopes(self.config.num_attention_heads),
                                                dtype=torch.float32, device=device)
        return self._slopes[device]

    def _positions(self, position_ids, attention_mask, past, seq, device):
        if position_ids is None:
            if attention_mask is not None:  # left padding: count real tokens, as generate() does
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(past, past + seq, device=device)[None]
        limit = self.config.max_position_embeddings
        if int(position_ids.max()) >= limit:
            raise ValueError(f"learned positions cover {limit} positions (max_position_embeddings) but position "
                             f"{int(position_ids.max())} was asked for")
        return self.position_embeddings(position_ids)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None, cache=None,
                **kwargs):
        past_key_values = _the_cache(cache, past_key_values)
        if kwargs.get("output_attentions"):
            raise ValueError("MegaGPT does not return attention weights (output_attentions=True)")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_hidden_states = (self.config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise ValueError("past_key_values must be a transformers Cache (e.g. DynamicCache), not "
                             f"{type(past_key_values).__name__}")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        hidden = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = hidden.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (batch, past + seq):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                 f"{(batch, past + seq)} (cached + new positions)")
            key_mask = attention_mask.bool()
            if bool(key_mask.all()):
                key_mask = None
        if self.position_embeddings is not None:
            hidden = hidden + self._positions(position_ids, attention_mask, past, seq, hidden.device)
        hidden = self.dropout(hidden)
        bias = attention_bias(self._slopes_on(hidden.device), past, seq, key_mask, hidden.device)
        all_hidden = (hidden,) if output_hidden_states else None
        for block in self.layers:
            hidden = block(hidden, bias, past_key_values)
            if output_hidden_states:
                all_hidden += (hidden,)
        hidden = self.final_norm(hidden)
        if output_hidden_states:  # as GPT-2: the last entry is after the final norm
            all_hidden = all_hidden[:-1] + (hidden,)
        output = BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=all_hidden,
                                         **{CACHE_FIELD: past_key_values if use_cache else None})
        return output if return_dict else output.to_tuple()


class MegaGPTForCausalLM(MegaGPTPreTrainedModel, GenerationMixin):
    """``MegaGPTModel`` and the output head (tied to the word embeddings unless ``tie_word_embeddings`` is
    false); ``labels`` give the mean next-token cross-entropy (shifted inside, -100 ignored), in float32."""

    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MegaGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def set_input_embeddings(self, value):
        self.model.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0, cache=None, **kwargs):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=_the_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, return_dict=True,
                         output_attentions=kwargs.get("output_attentions"))
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:  # generate() needs the last position only
            hidden = hidden[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            targets = labels[:, 1:].reshape(-1).to(logits.device)
            num_items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(shifted, targets, ignore_index=-100,
                                   reduction="mean" if num_items is None else "sum")
            if num_items is not None:  # Trainer's gradient-accumulation-aware normalisation
                loss = loss / num_items
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        return output if return_dict else output.to_tuple()


__all__ = ["MegaGPTForCausalLM", "MegaGPTModel", "MegaGPTPreTrainedModel"]
