"""Zero-shot tasks scored from log-likelihoods, as lm-evaluation-harness scores them: LAMBADA and multiple choice.

LAMBADA (``{"text": ...}`` per line): the target is the last word with its leading space, the context the text
before it. accuracy: greedy decoding (teacher-forced argmax) reproduces every target token; perplexity:
``exp(-mean over examples of the target's summed log-likelihood)`` (lm-eval's definition); loss: the target's
mean NLL per token over all examples.

Multiple choice: every choice is a (context, continuation) pair; the answer is the choice with the highest summed
log-likelihood (acc), that sum divided by the choice's length in characters (acc_norm, lm-eval's), or by its
length in tokens (acc_per_token). Layouts (``auto`` picks one from the first line's keys):

* piqa ``{"goal", "sol1", "sol2", "label"}``: context ``"Question: {goal}\\nAnswer:"``, continuations
  ``" " + sol``;
* hellaswag ``{"ctx" or "ctx_a" + "ctx_b", "endings", "label"}`` (optional ``"activity_label"``): lm-eval's
  preprocessing (``ctx_a + " " + ctx_b.capitalize()``, ``" [title]"`` -> ``". "``, other ``[...]`` removed);
* winogrande ``{"sentence" with one "_", "option1", "option2", "answer": "1"|"2"}``: partial scoring, context =
  the sentence up to ``_`` with the option filled in, continuation = ``" " + the rest`` (the same for both, so
  acc_norm = acc);
* generic ``{"context", "choices": [...], "label"}``: continuations ``" " + choice``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megagpt.evaluation.distributed import Shard
from megagpt.evaluation.scoring import encode_pair, score_continuations

MC_FORMATS = ("piqa", "hellaswag", "winogrande", "generic")


def read_jsonl(path: str | Path, flag: str, limit: int | None = None) -> list[tuple[int, dict]]:
    """``(line number, object)`` for the first ``limit`` non-blank lines; ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path} does not exist")
    records = []
    with open(path, encoding="utf-8-sig") as f:  # a leading BOM is a marker, not data
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    if not records:
        raise ValueError(f"{flag} {path} holds no examples")
    return records


def _field(path, lineno, record: dict, name: str, kind=str):
    value = record.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{path}:{lineno}: field {name!r} must be a {getattr(kind, '__name__', kind)}, got "
                         f"{value!r:.60}")
    return value


def lambada_pair(path, lineno: int, record: dict) -> tuple[str, str]:
    """(context, target) of one LAMBADA line: the target is the last word with its leading space."""
    text = _field(path, lineno, record, "text")
    context, space, word = text.rpartition(" ")
    if not space or not context or not word:
        raise ValueError(f"{path}:{lineno}: 'text' needs a context and a last word separated by a space")
    return context, " " + word


def evaluate_lambada(model, tokenizer, path: str | Path, seq_length: int, batch_size: int, shard: Shard = Shard(),
                     limit: int | None = None, progress: bool = False) -> dict:
    """The ``lambada:<file name>`` result: examples, accuracy, perplexity, loss (nats per target token)."""
    pairs = [lambada_pair(path, lineno, r) for lineno, r in read_jsonl(path, "--lambada", limit)]
    requests = [encode_pair(tokenizer, context, target) for context, target in pairs]
    scores = score_continuations(model, requests, seq_length, batch_size, shard, progress,
                                 desc=f"lambada {Path(path).name}")
    logprobs = np.array([s.logprob for s in scores])
    mean_logprob = float(np.mean(logprobs))
    return {"task": f"lambada:{Path(path).name}", "kind": "lambada", "seq_length": seq_length,
            "examples": len(scores), "accuracy": float(np.mean([s.is_greedy for s in scores])),
            "perplexity": math.exp(-mean_logprob) if -mean_logprob < 700 else math.inf,
            "loss": float(-logprobs.sum() / sum(s.num_tokens for s in scores))}


@dataclass(frozen=True)
class Choices:
    """One multiple-choice example: a (context, continuation) per choice, the right index, and the length in
    characters acc_norm divides by."""

    contexts: list[str]
    continuations: list[str]
    label: int
    norm_chars: list[int]


def detect_format(path, lineno: int, record: dict) -> str:
    """The layout of a multiple-choice file from the keys of its first line."""
    keys = set(record)
    for name, needed in (("piqa", {"goal", "sol1", "sol2"}), ("hellaswag", {"endings"}),
                         ("winogrande", {"sentence", "option1", "option2"}), ("generic", {"context", "choices"})):
        if needed <= keys:
            return name
    raise ValueError(f"{path}:{lineno}: cannot tell the multiple-choice layout from the keys {sorted(keys)}; "
                     f"give --mc-format one of {list(MC_FORMATS)} and the keys docs/evaluation.md lists")


def _label(path, lineno, record, name: str, num_choices: int, base: int = 0) -> int:
    value = record.get(name)
    try:
        label = int(value) - base  # hellaswag and winogrande store labels as strings
    except (TypeError, ValueError):
        label = -1
    if isinstance(value, bool) or not 0 <= label < num_choices:
        raise ValueError(f"{path}:{lineno}: field {name!r} = {value!r} is not a valid answer for "
                         f"{num_choices} choices")
    return label


def _hellaswag_clean(text: str) -> str:
    # lm-eval's preprocess: the brackets are artifacts of the WikiHow part of HellaSwag
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _generic_choices(path, lineno, context: str, choices, label_field, record) -> Choices:
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{path}:{lineno}: the choices must be a list of at least 2 non-empty strings")
    label = _label(path, lineno, record, label_field, len(choices))
    return Choices([context] * len(choices), [" " + c for c in choices], label, [len(c) for c in choices])


def mc_example(path, lineno: int, record: dict, fmt: str) -> Choices:
    """The ``Choices`` of one line in layout ``fmt``; ValueError naming the file, line and field."""
    if fmt == "piqa":
        goal = _field(path, lineno, record, "goal")
        sols = [_field(path, lineno, record, "sol1"), _field(path, lineno, record, "sol2")]
        return _generic_choices(path, lineno, f"Question: {goal}\nAnswer:", sols, "label", record)
    if fmt == "hellaswag":
        if "ctx_a" in record:
            ctx = _field(path, lineno, record, "ctx_a") + " " + _field(path, lineno, record, "ctx_b").capitalize()
        else:
            ctx = _field(path, lineno, record, "ctx")
        if "activity_label" in record:
            ctx = _field(path, lineno, record, "activity_label") + ": " + ctx
        endings = record.get("endings")
        endings = [_hellaswag_clean(e) for e in endings] if isinstance(endings, list) and all(
            isinstance(e, str) for e in endings) else endings
        return _generic_choices(path, lineno, _hellaswag_clean(ctx), endings, "label", record)
    if fmt == "winogrande":
        sentence = _field(path, lineno, record, "sentence")
        if sentence.count("_") != 1:
            raise ValueError(f"{path}:{lineno}: 'sentence' must hold exactly one '_' (the blank)")
        blank = sentence.index("_")
        rest = sentence[blank + 1:].strip()
        if not rest:
            raise ValueError(f"{path}:{lineno}: nothing follows the blank in 'sentence' to score")
        options = [_field(path, lineno, record, "option1"), _field(path, lineno, record, "option2")]
        label = _label(path, lineno, record, "answer", 2, base=1)
        return Choices([sentence[:blank] + o for o in options], [" " + rest] * 2, label, [len(rest)] * 2)
    if fmt == "generic":
        return _generic_choices(path, lineno, _field(path, lineno, record, "context"), record.get("choices"),
                                "label", record)
    raise ValueError(f"--mc-format {fmt!r} is not one of {['auto', *MC_FORMATS]}")


def read_multiple_choice(path: str | Path, fmt: str = "auto", limit: int | None = None) -> tuple[str, list[Choices]]:
    """The layout (detected when ``auto``) and the examples of a multiple-choice JSONL file."""
    records = read_jsonl(path, "--multiple-choice", limit)
    if fmt == "auto":
        fmt = detect_format(path, *records[0])
    return fmt, [mc_example(path, lineno, record, fmt) for lineno, record in records]


def evaluate_multiple_choice(model, tokenizer, path: str | Path, seq_length: int, batch_size: int,
                             fmt: str = "auto", shard: Shard = Shard(), limit: int | None = None,
                             progress: bool = False) -> dict:
    """The ``mc:<file name>`` result: format, examples, acc, acc_norm, acc_per_token."""
    fmt, examples = read_multiple_choice(path, fmt, limit)
    requests = [encode_pair(tokenizer, ctx, cont) for ex in examples for ctx, cont in zip(ex.contexts,
                                                                                           ex.continuations)]
    scores = iter(score_continuations(model, requests, seq_length, batch_size, shard, progress,
                                      desc=f"mc {Path(path).name}"))
    hits = np.zeros((len(examples), 3))
    for i, ex in enumerate(examples):
        mine = [next(scores) for _ in ex.contexts]
        logprob = np.array([s.logprob for s in mine])
        for column, value in enumerate((logprob, logprob / np.array(ex.norm_chars),
                                        logprob / np.array([s.num_tokens for s in mine]))):
            hits[i, column] = int(np.argmax(value)) == ex.label
    acc, acc_norm, acc_per_token = hits.mean(axis=0).tolist()
    return {"task": f"mc:{Path(path).name}", "kind": "multiple_choice", "format": fmt, "seq_length": seq_length,
            "examples": len(examples), "acc": acc, "acc_norm": acc_norm, "acc_per_token": acc_per_token}
