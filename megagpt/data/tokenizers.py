"""Tokenizers: GPT-2 BPE (through tiktoken), any Hugging Face ``tokenizer.json``, character-level and byte-level.

Every tokenizer is a small picklable object (it is sent to preprocessing workers) with ``vocab_size``, ``eod``,
``encode(text) -> np.ndarray``, ``decode(ids) -> str`` and a JSON-able ``describe()`` saved beside the data.
Special-token strings inside documents are always encoded as ordinary text, as Megatron's GPT-2 tokenizer does:
a document that happens to contain ``<|endoftext|>`` must not end itself.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache

import numpy as np

# Megatron-LM and GPT-NeoX names for the same tokenizers.
TOKENIZER_ALIASES = {
    "GPT2BPETokenizer": "gpt2", "HFGPT2Tokenizer": "gpt2", "gpt2": "gpt2",
    "HFTokenizer": "hf", "HuggingFaceTokenizer": "hf", "hf": "hf",
    "CharLevelTokenizer": "char", "char": "char",
    "ByteLevelTokenizer": "byte", "byte": "byte",
}
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOD = "<|endoftext|>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map used in vocab.json / merges.txt."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``, encoded by tiktoken (Rust, ~10x Megatron's).

    tiktoken ranks merges by the id of the merged token, so we check that the vocabulary's ids follow the merge
    order — true of GPT-2 and of BPEs trained with Hugging Face ``tokenizers`` — and refuse files where they don't.
    """

    def __init__(self, vocab_file: str, merge_file: str):
        self.vocab_file, self.merge_file = os.fspath(vocab_file), os.fspath(merge_file)
        with open(self.vocab_file, encoding="utf-8") as f:
            vocab: dict[str, int] = json.load(f)
        decoder = {c: b for b, c in bytes_to_unicode().items()}
        ranks, specials = {}, {}
        for token, idx in vocab.items():
            try:
                ranks[bytes(decoder[c] for c in token)] = idx
            except KeyError:  # not byte-level text: a special token such as <|endoftext|>
                specials[token] = idx
        if len([b for b in ranks if len(b) == 1]) != 256:
            raise ValueError(f"{self.vocab_file}: a byte-level BPE vocabulary must contain all 256 single bytes")
        self._check_merge_order(vocab)
        if GPT2_EOD not in vocab:
            raise ValueError(f"{self.vocab_file} has no {GPT2_EOD!r} token to use as end-of-document")
        self.eod = vocab[GPT2_EOD]
        self.vocab_size = len(vocab)
        self._ranks, self._specials = ranks, specials
        self._enc = None

    def _check_merge_order(self, vocab: dict[str, int]) -> None:
        last = -1
        with open(self.merge_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.startswith("#version") or not line.strip():
                    continue
                parts = line.rstrip("\n").split(" ")
                if len(parts) != 2:
                    raise ValueError(f"{self.merge_file}:{lineno}: expected two tokens separated by a space")
                merged = vocab.get(parts[0] + parts[1])
                if merged is None:
                    raise ValueError(f"{self.merge_file}:{lineno}: merge result {parts[0] + parts[1]!r} is not "
                                     f"in {self.vocab_file}")
                if merged <= last:
                    raise ValueError(f"{self.merge_file}:{lineno}: token ids do not follow the merge order, which "
                                     f"tiktoken needs; use --tokenizer-type HFTokenizer with a tokenizer.json")
                last = merged

    @property
    def encoding(self):
        if self._enc is None:  # built lazily so that pickling to workers sends only the ranks
            import tiktoken
            self._enc = tiktoken.Encoding(name="gpt2-from-files", pat_str=GPT2_PATTERN,
                                          mergeable_ranks=self._ranks, special_tokens=self._specials)
        return self._enc

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_enc"} | {"_enc": None}

    def encode(self, text: str) -> np.ndarray:
        try:
            return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates (possible with --no-ftfy): tiktoken's own encode() rule
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {"type": "GPT2BPETokenizer", "vocab_file": self.vocab_file, "merge_file": self.merge_file,
                "vocab_size": self.vocab_size, "eod": self.eod}


class HFTokenizer:
    """Any Hugging Face ``tokenizers`` JSON file (e.g. one written by tools/train_tokenizer.py)."""

    def __init__(self, tokenizer_file: str, eod_token: str | None = None):
        from tokenizers import Tokenizer
        self.tokenizer_file = os.fspath(tokenizer_file)
        self._tok = Tokenizer.from_file(self.tokenizer_file)
        # A special-token string inside a document is text, not a control token; this switch is not stored in
        # tokenizer.json, so it is set on every load.
        self._tok.encode_special_tokens = True
        candidates = [eod_token] if eod_token else [GPT2_EOD, "</s>", "<eos>", "[EOS]", "<|end_of_text|>"]
        found = [t for t in candidates if self._tok.token_to_id(t) is not None]
        if not found:
            raise ValueError(f"{self.tokenizer_file} has none of the end-of-document tokens {candidates}; "
                             f"name one with --eod-token")
        self.eod_token = found[0]
        self.eod = self._tok.token_to_id(self.eod_token)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def __getstate__(self):
        return {"tokenizer_file": self.tokenizer_file, "eod_token": self.eod_token}

    def __setstate__(self, state):
        self.__init__(state["tokenizer_file"], state["eod_token"])

    def encode(self, text: str) -> np.ndarray:
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # lone surrogates (possible with --no-ftfy): replaced, as GPT2BPETokenizer does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> dict:
        return {"type": "HFTokenizer", "tokenizer_file": self.tokenizer_file, "eod_token": self.eod_token,
                "vocab_size": self.vocab_size, "eod": self.eod}


class CharLevelTokenizer:
    """nanoGPT's shakespeare_char: one id per character of a fixed alphabet, EOD after the last character.

    The alphabet is a JSON file ``{"chars": [...]}``; ``build_char_vocab`` makes one from a corpus.
    """

    def __init__(self, vocab_file: str):
        self.vocab_file = os.fspath(vocab_file)
        with open(self.vocab_file, encoding="utf-8") as f:
            chars = json.load(f).get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError(f"{self.vocab_file}: expected {{\"chars\": [one-character strings]}}")
        if len(set(chars)) != len(chars):
            raise ValueError(f"{self.vocab_file}: duplicate characters in the alphabet")
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}
        self.eod = len(chars)
        self.vocab_size = len(chars) + 1

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.fromiter((self._stoi[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the alphabet of {self.vocab_file}") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else "\n" for i in map(int, ids))

    def describe(self) -> dict:
        return {"type": "CharLevelTokenizer", "vocab_file": self.vocab_file, "vocab_size": self.vocab_size,
                "eod": self.eod}


def build_char_vocab(texts, path: str) -> CharLevelTokenizer:
    """Write the sorted character set of ``texts`` to ``path`` (as nanoGPT's prepare.py does) and load it."""
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"chars": sorted(chars)}, f, ensure_ascii=False)
    os.replace(tmp, path)
    return CharLevelTokenizer(path)


class ByteLevelTokenizer:
    """UTF-8 bytes as ids 0-255; id 256 is the end-of-document token."""

    vocab_size = 257
    eod = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="surrogatepass"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"type": "ByteLevelTokenizer", "vocab_size": self.vocab_size, "eod": self.eod}


def build_tokenizer(tokenizer_type: str, vocab_file: str | None = None, merge_file: str | None = None,
                    tokenizer_file: str | None = None, eod_token: str | None = None):
    """Build a tokenizer from Megatron/NeoX-style arguments, with errors that name the missing flag."""
    kind = TOKENIZER_ALIASES.get(tokenizer_type)
    if kind is None:
        raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {sorted(TOKENIZER_ALIASES)}")
    if kind == "gpt2":
        if not vocab_file or not merge_file:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs --vocab-file (vocab.json) and "
                             f"--merge-file (merges.txt)")
        return GPT2BPETokenizer(vocab_file, merge_file)
    if kind == "hf":
        path = tokenizer_file or vocab_file
        if not path:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-file (a tokenizer.json)")
        return HFTokenizer(path, eod_token)
    if kind == "char":
        if not vocab_file:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs --vocab-file (a JSON alphabet, made by "
                             f"--build-char-vocab or build_char_vocab())")
        return CharLevelTokenizer(vocab_file)
    return ByteLevelTokenizer()
