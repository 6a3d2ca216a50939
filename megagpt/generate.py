"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling.

The cache stores every layer's keys and values ``[batch, heads, positions, head_dim]``; each new
token runs the model on that one token only. ALiBi needs nothing extra: the attention backends
treat the queries as the last positions of the cached keys, so the bias ``-slope * (i - j)`` is
computed from absolute positions (megagpt/model/attention.py).
"""
from __future__ import annotations

import operator
from pathlib import Path

import torch

from megagpt.model.gpt import GPT


class LayerKVCache:
    """Keys and values of one layer, ``[batch, heads, max_len, head_dim]``, allocated on first use."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``[batch, heads, new, head_dim]`` after the cached positions; return all of them."""
        end = self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were needed")
        if self.keys is None:
            batch, heads, _, head_dim = keys.shape
            shape = (batch, heads, self.max_len, head_dim)
            self.keys = torch.empty(shape, dtype=keys.dtype, device=keys.device)
            self.values = torch.empty(shape, dtype=values.dtype, device=values.device)
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """One ``LayerKVCache`` per block; ``length`` is the number of positions already cached."""

    def __init__(self, num_layers: int, max_len: int):
        self.layers = [LayerKVCache(max_len) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the smallest set whose probability reaches ``top_p`` (per row)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # the top token always stays
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` ``[batch, vocab]``; ``temperature == 0`` means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def _check_generation_args(model: GPT, prompt_tokens, max_new_tokens, num_samples, temperature, top_k, top_p):
    config = model.config
    if not prompt_tokens:
        raise ValueError("prompt_tokens is empty; give at least one token (e.g. the EOD token)")
    bad = [t for t in prompt_tokens if not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(f"prompt_tokens holds ids outside [0, {config.vocab_size}): {bad[:5]}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    positions = len(prompt_tokens) + max_new_tokens - 1  # the last new token is never fed back
    if config.position == "learned" and positions > config.seq_len:
        raise ValueError(f"prompt ({len(prompt_tokens)} tokens) + max_new_tokens ({max_new_tokens}) needs "
                         f"{positions} positions, but learned positions stop at seq_len={config.seq_len}")


@torch.no_grad()
def generate(model: GPT, prompt_tokens: list[int], max_new_tokens: int, *, num_samples: int = 1,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eod: int | None = None, use_kv_cache: bool = True) -> list[list[int]]:
    """Continue ``prompt_tokens`` ``num_samples`` times; return the new tokens of each sample.

    ``temperature=0`` is greedy. With ``eod`` given a sample stops at its first ``eod`` token,
    which is not returned. ``seed`` makes sampling reproducible. ``use_kv_cache=False`` re-runs
    the whole sequence for every token (slow; the reference the cached path is tested against).
    """
    try:
        prompt_tokens = [operator.index(t) for t in prompt_tokens]  # ints, numpy ints; not floats
    except TypeError:
        raise ValueError(f"prompt_tokens must be integer token ids, got {list(prompt_tokens)[:5]}") from None
    _check_generation_args(model, prompt_tokens, max_new_tokens, num_samples, temperature, top_k, top_p)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    was_training = model.training
    model.eval()
    try:
        tokens = torch.tensor([prompt_tokens] * num_samples, dtype=torch.long, device=device)
        cache = KVCache(len(model.blocks), len(prompt_tokens) + max_new_tokens) if use_kv_cache else None
        finished = torch.zeros(num_samples, dtype=torch.bool, device=device)
        model_input = tokens
        for _ in range(max_new_tokens):
            logits = model(model_input, kv_cache=cache)[:, -1]  # [num_samples, vocab]
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eod is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eod), next_token)
                finished |= next_token == eod
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            model_input = next_token[:, None] if use_kv_cache else tokens
            if eod is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    samples = tokens[:, len(prompt_tokens):].tolist()
    if eod is not None:
        samples = [sample[: sample.index(eod)] if eod in sample else sample for sample in samples]
    return samples


def read_prompt(prompt: str) -> str:
    """The prompt text itself, or the contents of ``path`` for ``FILE:path`` (as nanoGPT's sample.py)."""
    if prompt.startswith("FILE:"):
        path = Path(prompt[len("FILE:"):])
        if not path.is_file():
            raise ValueError(f"prompt file {path} does not exist")
        return path.read_text(encoding="utf-8")
    return prompt


def generate_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int, *, num_samples: int = 1,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stop_at_eod: bool = True, use_kv_cache: bool = True) -> list[str]:
    """Encode ``prompt`` (empty: start from the EOD token), generate, decode the new text of each sample.

    ``tokenizer``: any object with ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` and ``eod``.
    """
    if tokenizer.eod is None and (stop_at_eod or not prompt):
        raise ValueError("the tokenizer has no EOD token: give a non-empty prompt and stop_at_eod=False")
    prompt_tokens = tokenizer.encode(prompt) if prompt else [tokenizer.eod]
    samples = generate(model, prompt_tokens, max_new_tokens, num_samples=num_samples, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, eod=tokenizer.eod if stop_at_eod else None,
                       use_kv_cache=use_kv_cache)
    return [tokenizer.decode(sample) for sample in samples]


def load_model(checkpoint: str | Path, model_config: str | Path | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, attention_backend: str | None = None) -> GPT:
    """A GPT in eval mode from any checkpoint ``megagpt.convert.weights.read_model_weights`` reads: a training
    save or step directory (any layout), a consolidated directory, or a weights file with its ``model_config``."""
    from megagpt.convert.weights import load_gpt

    return load_gpt(checkpoint, model_config, device=device, dtype=dtype, attention_backend=attention_backend)[0]
