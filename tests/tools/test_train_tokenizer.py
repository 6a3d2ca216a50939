"""tools/train_tokenizer.py: a byte-level BPE trained offline that tools/preprocess_data.py accepts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megagpt.data.cleaning import clean_text
from megagpt.data.indexed import IndexedDataset
from megagpt.data.preprocess import PreprocessOptions, preprocess
from megagpt.data.tokenizers import ByteLevelTokenizer, HFTokenizer
from megagpt.data.train_tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
UNICODE_DOCS = ["Café “naïve” résumé — 10–20 ½ ﬁne\r\nÅngström  Zürich", "日本語のテキスト 🙂 emoji\tand tabs",
                "  leading spaces, trailing newline\n\n", "mojibake: cafÃ© doesnâ€™t", "Ελληνικά и русский текст"]


def _tool(name, *args):
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)], capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gcide_docs):
    """~300 KB of gcide dictionary text plus some non-ASCII documents, as jsonl."""
    docs = gcide_docs[:150] + UNICODE_DOCS
    assert 200_000 < sum(len(d) for d in docs) < 1_000_000
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


def test_trained_tokenizer_feeds_preprocess_data(tmp_path, corpus):
    src, docs = corpus
    out = tmp_path / "tok" / "tokenizer.json"
    proc = _tool("train_tokenizer.py", "--input", src, "--vocab-size", 700, "--ftfy", "--output", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and not list(out.parent.glob("*.partial"))
    proc = _tool("preprocess_data.py", "--input", src, "--output-prefix", tmp_path / "ds", "--tokenizer-type",
                 "HFTokenizer", "--tokenizer-file", out, "--append-eod", "--no-progress")
    assert proc.returncode == 0, proc.stderr

    tok = HFTokenizer(str(out))
    raw = json.loads(out.read_text())
    eod = next(t["id"] for t in raw["added_tokens"] if t["content"] == "<|endoftext|>")
    assert tok.vocab_size == 700 and len(raw["model"]["vocab"]) == 700
    assert tok.eod == eod == 0  # special tokens take the first ids
    ds = IndexedDataset(str(tmp_path / "ds_text_document"))
    assert len(ds) == len(docs)
    assert json.loads((tmp_path / "ds_report.json").read_text())["tokenizer"]["vocab_size"] == 700
    for i, doc in enumerate(docs):
        ids = ds[i].tolist()
        assert ids[-1] == eod and eod not in ids[:-1]
        assert tok.decode(ids[:-1]) == clean_text(doc)
    # The BPE merged something: fewer tokens than UTF-8 bytes on the dictionary text.
    assert ds.sequence_lengths[:150].sum() < 0.6 * sum(len(d.encode()) for d in docs[:150])


def test_byte_level_round_trip_on_unseen_text(tmp_path, corpus):
    src, _ = corpus
    out = tmp_path / "tokenizer.json"
    train_tokenizer([str(src)], str(out), vocab_size=400)
    tok = HFTokenizer(str(out))
    unseen = ["\x00\x1b[31m ctrl", "한국어 ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", " x", "\r\n\r\n", "a" * 1000, "<|endoftext|>"[1:]]
    for text in UNICODE_DOCS + unseen:
        ids = tok.encode(text)
        assert ids.max() < 400 and tok.decode(ids) == text


def test_special_tokens_take_first_ids_and_eod_is_found(tmp_path, corpus):
    src, _ = corpus
    out = tmp_path / "tokenizer.json"
    summary = train_tokenizer([str(src)], str(out), vocab_size=400, special_tokens=["<pad>", "<|endoftext|>"])
    assert summary["special_tokens"] == {"<pad>": 0, "<|endoftext|>": 1}
    assert summary["eod_token"] == "<|endoftext|>" and summary["eod"] == 1 == HFTokenizer(str(out)).eod


@pytest.mark.filterwarnings("ignore:the trained vocabulary has")  # a tiny corpus: a smaller vocabulary is expected
def test_skips_match_the_preprocessor(tmp_path):
    src = tmp_path / "bad.jsonl"
    lines = [{"text": "good text one"}, "{broken", {"title": "no text key"}, {"text": 7}, [1, 2], {"text": " \n"},
             "", {"text": "good text two"}]
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    summary = train_tokenizer([str(src)], str(tmp_path / "t.json"), vocab_size=300, min_frequency=1)
    report = preprocess(PreprocessOptions(inputs=[str(src)], output_prefix=str(tmp_path / "p"),
                                          tokenizer=ByteLevelTokenizer(), progress=False))
    assert summary["documents"] == report["documents_written"] == 2
    assert summary["skipped"] == report["skipped"] and set(summary["skipped"]) == {"invalid_json", "not_an_object",
                                                                                   "blank_line"}
    assert summary["key_skipped"]["text"] == report["outputs"]["text"]["skipped"]
    assert set(summary["key_skipped"]["text"]) == {"missing_key", "non_string", "empty"}


@pytest.mark.filterwarnings("ignore:the trained vocabulary has")
def test_lone_surrogates_without_ftfy_do_not_stop_training(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "abc \\ud800 abc"}\n{"text": "abc abc"}\n')  # a JSON escape of a lone surrogate
    summary = train_tokenizer([str(src)], str(tmp_path / "t.json"), vocab_size=300, min_frequency=1)
    assert summary["documents"] == 2 and summary["text_bytes"] == len("abc \ufffd abc".encode()) + 7


@pytest.mark.filterwarnings("ignore:the trained vocabulary has")
def test_txt_input_with_separator(tmp_path):
    src = tmp_path / "play.txt"
    src.write_text("To be, or not to be.\n\n\nThat is the question.\n\n\nWhether 'tis nobler.")
    summary = train_tokenizer([str(src)], str(tmp_path / "t.json"), vocab_size=300, min_frequency=1,
                              txt_separator="\n\n\n")
    assert summary["documents"] == 3


def test_refuses_to_overwrite_without_flag(tmp_path, corpus):
    src, _ = corpus
    out = tmp_path / "tokenizer.json"
    out.write_text("keep me")
    proc = _tool("train_tokenizer.py", "--input", src, "--vocab-size", 300, "--output", out, "--no-progress")
    assert proc.returncode == 1 and "--overwrite" in proc.stderr and out.read_text() == "keep me"
    train_tokenizer([str(src)], str(out), vocab_size=300, overwrite=True)
    assert HFTokenizer(str(out)).vocab_size == 300


def test_small_corpus_warns_of_a_smaller_vocabulary(tmp_path):
    src = tmp_path / "tiny.jsonl"
    src.write_text(json.dumps({"text": "ab ab ab"}) + "\n")
    with pytest.warns(UserWarning, match="fewer than --vocab-size 1000"):
        summary = train_tokenizer([str(src)], str(tmp_path / "t.json"), vocab_size=1000)
    assert 257 < summary["vocab_size"] < 1000 == summary["requested_vocab_size"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"vocab_size": 256}, ValueError, "--vocab-size 256 is too small"),
    ({"vocab_size": 300, "min_frequency": 0}, ValueError, "--min-frequency"),
    ({"vocab_size": 300, "special_tokens": ["<a>", "<a>"]}, ValueError, "--special-tokens"),
    ({"vocab_size": 300, "json_keys": ["content"]}, RuntimeError, "missing_key"),
])
def test_bad_arguments_name_the_flag(tmp_path, corpus, kwargs, error, match):
    src, _ = corpus
    with pytest.raises(error, match=match):
        train_tokenizer([str(src)], str(tmp_path / "t.json"), **kwargs)
    assert not (tmp_path / "t.json").exists()


def test_missing_input_and_txt_key_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train_tokenizer([str(tmp_path / "nope.jsonl")], str(tmp_path / "t.json"), vocab_size=300)
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="'text' key only"):
        train_tokenizer([str(tmp_path / "a.txt")], str(tmp_path / "t.json"), vocab_size=300, json_keys=["body"])
