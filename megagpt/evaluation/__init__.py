"""Evaluation of a megagpt checkpoint: perplexity-style metrics over text and indexed data (sliding windows),
LAMBADA and multiple-choice tasks scored lm-eval style, data-parallel over ranks. ``tools/evaluate.py`` is the
command line; docs/evaluation.md defines every metric.

Building blocks other tools share (e.g. an lm-eval adapter):

* ``score_continuations(model, [(context_ids, continuation_ids)], seq_length, batch_size)`` ->
  ``[ContinuationScore(logprob, is_greedy, num_tokens)]``: lm-eval's ``loglikelihood``;
* ``encode_pair(tokenizer, context, continuation)``: lm-eval's tokenization of such a pair;
* ``sliding_windows(num_tokens, seq_length, stride)`` + ``score_windows(model, tokens, windows, batch_size)`` ->
  per-window ``[nll, correct, tokens]`` rows; ``stream_metrics(rows)`` -> loss, perplexity, accuracy
  (lm-eval's ``loglikelihood_rolling`` is the ``nll`` sum with an EOD token put before the text).

Each takes an optional ``Shard`` (``setup_shard()`` under torchrun/deepspeed) and returns the same full result
on every rank.
"""
from megagpt.evaluation.distributed import Shard, setup_shard, teardown
from megagpt.evaluation.report import format_table, plot_sweep, write_json
from megagpt.evaluation.runner import (EvalSettings, EvalTasks, check_lengths, checkpoint_home, checkpoint_step,
                                       evaluate_model)
from megagpt.evaluation.scoring import (ContinuationScore, Window, encode_pair, score_continuations, score_windows,
                                        sliding_windows, stream_metrics)
from megagpt.evaluation.tasks import (MC_FORMATS, Choices, evaluate_lambada, evaluate_multiple_choice, lambada_pair,
                                      read_multiple_choice)
from megagpt.evaluation.text import evaluate_data, evaluate_text, split_tokens

__all__ = ["Choices", "ContinuationScore", "EvalSettings", "EvalTasks", "MC_FORMATS", "Shard", "Window",
           "check_lengths", "checkpoint_home", "checkpoint_step", "encode_pair", "evaluate_data",
           "evaluate_lambada", "evaluate_model", "evaluate_multiple_choice", "evaluate_text", "format_table",
           "lambada_pair", "plot_sweep", "read_multiple_choice", "score_continuations", "score_windows",
           "setup_shard", "sliding_windows", "split_tokens", "stream_metrics", "teardown", "write_json"]
