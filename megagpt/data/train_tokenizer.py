"""Train a GPT-2-style byte-level BPE with Hugging Face ``tokenizers``, offline, into a ``tokenizer.json``.

The corpus is read exactly as the preprocessor reads it (same input types, same work units, same JSON-key
extraction and skip reasons), optionally ftfy-cleaned, and streamed into the trainer. The tokenizer has GPT-2's
byte-level pre-tokenizer and decoder and starts from all 256 byte symbols, so every string encodes and
``decode(encode(text)) == text``. Special tokens get the first ids (0, 1, ...); the file loads with
``--tokenizer-type HFTokenizer --tokenizer-file tokenizer.json`` in tools/preprocess_data.py.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Iterator, Sequence

from megagpt.data.preprocess import SkipTally, document_text, unit_documents
from megagpt.data.sources import find_sources, iter_units
from megagpt.data.tokenizers import GPT2_EOD, HFTokenizer

NUM_BYTE_SYMBOLS = 256


def iter_texts(inputs: list[str], json_keys: list[str], ftfy: bool = False, txt_separator: str | None = None,
               skips: SkipTally | None = None, key_skips: dict[str, SkipTally] | None = None) -> Iterator[str]:
    """Yield the documents of ``inputs`` (every key of ``json_keys``, in input order) as the preprocessor sees them.

    Records and values the preprocessor would skip are skipped here too and counted in ``skips`` (per record) and
    ``key_skips`` (per key), when given.
    """
    skips = skips if skips is not None else SkipTally()
    key_skips = key_skips if key_skips is not None else {}
    separator = txt_separator.encode("utf-8") if txt_separator else None
    for source in find_sources(inputs):
        for unit in iter_units(source, json_keys, txt_separator=separator):
            # The preprocessor's own record reader: same line numbers, same skip reasons.
            for line, doc in unit_documents(unit, skips):
                where = f"{unit.path}:{line}"
                for key in json_keys:
                    text = document_text(doc, key, where, key_skips.setdefault(key, SkipTally()), ftfy)
                    if text is not None:
                        yield text


def new_byte_level_bpe():
    """An untrained GPT-2-style tokenizer: byte-level BPE, GPT-2 split regex, no normalizer, byte-level decoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: GPT-2 does not prepend a space, and it would break decode(encode(x)) == x.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _validate(inputs, output, vocab_size, min_frequency, special_tokens, json_keys, overwrite) -> None:
    if not inputs:
        raise ValueError("--input: give at least one file, directory or glob")
    if not special_tokens or any(not t for t in special_tokens) or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"--special-tokens must be distinct non-empty strings, got {special_tokens}")
    least = NUM_BYTE_SYMBOLS + len(special_tokens)
    if vocab_size < least:
        raise ValueError(f"--vocab-size {vocab_size} is too small: the 256 byte symbols and {len(special_tokens)} "
                         f"special token(s) alone take {least}")
    if min_frequency < 1:
        raise ValueError(f"--min-frequency must be >= 1, got {min_frequency}")
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys must name distinct keys, got {json_keys}")
    if not output:
        raise ValueError("--output: give the path of the tokenizer.json to write")
    if os.path.isdir(output):
        raise ValueError(f"--output {output} is a directory; give a file path such as {output}/tokenizer.json")
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")


def train_tokenizer(inputs: list[str], output: str, vocab_size: int, min_frequency: int = 2,
                    special_tokens: Sequence[str] = (GPT2_EOD,), json_keys: Sequence[str] = ("text",),
                    ftfy: bool = False, txt_separator: str | None = None, overwrite: bool = False,
                    show_progress: bool = False) -> dict:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (special tokens and the 256 bytes included) on the
    documents of ``inputs`` and write it atomically to ``output``; return a summary.

    The vocabulary is smaller than asked (with a warning) when the corpus has too few pairs of at least
    ``min_frequency`` occurrences to merge.
    """
    special_tokens, json_keys = list(special_tokens), list(json_keys)
    _validate(inputs, output, vocab_size, min_frequency, special_tokens, json_keys, overwrite)
    sources = find_sources(inputs)  # fail on a missing input before training
    if any(s.format == "txt" for s in sources) and "text" not in json_keys:
        raise ValueError("text (.txt) inputs give the 'text' key only; add 'text' to --json-keys or drop them")
    from tokenizers import pre_tokenizers, trainers

    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not: any text encodes
        show_progress=show_progress)
    skips, key_skips = SkipTally(), {k: SkipTally() for k in json_keys}
    stats = {"documents": 0, "text_bytes": 0}

    def counted(texts):
        for text in texts:
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:  # lone surrogates (possible without ftfy): U+FFFD, as tiktoken does
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                size = len(text.encode("utf-8"))
            stats["documents"] += 1
            stats["text_bytes"] += size
            yield text

    started = time.perf_counter()
    tok.train_from_iterator(counted(iter_texts(inputs, json_keys, ftfy, txt_separator, skips, key_skips)), trainer)
    key_skipped = {k: t.as_dict() for k, t in key_skips.items()}
    if stats["documents"] == 0:
        raise RuntimeError(f"no documents to train on (skipped records: {skips.as_dict()}, skipped values: "
                           f"{key_skipped}); check --input and --json-keys")
    actual = tok.get_vocab_size(with_added_tokens=True)
    if actual < vocab_size:
        warnings.warn(f"the trained vocabulary has {actual} tokens, fewer than --vocab-size {vocab_size}: the corpus "
                      f"has no more pairs seen at least --min-frequency {min_frequency} times", stacklevel=2)

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.partial"
    tok.save(tmp)
    os.replace(tmp, output)
    try:  # the end-of-document token the preprocessor will pick without --eod-token
        hf = HFTokenizer(output)
        eod_token, eod = hf.eod_token, hf.eod
    except ValueError:
        eod_token = eod = None
        warnings.warn(f"none of the special tokens {special_tokens} is an end-of-document token HFTokenizer knows; "
                      f"name one with --eod-token when preprocessing", stacklevel=2)
    ids = {t: tok.token_to_id(t) for t in special_tokens}
    return {
        "output": output, "vocab_size": actual, "requested_vocab_size": vocab_size, "min_frequency": min_frequency,
        "special_tokens": ids, "eod_token": eod_token, "eod": eod,
        "inputs": [s.path for s in sources], "json_keys": json_keys, "ftfy": ftfy,
        "documents": stats["documents"], "text_bytes": stats["text_bytes"],
        "skipped": skips.as_dict(), "key_skipped": key_skipped,
        "seconds": round(time.perf_counter() - started, 3),
    }
