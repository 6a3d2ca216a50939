"""megagpt/evaluation/scoring.py: sliding windows against a naive per-token computation, continuation scores."""
import math

import numpy as np
import pytest
import torch

from megagpt.data.tokenizers import ByteLevelTokenizer
from megagpt.evaluation import (encode_pair, score_continuations, score_windows, sliding_windows,
                                stream_metrics)


def naive_token_nll(model, tokens: np.ndarray, seq_length: int, stride: int) -> tuple[list[int], list[float],
                                                                                       list[bool]]:
    """For every target t = 1..n-1 on its own: its window is the first k with t <= k * stride + seq_length (the
    first window whose inputs reach it and that has moved past the previous window's targets); its context is
    tokens[k * stride:t]. Returns (window of each target, NLL, argmax hit), one unbatched forward per target."""
    windows, nll, hits = [], [], []
    for t in range(1, len(tokens)):
        k = max(0, math.ceil((t - seq_length) / stride))
        context = torch.as_tensor(tokens[k * stride:t])[None]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(context)[0, -1].double(), dim=-1)
        windows.append(k)
        nll.append(-logprobs[int(tokens[t])].item())
        hits.append(int(logprobs.argmax()) == int(tokens[t]))
    return windows, nll, hits


@pytest.mark.parametrize("seq_length,stride,length", [(8, 8, 30), (8, 3, 30), (8, 1, 13), (16, 5, 40),
                                                      (32, 32, 20), (4, 4, 5)])
def test_sliding_windows_match_naive_per_token_nll(byte_model, seq_length, stride, length):
    rng = np.random.default_rng(length + stride)
    tokens = rng.integers(0, 257, length)
    windows = sliding_windows(length, seq_length, stride)
    assert all(w.end - w.begin <= seq_length for w in windows)
    rows = score_windows(byte_model, tokens, windows, batch_size=3)
    owner, nll, hits = naive_token_nll(byte_model, tokens, seq_length, stride)
    assert int(rows[:, 2].sum()) == length - 1  # every target once, token 0 never
    expected = np.zeros((len(windows), 3))
    for k, value, hit in zip(owner, nll, hits):
        expected[k] += (value, hit, 1)
    diff = np.abs(rows[:, 0] - expected[:, 0]).max()
    assert diff < 1e-4, f"per-window NLL differs from the naive per-token computation by {diff:.3g}"
    np.testing.assert_array_equal(rows[:, 1:], expected[:, 1:])
    metrics = stream_metrics(rows)
    assert metrics["tokens"] == length - 1
    assert abs(metrics["loss"] - sum(nll) / (length - 1)) < 1e-5
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


def test_learned_positions_windows_start_at_position_zero(make_model):
    model = make_model(position="learned", parallel_residual=False)
    tokens = np.random.default_rng(1).integers(0, 257, 50)
    rows = score_windows(model, tokens, sliding_windows(50, 32, 7), batch_size=4)
    _, nll, _ = naive_token_nll(model, tokens, 32, 7)
    diff = abs(rows[:, 0].sum() - sum(nll))
    assert diff < 1e-4, f"learned-position model: total NLL differs from the naive one by {diff:.3g}"


def test_sliding_windows_bad_arguments():
    assert sliding_windows(1, 8) == [] and sliding_windows(0, 8) == []
    with pytest.raises(ValueError, match="stride must be in"):
        sliding_windows(100, 8, 9)
    with pytest.raises(ValueError, match="stride must be in"):
        sliding_windows(100, 8, 0)
    with pytest.raises(ValueError, match="nothing to score in the stream: it needs at least 2 tokens"):
        stream_metrics(np.zeros((0, 3)))


def test_score_continuations_match_naive_and_truncate_left(byte_model, naive_logprob):
    tok = ByteLevelTokenizer()
    pairs = [("the cat sat on the", " mat"), ("a", " b"), ("x" * 40, " long context"), ("hello ", "world")]
    requests = [encode_pair(tok, c, x) for c, x in pairs]
    assert requests[3] == (list(b"hello"), list(b" world"))  # the context's trailing space moves over
    scores = score_continuations(byte_model, requests, seq_length=32, batch_size=2)
    for (context, continuation), score in zip(requests, scores):
        kept = (context + continuation)[-33:]  # the model reads the last 32 inputs
        expected, greedy = naive_logprob(byte_model, kept[:-len(continuation)], continuation)
        assert abs(score.logprob - expected) < 1e-4, f"logprob {score.logprob} vs naive {expected}"
        assert score.is_greedy == greedy and score.num_tokens == len(continuation)
    with pytest.raises(ValueError, match="does not fit in seq_length"):
        score_continuations(byte_model, [([1], list(range(40)))], seq_length=32, batch_size=1)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        score_continuations(byte_model, [([1], [300])], seq_length=32, batch_size=1)
