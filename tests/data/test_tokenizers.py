"""Tokenizers: GPT-2 BPE through tiktoken equals the Hugging Face GPT-2 BPE on the real vocabulary."""
import json
import pickle

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from megagpt.data.tokenizers import (ByteLevelTokenizer, CharLevelTokenizer, build_char_vocab, build_tokenizer,
                                     bytes_to_unicode)

TEXTS = [
    "Hello world", " leading space", "Héllo wörld — “quoted” ﬁne 123,456.78", "<|endoftext|> inside text",
    "日本語のテキスト 😀 emoji", "\r\n\ttabs and\n\nnewlines   ", "it's they'll we've I'm you're she'd",
    "x" * 500, "   ", "", "A\u0301ccent e\u0301", "mixed123numbers456 and___underscores!!",
]


@pytest.fixture(scope="module")
def gpt2(gpt2_files):
    return build_tokenizer("GPT2BPETokenizer", *gpt2_files)


@pytest.fixture(scope="module")
def hf_gpt2(gpt2_files):
    tok = Tokenizer(models.BPE.from_file(*gpt2_files))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def test_gpt2_equals_huggingface_bpe(gpt2, hf_gpt2, gcide_docs):
    assert gpt2.vocab_size == 50257 and gpt2.eod == 50256
    for text in TEXTS + gcide_docs[:100]:
        assert gpt2.encode(text).tolist() == hf_gpt2.encode(text).ids, text[:80]
        assert gpt2.decode(gpt2.encode(text)) == text


def test_special_token_text_is_ordinary(gpt2):
    assert 50256 not in gpt2.encode("a <|endoftext|> b").tolist()


def test_neox_alias_and_pickle(gpt2_files):
    tok = build_tokenizer("HFGPT2Tokenizer", *gpt2_files)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("pickled tokenizer").tolist() == tok.encode("pickled tokenizer").tolist()


def test_missing_flags_named():
    with pytest.raises(ValueError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file="v.json")
    with pytest.raises(ValueError, match="unknown --tokenizer-type"):
        build_tokenizer("NoSuchTokenizer")


def test_merge_order_checked(tmp_path):
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["ab"], vocab["abc"], vocab["<|endoftext|>"] = 257, 256, 258
    (tmp_path / "v.json").write_text(json.dumps(vocab))
    (tmp_path / "m.txt").write_text("#version: 0.2\na b\nab c\n")
    with pytest.raises(ValueError, match="m.txt:3: token ids do not follow the merge order"):
        build_tokenizer("GPT2BPETokenizer", str(tmp_path / "v.json"), str(tmp_path / "m.txt"))


def test_char_level(tmp_path):
    tok = build_char_vocab(["hello\n", "wide world"], str(tmp_path / "chars.json"))
    assert tok.vocab_size == len(set("hello\nwide world")) + 1 and tok.eod == tok.vocab_size - 1
    ids = tok.encode("hello world")
    assert tok.decode(ids) == "hello world"
    with pytest.raises(ValueError, match="not in the alphabet"):
        tok.encode("xyz")
    assert isinstance(build_tokenizer("CharLevelTokenizer", str(tmp_path / "chars.json")), CharLevelTokenizer)


def test_byte_level():
    tok = ByteLevelTokenizer()
    ids = tok.encode("héllo")
    assert ids.tolist() == list("héllo".encode()) and tok.decode(ids) == "héllo" and tok.eod == 256


def test_hf_tokenizer_json(tmp_path, hf_gpt2):
    hf_gpt2.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "tokenizer.json"
    hf_gpt2.save(str(path))
    tok = build_tokenizer("HFTokenizer", tokenizer_file=str(path))
    assert tok.eod == 50256
    assert np.array_equal(tok.encode("some text here"), hf_gpt2.encode("some text here").ids)
    assert tok.eod not in tok.encode("a <|endoftext|> b").tolist()  # special-token text stays text
    assert tok.encode("lone \ud800 surrogate").tolist() == tok.encode("lone \ufffd surrogate").tolist()
    assert pickle.loads(pickle.dumps(tok)).encode("x y").tolist() == tok.encode("x y").tolist()
