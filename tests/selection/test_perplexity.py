"""Per-document perplexity: each document alone, long ones in evaluate.py's sliding windows, resumable chunks."""
import math

import numpy as np
import pytest
import torch

from megagpt.convert.weights import load_gpt
from megagpt.data.indexed import IndexedDataset
from megagpt.evaluation.scoring import score_windows, sliding_windows
from megagpt.selection.perplexity import ScoreSettings, document_lengths, score_document_range, summarize
from megagpt.selection.score_run import ScoreOutputs, run_scoring
from megagpt.selection.scores import dataset_record, read_scores


@pytest.fixture(scope="module")
def model(byte_checkpoint):
    return load_gpt(byte_checkpoint)[0]


def _alone(model, doc) -> float:
    """Reference: the document run through the model by itself, float64 NLL of tokens 1 .. n-1."""
    with torch.no_grad():
        logits = model(torch.as_tensor(doc[None, :-1].astype(np.int64))).double()
    logprobs = torch.log_softmax(logits[0], dim=-1)
    return -float(logprobs.gather(-1, torch.as_tensor(doc[1:].astype(np.int64))[:, None]).sum())


def test_short_documents_match_each_scored_alone(model, write_dataset, random_documents, tmp_path):
    docs = random_documents(25, max_len=33)  # all fit one 32-token window
    data = IndexedDataset(write_dataset(tmp_path / "d", docs))
    columns = score_document_range(model, data, 0, len(docs), ScoreSettings(32, 32, batch_size=4))
    for i, doc in enumerate(docs):
        assert columns["tokens"][i] == len(doc) - 1
        if len(doc) < 2:
            assert math.isnan(columns["perplexity"][i])
            continue
        expected = _alone(model, doc)
        assert columns["nll_sum"][i] == pytest.approx(expected, rel=1e-5)
        assert columns["perplexity"][i] == pytest.approx(math.exp(expected / (len(doc) - 1)), rel=1e-5)
    assert columns["nll_sum"].dtype == np.float64 and columns["tokens"].dtype == np.int64


def test_long_documents_use_evaluates_sliding_windows(model, write_dataset, tmp_path):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 257, 100), rng.integers(0, 257, 5), rng.integers(0, 257, 71)]
    data = IndexedDataset(write_dataset(tmp_path / "d", docs))
    columns = score_document_range(model, data, 0, 3, ScoreSettings(32, 8, batch_size=3))
    for i, doc in enumerate(docs):
        rows = score_windows(model, doc.astype(np.int64), sliding_windows(len(doc), 32, 8), batch_size=1)
        assert columns["tokens"][i] == len(doc) - 1 == rows[:, 2].sum()
        assert columns["nll_sum"][i] == pytest.approx(rows[:, 0].sum(), rel=1e-5)


def test_no_attention_across_documents(model, write_dataset, random_documents, tmp_path):
    docs = random_documents(12, max_len=33)
    docs[5] = np.arange(2, 30)
    other = random_documents(12, seed=9, max_len=33)
    other[5] = docs[5]  # the same document among different neighbours
    a = score_document_range(model, IndexedDataset(write_dataset(tmp_path / "a", docs)), 0, 12, ScoreSettings(32, 32))
    b = score_document_range(model, IndexedDataset(write_dataset(tmp_path / "b", other)), 0, 12,
                             ScoreSettings(32, 32))
    assert a["nll_sum"][5] == pytest.approx(b["nll_sum"][5], rel=1e-5)
    assert a["nll_sum"][5] == pytest.approx(_alone(model, docs[5]), rel=1e-5)


def test_document_lengths_join_multi_sequence_documents(write_dataset, tmp_path):
    from megagpt.data.indexed import write_index

    prefix = write_dataset(tmp_path / "d", [np.arange(3), np.arange(4), np.arange(5)])
    # re-index: documents {seq 0, seq 1} and {seq 2}
    write_index(f"{prefix}.idx", np.uint16, np.array([3, 4, 5]), np.array([0, 2, 3]))
    np.testing.assert_array_equal(document_lengths(IndexedDataset(prefix)), [7, 5])


def _run(model, prefix, out, chunk, **kw):
    record = dataset_record(prefix)
    return run_scoring(model, IndexedDataset(prefix), record, ScoreOutputs(out), ScoreSettings(32, 16, 4),
                       {"path": "test"}, chunk_documents=chunk, progress=False, **kw)


def test_interrupted_run_resumes_to_the_same_file(model, write_dataset, random_documents, tmp_path, monkeypatch):
    import megagpt.selection.score_run as score_run

    prefix = write_dataset(tmp_path / "d", random_documents(30, max_len=70))
    whole = tmp_path / "whole.npz"
    summary = _run(model, prefix, whole, 7)
    assert (tmp_path / "whole.summary.json").exists() and (tmp_path / "whole.hist.png").exists()
    assert not (tmp_path / "whole.npz.parts").exists()
    assert summary["documents"] == 30 and summary["unscored_documents"] == summary["documents"] - \
        summary["scored_documents"]

    calls = {"n": 0}
    real = score_run.score_document_range

    def dies_after_two(*args):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(score_run, "score_document_range", dies_after_two)
    resumed = tmp_path / "resumed.npz"
    with pytest.raises(KeyboardInterrupt):
        _run(model, prefix, resumed, 7)
    assert not resumed.exists() and len(list((tmp_path / "resumed.npz.parts").glob("chunk_*.npz"))) == 2
    monkeypatch.setattr(score_run, "score_document_range", real)
    with pytest.raises(ValueError, match=r"other \['chunk_documents'\]"):
        _run(model, prefix, resumed, 5)
    _run(model, prefix, resumed, 7)
    a, b = read_scores(whole), read_scores(resumed)
    for name in ("tokens", "nll_sum", "perplexity"):
        np.testing.assert_array_equal(a.columns[name], b.columns[name])
    assert b.meta["summary"]["this_run"]["documents"] == 30 - 14  # only the missing chunks were scored


def test_summary_counts():
    columns = {"tokens": np.array([0, 2, 4]), "nll_sum": np.array([0.0, 2.0, 4.0]),
               "perplexity": np.array([np.nan, math.e, math.e])}
    summary = summarize(columns)
    assert summary["scored_documents"] == 2 and summary["unscored_documents"] == 1
    assert summary["corpus_perplexity"] == pytest.approx(math.e)
    assert summary["document_perplexity"]["q50"] == pytest.approx(math.e)
