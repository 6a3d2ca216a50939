"""Preprocessing: exact tokens, every input type, identical output for any worker count, bad input accounting,
atomic outputs, and shards + merge = a single run."""
import gzip
import json
import os

import ftfy
import pytest
import zstandard

from megagpt.data.indexed import IndexedDataset, data_file_path, index_file_path
from megagpt.data.preprocess import PreprocessOptions, merge_datasets, preprocess
from megagpt.data.tokenizer_record import read_record
from megagpt.data.tokenizers import build_tokenizer


@pytest.fixture(scope="module")
def tok(gpt2_files):
    return build_tokenizer("GPT2BPETokenizer", *gpt2_files)


def _run(tmp_path, inputs, tok, name="out", **kw):
    kw.setdefault("progress", False)
    return preprocess(PreprocessOptions(inputs=[str(p) for p in inputs], output_prefix=str(tmp_path / name),
                                        tokenizer=tok, **kw))


def _docs_of(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _write_jsonl(path, rows, opener=open):
    with opener(path, "wb") as f:
        for r in rows:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")


def test_tokens_equal_ftfy_bpe_eod(tmp_path, tok, gcide_docs):
    docs = gcide_docs[:150] + ["cafÃ© &amp; “quotes” ﬁn\r\nline", "<b>&amp;</b>"]
    path = tmp_path / "c.jsonl.zst"
    with zstandard.ZstdCompressor().stream_writer(open(path, "wb")) as f:
        for d in docs:
            f.write(json.dumps({"text": d}).encode() + b"\n")
    report = _run(tmp_path, [path], tok, append_eod=True, workers=2, unit_bytes=50_000)
    expected = [tok.encode(ftfy.fix_text(d)).tolist() + [tok.eod] for d in docs]
    assert _docs_of(tmp_path / "out_text_document") == expected
    assert report["documents_written"] == len(docs) and report["skipped"] == {}
    assert json.load(open(tmp_path / "out_report.json"))["tokens"] == sum(map(len, expected))


def test_no_ftfy_keeps_text(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, [{"text": "cafÃ©"}])
    _run(tmp_path, [path], tok, ftfy=False)
    assert _docs_of(tmp_path / "out_text_document") == [tok.encode("cafÃ©").tolist()]


def test_same_output_for_every_worker_count(tmp_path, tok, gcide_docs):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, [{"text": d} for d in gcide_docs[:120]] + [b"{bad json"] + [{"text": "x"}])
    outputs = []
    for workers in (1, 2, 3):
        _run(tmp_path, [path], tok, name=f"w{workers}", append_eod=True, workers=workers, unit_bytes=30_000)
        prefix = tmp_path / f"w{workers}_text_document"
        outputs.append((open(data_file_path(prefix), "rb").read(), open(index_file_path(prefix), "rb").read()))
    assert outputs[0] == outputs[1] == outputs[2]


def test_bad_input_counted_by_reason_with_first_location(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    rows = [{"text": "good one"}, b"{not json", b"\xff\xfe{}", {"other": "x"}, {"text": 5}, {"text": "   "},
            b"", b"[1, 2]", {"text": "good two"}, b"{also bad", {"text": None}]
    _write_jsonl(path, rows)
    report = _run(tmp_path, [path], tok)
    sk, key = report["skipped"], report["outputs"]["text"]["skipped"]
    assert {r: v["count"] for r, v in sk.items()} == {
        "invalid_json": 2, "invalid_utf8": 1, "blank_line": 1, "not_an_object": 1}
    assert {r: v["count"] for r, v in key.items()} == {"missing_key": 1, "non_string": 2, "empty": 1}
    assert sk["invalid_json"]["first"].startswith(f"{path}:2 ")
    assert sk["invalid_utf8"]["first"].startswith(f"{path}:3 ")
    assert key["missing_key"]["first"] == f"{path}:4"
    assert key["non_string"]["first"].startswith(f"{path}:5 ")
    assert key["empty"]["first"] == f"{path}:6"
    assert report["records_read"] == len(rows) and report["documents_written"] == 2
    assert _docs_of(tmp_path / "out_text_document") == [tok.encode("good one").tolist(),
                                                       tok.encode("good two").tolist()]


def test_strict_fails_and_writes_nothing(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, [{"text": "fine"}, b"{oops"])
    with pytest.raises(ValueError, match=r"--strict: record skipped \(invalid_json\) at .*bad.jsonl:2"):
        _run(tmp_path, [path], tok, strict=True)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_zero_documents_is_an_error(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, [{"body": "wrong key"}])
    with pytest.raises(RuntimeError, match=r"no documents were written for key\(s\) \['text'\]"):
        _run(tmp_path, [path], tok)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]


def test_refuses_to_overwrite(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, [{"text": "one"}])
    _run(tmp_path, [path], tok)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run(tmp_path, [path], tok)
    _write_jsonl(path, [{"text": "two two"}])
    _run(tmp_path, [path], tok, overwrite=True)
    assert _docs_of(tmp_path / "out_text_document") == [tok.encode("two two").tolist()]


class _FailingTokenizer:
    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.vocab_size, self.eod = inner.vocab_size, inner.eod

    def encode(self, text):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt  # what Ctrl-C looks like in the middle of a run
        return self.inner.encode(text)


def test_interrupted_run_leaves_nothing_finished(tmp_path, tok):
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, [{"text": f"doc {i}"} for i in range(50)])
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, [path], _FailingTokenizer(tok, 30), unit_bytes=100)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]


def test_all_input_types_and_keys(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"text": f"doc {i}", "title": f"title {i}"} for i in range(6)]
    _write_jsonl(tmp_path / "a.jsonl", rows[:2])
    _write_jsonl(tmp_path / "b.jsonl.gz", rows[2:3], opener=gzip.open)
    with zstandard.ZstdCompressor().stream_writer(open(tmp_path / "c.json.zst", "wb")) as f:
        f.write(json.dumps(rows[3]).encode())  # no trailing newline: still one record
    pq.write_table(pa.table({"text": [r["text"] for r in rows[4:]], "title": [r["title"] for r in rows[4:]]}),
                   tmp_path / "d.parquet")
    report = _run(tmp_path, [tmp_path / "a.jsonl", str(tmp_path / "[bc].*"), tmp_path / "d.parquet"], tok,
                  json_keys=["text", "title"])
    for key in ("text", "title"):
        assert _docs_of(tmp_path / f"out_{key}_document") == [tok.encode(r[key]).tolist() for r in rows]
    assert report["outputs"]["title"]["documents"] == 6


def test_txt_inputs(tmp_path, tok):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "1.txt").write_text("first file\nsecond line")
    (d / "2.txt").write_text("A\n\n\nB\nC\n\n\n")
    _run(tmp_path, [d], tok, name="files")
    assert len(_docs_of(tmp_path / "files_text_document")) == 2
    report = _run(tmp_path, [d], tok, name="sep", txt_separator="\n\n\n")
    texts = ["first file\nsecond line", "A", "B\nC"]
    assert _docs_of(tmp_path / "sep_text_document") == [tok.encode(t).tolist() for t in texts]
    assert report["outputs"]["text"]["skipped"]["empty"] == {"count": 1, "first": f"{d / '2.txt'}:8"}


def test_shards_merged_equal_single_run(tmp_path, tok, gcide_docs):
    _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in gcide_docs[:37]] + [b"{bad"])
    _write_jsonl(tmp_path / "b.jsonl.gz", [{"text": t} for t in gcide_docs[37:60]], opener=gzip.open)
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"]
    _run(tmp_path, inputs, tok, name="single", append_eod=True)
    shards = []
    for i in range(3):
        _run(tmp_path, inputs, tok, name=f"shard{i}", append_eod=True, num_shards=3, shard_index=i,
             unit_bytes=20_000)
        shards.append(str(tmp_path / f"shard{i}_text_document"))
    merge_datasets(shards, str(tmp_path / "merged_text_document"))
    for path in (data_file_path, index_file_path):
        assert open(path(tmp_path / "merged_text_document"), "rb").read() == \
            open(path(tmp_path / "single_text_document"), "rb").read()
    assert sum(len(IndexedDataset(s)) for s in shards) == 60
    # the merged dataset keeps the tokenizer record (largest id over the shards)
    assert read_record(tmp_path / "merged_text_document") == read_record(tmp_path / "single_text_document")


def test_input_errors_are_clear(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="--input .*nope.jsonl"):
        _run(tmp_path, [tmp_path / "nope.jsonl"], tok)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="x.csv: unsupported input type"):
        _run(tmp_path, [tmp_path / "x.csv"], tok)
    _write_jsonl(tmp_path / "a.jsonl", [{"text": "t"}])
    with pytest.raises(ValueError, match="listed more than once"):
        _run(tmp_path, [tmp_path / "a.jsonl", tmp_path / "a.jsonl"], tok)
    with pytest.raises(ValueError, match="--shard-index"):
        _run(tmp_path, [tmp_path / "a.jsonl"], tok, num_shards=2, shard_index=2)


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("name,opener", [("bom.jsonl", open), ("bom.json", open), ("bom.jsonl.gz", gzip.open),
                                         ("bom.jsonl.zst", None)])
def test_byte_order_mark_is_not_data(tmp_path, tok, name, opener):
    """A UTF-8 BOM before the first record is an encoding marker: the first record is kept, nothing is skipped,
    and the output equals the same file without the mark."""
    rows = [{"text": "first record"}, {"text": "second"}]
    payload = BOM + b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    path = tmp_path / name
    if opener is None:
        with zstandard.ZstdCompressor().stream_writer(open(path, "wb")) as f:
            f.write(payload)
    else:
        with opener(path, "wb") as f:
            f.write(payload)
    report = _run(tmp_path, [path], tok, unit_bytes=8)
    assert report["skipped"] == {} and report["documents_written"] == 2
    assert _docs_of(tmp_path / "out_text_document") == [tok.encode(r["text"]).tolist() for r in rows]


def test_byte_order_mark_in_txt_inputs(tmp_path, tok):
    (tmp_path / "a.txt").write_bytes(BOM + "Ünïcode first\n\nsecond".encode())
    _run(tmp_path, [tmp_path / "a.txt"], tok, txt_separator="\n\n", ftfy=False)  # ftfy alone would drop it
    assert _docs_of(tmp_path / "out_text_document") == [tok.encode(t).tolist() for t in ("Ünïcode first", "second")]


def test_a_bom_only_in_the_middle_stays_data(tmp_path, tok):
    """Only the file's first bytes are a marker; U+FEFF inside a record is text and is tokenised as such
    (after ftfy, which keeps it)."""
    (tmp_path / "a.txt").write_bytes(b"x" + BOM + b"y")
    _run(tmp_path, [tmp_path / "a.txt"], tok, ftfy=False)
    assert _docs_of(tmp_path / "out_text_document") == [tok.encode("x\ufeffy").tolist()]
