"""Log-likelihoods from a GPT: sliding windows over a long token stream, and (context, continuation) pairs.

Sliding windows (the Hugging Face perplexity recipe, with the model's input length as the window). For a stream
of ``n`` tokens the targets are the positions ``1 .. n-1`` (token 0 is never a target: nothing precedes it). The
window ``k`` starts at ``begin = k * stride``; its input is ``tokens[begin:end]`` with
``end = min(begin + seq_length, n - 1)`` and its targets are ``tokens[begin + 1:end + 1]``. It scores only the
targets after the previous window's last one: ``end - previous_end`` of them (all of them in the first window,
``stride`` in a full later one). Windows stop once position ``n - 1`` is scored. So every target is scored exactly
once, ``n - 1`` targets in all, and a target of a later window sees at least ``seq_length - stride + 1`` tokens of
context. ``stride == seq_length`` is plain non-overlapping chunks, the way training sees the data.

(context, continuation) pairs (lm-eval's ``loglikelihood``): the model reads the last ``seq_length`` tokens of
``(context + continuation)[:-1]`` (contexts are truncated on the left) and the continuation's tokens are scored.

The model runs on its device in its dtype; the logits are cast to float32 before the log-softmax. Batches are
right-padded: with causal attention padding after a sequence cannot change its logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from megagpt.evaluation.distributed import Shard

WINDOW_COLUMNS = ("nll", "correct", "tokens")  # the rows ``score_windows`` returns, one per window


@dataclass(frozen=True)
class Window:
    """Input ``tokens[begin:end]``, targets ``tokens[begin + 1:end + 1]``, of which the last ``scored`` count."""

    begin: int
    end: int
    scored: int


def sliding_windows(num_tokens: int, seq_length: int, stride: int | None = None) -> list[Window]:
    """The windows that score every target of a ``num_tokens`` stream once (definition in the module docstring)."""
    stride = seq_length if stride is None else stride
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if not 1 <= stride <= seq_length:
        raise ValueError(f"stride must be in [1, seq_length={seq_length}], got {stride} (a larger stride would "
                         "skip tokens)")
    last = num_tokens - 1  # the last target position
    windows, previous_end, begin = [], 0, 0
    while previous_end < last:
        end = min(begin + seq_length, last)
        windows.append(Window(begin, end, end - previous_end))
        previous_end, begin = end, begin + stride
    return windows


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _target_scores(model: torch.nn.Module, inputs: list[np.ndarray], targets: list[np.ndarray]):
    """Run the right-padded batch; per row: (log-probability of each target, whether it is the argmax), float32."""
    device = model_device(model)
    width = max(len(x) for x in inputs)
    batch = torch.zeros(len(inputs), width, dtype=torch.long)
    target = torch.zeros(len(inputs), width, dtype=torch.long)
    for row, (x, y) in enumerate(zip(inputs, targets)):
        batch[row, :len(x)] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        target[row, :len(y)] = torch.as_tensor(np.asarray(y, dtype=np.int64))
    batch, target = batch.to(device), target.to(device)
    logits = model(batch).float()  # [b, s, vocab]
    picked = logits.gather(-1, target[..., None])[..., 0]
    logprobs = picked - torch.logsumexp(logits, dim=-1)
    correct = logits.argmax(dim=-1) == target  # lm-eval's is_greedy per token (ties: the lowest id wins)
    logprobs, correct = logprobs.cpu().numpy(), correct.cpu().numpy()
    return [(logprobs[row, :len(y)], correct[row, :len(y)]) for row, y in enumerate(targets)]


def _check_tokens(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        bad = int(tokens.max()) if int(tokens.max()) >= vocab_size else int(tokens.min())
        raise ValueError(f"{what} holds token id {bad}, outside the model's vocabulary [0, {vocab_size}): "
                         "wrong tokenizer or data for this checkpoint?")


def score_windows(model: torch.nn.Module, tokens: np.ndarray, windows: Sequence[Window], batch_size: int,
                  shard: Shard = Shard(), progress: bool = False, desc: str = "windows") -> np.ndarray:
    """Per window: summed NLL (nats) of its scored targets, how many of them are the argmax, and their count.

    Returns ``[len(windows), 3]`` float64 (columns ``WINDOW_COLUMNS``), identical on every rank of ``shard``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # every rank checks the whole stream, so that bad data stops all of them before any collective
    _check_tokens(np.asarray(tokens), model.config.vocab_size, desc)
    mine = list(shard.mine(len(windows)))
    rows = np.zeros((len(mine), len(WINDOW_COLUMNS)), dtype=np.float64)
    batches = range(0, len(mine), batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        chunk = [windows[i] for i in mine[start:start + batch_size]]
        inputs = [np.asarray(tokens[w.begin:w.end], dtype=np.int64) for w in chunk]
        targets = [np.asarray(tokens[w.begin + 1:w.end + 1], dtype=np.int64) for w in chunk]
        for offset, (w, (logprobs, correct)) in enumerate(zip(chunk, _target_scores(model, inputs, targets))):
            scored_lp, scored_ok = logprobs[-w.scored:], correct[-w.scored:]
            rows[start + offset] = (-scored_lp.astype(np.float64).sum(), scored_ok.sum(), w.scored)
    return shard.gather(rows, len(windows), len(WINDOW_COLUMNS))


def stream_metrics(rows: np.ndarray, what: str = "the stream") -> dict:
    """tokens, loss (mean NLL in nats), perplexity = exp(loss), accuracy, from ``score_windows`` rows (summed
    in window order, so the result does not depend on the number of ranks)."""
    nll, correct, count = (float(np.sum(rows[:, i])) if len(rows) else 0.0 for i in range(3))
    if count == 0:
        raise ValueError(f"nothing to score in {what}: it needs at least 2 tokens")
    loss = nll / count
    return {"tokens": int(count), "loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "accuracy": correct / count, "nll_sum": nll}


@dataclass(frozen=True)
class ContinuationScore:
    """lm-eval's answer to a loglikelihood request: the continuation's summed log-probability (nats), whether
    greedy decoding reproduces all its tokens, and its length in tokens."""

    logprob: float
    is_greedy: bool
    num_tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as lm-eval makes them: trailing spaces of the context move to the
    continuation, the pair is encoded whole and the continuation is what follows the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = [int(t) for t in tokenizer.encode(context + continuation)]
    context_ids = [int(t) for t in tokenizer.encode(context)]
    continuation_ids = whole[len(context_ids):]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    if not context_ids:  # lm-eval: an empty context is the end-of-document token
        if tokenizer.eod is None:
            raise ValueError("empty context and the tokenizer has no end-of-document token to stand for it")
        context_ids = [int(tokenizer.eod)]
    return context_ids, continuation_ids


def score_continuations(model: torch.nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                        seq_length: int, batch_size: int, shard: Shard = Shard(), progress: bool = False,
                        desc: str = "requests") -> list[ContinuationScore]:
    """Score each ``(context_ids, continuation_ids)``; contexts are left-truncated so that the model reads at
    most ``seq_length`` tokens. Every rank of ``shard`` gets the full list, in request order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prepared = []
    for index, (context, continuation) in enumerate(requests):
        if len(context) == 0 or len(continuation) == 0:
            raise ValueError(f"request {index}: context and continuation must both hold tokens (an empty "
                             "context is the EOD token, as encode_pair makes it)")
        if len(continuation) > seq_length:
            raise ValueError(f"request {index}: a continuation of {len(continuation)} tokens does not fit in "
                             f"seq_length={seq_length}")
        whole = np.asarray([*context, *continuation], dtype=np.int64)[-(seq_length + 1):]
        _check_tokens(whole, model.config.vocab_size, f"request {index}")
        prepared.append((whole[:-1], whole[1:], len(continuation)))
    mine = list(shard.mine(len(prepared)))
    # One forward row per distinct input (multiple-choice answers of one token share their context's row), longest
    # first as lm-eval's HFLM: similar lengths share a batch, and an out-of-memory error shows up at once.
    distinct: dict[bytes, list[int]] = {}
    for j in range(len(mine)):
        distinct.setdefault(prepared[mine[j]][0].tobytes(), []).append(j)
    groups = sorted(distinct.values(), key=lambda js: -len(prepared[mine[js[0]]][0]))
    rows = np.zeros((len(mine), 3), dtype=np.float64)
    device = model_device(model)
    for start in tqdm(range(0, len(groups), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = groups[start:start + batch_size]
        inputs = [prepared[mine[js[0]]][0] for js in chunk]
        batch = torch.zeros(len(inputs), max(len(x) for x in inputs), dtype=torch.long)
        for row, x in enumerate(inputs):
            batch[row, :len(x)] = torch.as_tensor(x)
        with torch.no_grad():
            logits = model(batch.to(device)).float()
        for row, js in enumerate(chunk):
            for j in js:
                _, target, n = prepared[mine[j]]
                # the continuation's n tokens are predicted at the last n input positions
                scored = torch.log_softmax(logits[row, len(target) - n:len(target)], dim=-1)
                wanted = torch.as_tensor(target[-n:], device=scored.device)
                logprob = scored.gather(-1, wanted[:, None]).double().sum().item()
                rows[j] = (logprob, float((scored.argmax(dim=-1) == wanted).all()), n)
    full = shard.gather(rows, len(prepared), 3)
    return [ContinuationScore(float(lp), bool(ok), int(n)) for lp, ok, n in full]
