"""megagpt tokenizers as Hugging Face tokenizers that encode the same ids (saved beside an exported model).

* GPT2BPETokenizer -> transformers' ``GPT2Tokenizer`` (a ``tokenizers`` BPE) from vocab.json/merges.txt, which are
  copied too; bos = eos = ``<|endoftext|>``.
* HFTokenizer -> ``PreTrainedTokenizerFast`` around its tokenizer.json; a post-processor that would add tokens
  megagpt never added (megagpt encodes with ``add_special_tokens=False``) is dropped from the copy.
* CharLevelTokenizer -> a ``tokenizers`` WordLevel model over single characters (split one by one), EOD as
  ``<|endoftext|>`` after the alphabet; ByteLevelTokenizer -> a merge-free byte-level BPE whose 256 symbols are
  the byte values, EOD 256.

megagpt encodes special-token strings inside text as ordinary text; the exports keep that with
``split_special_tokens=True`` (saved in tokenizer_config.json).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megagpt.config import TokenizerConfig
from megagpt.data.tokenizers import (GPT2_EOD, ByteLevelTokenizer, CharLevelTokenizer, GPT2BPETokenizer, HFTokenizer,
                                     bytes_to_unicode)

SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog.\nFirst Citizen:\nBefore we proceed any further, hear "
               "me speak.  Numbers 12345, tabs\tand unicode: héllo wörld 日本語 🎉 <|endoftext|> end")


def resolve_tokenizer(tokenizer, recorded: TokenizerConfig):
    """The megagpt tokenizer object to export: ``tokenizer`` (a TokenizerConfig or a tokenizer object) if given,
    else the recorded one; None when neither names a tokenizer."""
    if tokenizer is None:
        return recorded.build() if recorded.type is not None else None
    if isinstance(tokenizer, TokenizerConfig):
        return tokenizer.build()
    if not isinstance(tokenizer, (GPT2BPETokenizer, HFTokenizer, CharLevelTokenizer, ByteLevelTokenizer)):
        raise ValueError(f"tokenizer must be a TokenizerConfig or a megagpt.data.tokenizers object, got "
                         f"{type(tokenizer).__name__}")
    return tokenizer


def sample_text(tok) -> str:
    """Text every tokenizer can encode: the sample, or the alphabet itself for a character-level tokenizer."""
    if isinstance(tok, CharLevelTokenizer):
        return "".join(tok.chars) + "".join(c for c in SAMPLE_TEXT if c in tok._stoi)
    return SAMPLE_TEXT


def _gpt2(tok: GPT2BPETokenizer, common: dict):
    from transformers import GPT2Tokenizer

    vocab = json.loads(Path(tok.vocab_file).read_text(encoding="utf-8"))
    merges = []
    for line in Path(tok.merge_file).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#version"):
            merges.append(tuple(line.split(" ")))
    return GPT2Tokenizer(vocab=vocab, merges=merges, unk_token=GPT2_EOD, bos_token=GPT2_EOD, eos_token=GPT2_EOD,
                         **common)


def _hf(tok: HFTokenizer, common: dict):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(tok.tokenizer_file)
    with_specials = backend.encode(SAMPLE_TEXT, add_special_tokens=True).ids
    if with_specials != backend.encode(SAMPLE_TEXT, add_special_tokens=False).ids:
        # megagpt's data never had these tokens: an export adding them would feed the model other inputs.
        print(f"note: {tok.tokenizer_file}'s post-processor adds special tokens that megagpt never adds; the "
              "exported tokenizer.json leaves it out")
        spec = json.loads(backend.to_str())
        spec["post_processor"] = None
        backend = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=tok.eod_token, **common)


def _char(tok: CharLevelTokenizer, common: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(tok.chars)}
    vocab[GPT2_EOD] = tok.eod
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # every character, newlines too
    backend.decoder = decoders.Fuse()  # join characters without spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=GPT2_EOD, **common)


def _byte(tok: ByteLevelTokenizer, common: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab[GPT2_EOD] = tok.eod
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one id per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=GPT2_EOD, **common)


def save_hf_tokenizer(tok, out_dir: str | Path, model_max_length: int | None = None) -> None:
    """Write ``tok`` into ``out_dir`` so that ``AutoTokenizer.from_pretrained(out_dir)`` encodes as it does.
    ``model_max_length``: the longest input the model takes (learned positions), None for no limit."""
    common = {"split_special_tokens": True}
    if model_max_length is not None:
        common["model_max_length"] = model_max_length
    builders = {GPT2BPETokenizer: _gpt2, HFTokenizer: _hf, CharLevelTokenizer: _char, ByteLevelTokenizer: _byte}
    hf_tok = builders[type(tok)](tok, common)
    hf_tok.save_pretrained(str(out_dir))
    if isinstance(tok, GPT2BPETokenizer):  # as GPT-2 releases ship them; import_hf reads them back
        shutil.copyfile(tok.vocab_file, Path(out_dir) / "vocab.json")
        shutil.copyfile(tok.merge_file, Path(out_dir) / "merges.txt")


def check_hf_tokenizer(hf_dir: str | Path, tok, text: str | None = None, trust_remote_code: bool = False) -> int:
    """Load the saved tokenizer with ``AutoTokenizer`` and check it gives ``tok``'s ids on ``text`` (default: the
    sample) and ``tok.eod`` as eos; returns the number of tokens compared. ValueError on any difference.
    ``trust_remote_code``: for a custom-code export (AutoTokenizer reads the model's config too)."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=trust_remote_code)
    text = sample_text(tok) if text is None else text
    ours, theirs = tok.encode(text).tolist(), hf_tok(text, verbose=False)["input_ids"]
    if ours != theirs:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise ValueError(f"the exported tokenizer in {hf_dir} encodes differently from megagpt's "
                         f"{type(tok).__name__}: first difference at token {first} (megagpt "
                         f"{ours[first:first + 5]}, Hugging Face {theirs[first:first + 5]})")
    if hf_tok.eos_token_id != tok.eod:
        raise ValueError(f"the exported tokenizer's eos_token_id is {hf_tok.eos_token_id}, megagpt's EOD is {tok.eod}")
    return len(ours)


__all__ = ["SAMPLE_TEXT", "check_hf_tokenizer", "resolve_tokenizer", "sample_text", "save_hf_tokenizer"]
