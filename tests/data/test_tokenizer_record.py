"""The tokenizer record beside each dataset: written by preprocessing, compared before training, and the
cached largest-id scan for datasets without a record."""
import json
import os
import shutil

import numpy as np
import pytest

from megagpt.config.sections import TokenizerConfig
from megagpt.data import tokenizer_record as tr
from megagpt.data.indexed import IndexedDatasetWriter
from megagpt.data.preprocess import PreprocessOptions, preprocess
from megagpt.data.tokenizers import build_tokenizer


@pytest.fixture(scope="module")
def bpe_dataset(tmp_path_factory, gpt2_files, gcide_docs):
    root = tmp_path_factory.mktemp("bpe")
    (root / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in gcide_docs[:20]))
    tok = build_tokenizer("GPT2BPETokenizer", *gpt2_files)
    preprocess(PreprocessOptions(inputs=[str(root / "c.jsonl")], output_prefix=str(root / "out"), tokenizer=tok,
                                 append_eod=True, progress=False))
    return str(root / "out_text_document"), tok


def _legacy_dataset(prefix, ids):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document(np.asarray(ids, dtype=np.uint16))
    return str(prefix)


def test_preprocessing_writes_the_record(bpe_dataset):
    prefix, tok = bpe_dataset
    record = tr.read_record(prefix)
    assert (record.type, record.kind, record.vocab_size, record.eod) == ("GPT2BPETokenizer", "gpt2", 50257, 50256)
    assert record.max_token_id == 50256  # the appended EOD is the largest id
    assert record.fingerprint == tr.tokenizer_fingerprint(tok)


def test_fingerprint_follows_contents_not_paths(tmp_path, gpt2_files):
    copies = [shutil.copy(f, str(tmp_path / os.path.basename(f))) for f in gpt2_files]
    assert tr.tokenizer_fingerprint(build_tokenizer("gpt2", *copies)) == \
        tr.tokenizer_fingerprint(build_tokenizer("gpt2", *gpt2_files))
    with open(copies[0], "a") as f:
        f.write(" ")
    assert tr.tokenizer_fingerprint(build_tokenizer("gpt2", *copies)) != \
        tr.tokenizer_fingerprint(build_tokenizer("gpt2", *gpt2_files))


def test_small_model_vocabulary_is_refused_naming_both(bpe_dataset):
    prefix, _ = bpe_dataset
    with pytest.raises(ValueError, match=r"50257 tokens.*model.vocab_size is 66"):
        tr.check_dataset(prefix, vocab_size=66)
    tr.check_dataset(prefix, vocab_size=50257)


def test_config_tokenizer_must_match(bpe_dataset, gpt2_files, tmp_path):
    prefix, _ = bpe_dataset
    tr.check_dataset(prefix, 50257, TokenizerConfig(type="GPT2BPETokenizer", vocab_file=gpt2_files[0],
                                                    merge_file=gpt2_files[1]))
    with pytest.raises(ValueError, match=r"GPT2BPETokenizer.*tokenizer.type is 'byte'"):
        tr.check_dataset(prefix, 50257, TokenizerConfig(type="byte"))
    edited = shutil.copy(gpt2_files[1], str(tmp_path / "merges.txt"))
    with open(edited, "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match="different vocabularies"):
        tr.check_dataset(prefix, 50257, TokenizerConfig(type="gpt2", vocab_file=gpt2_files[0], merge_file=edited))


def test_legacy_dataset_scanned_once_and_cached(tmp_path, monkeypatch):
    prefix = _legacy_dataset(tmp_path / "legacy", [1, 70, 3])
    with pytest.raises(ValueError, match=r"token id 70 \(scanned; no tokenizer record\).*\[0, 66\)"):
        tr.check_dataset(prefix, vocab_size=66)  # inside a padded vocabulary of 128: still refused
    calls = []
    monkeypatch.setattr(tr, "_scan_largest_id", lambda p: calls.append(p) or 70)
    assert tr.largest_token_id(prefix) == 70 and calls == []  # from the cache
    _legacy_dataset_overwrite = IndexedDatasetWriter(prefix, np.uint16, overwrite=True)
    with _legacy_dataset_overwrite as w:
        w.add_document(np.asarray([5, 99], dtype=np.uint16))
    os.utime(prefix + ".bin", ns=(1, 1))  # a rewritten dataset invalidates the cache
    assert tr.largest_token_id(prefix) == 70 and calls == [prefix]


def test_scan_reference(tmp_path, monkeypatch):
    ids = np.random.default_rng(0).integers(0, 60000, size=5000)
    prefix = _legacy_dataset(tmp_path / "r", ids)
    monkeypatch.setattr(tr, "_SCAN_CHUNK", 333)  # many chunks
    assert tr.largest_token_id(prefix, cache_dir=tmp_path / "cache") == int(ids.max())
    assert os.path.exists(tmp_path / "cache" / ("r" + tr.SCAN_SUFFIX))


def test_damaged_record_is_named(tmp_path):
    prefix = _legacy_dataset(tmp_path / "d", [1])
    open(tr.record_path(prefix), "w").write("{")
    with pytest.raises(ValueError, match=r"d\.tokenizer\.json: unreadable tokenizer record"):
        tr.read_record(prefix)


def test_merging_different_tokenizers_is_refused(bpe_dataset, tmp_path):
    prefix, _ = bpe_dataset
    other = tr.TokenizerRecord("ByteLevelTokenizer", "byte", 257, 256, "sha256:x", 256)
    with pytest.raises(ValueError, match="different tokenizers cannot be merged"):
        tr.merged_record([tr.read_record(prefix), other], [prefix, "b"])
