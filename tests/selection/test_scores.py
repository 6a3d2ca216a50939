"""The per-document score file: round trip, fingerprint, and refusal of a file that belongs to another dataset."""
import numpy as np
import pytest

from megagpt.selection.scores import (DocumentScores, check_alignment, dataset_fingerprint, dataset_record,
                                      read_scores, write_scores)


def _scores(prefix, n):
    rng = np.random.default_rng(1)
    return DocumentScores({"tokens": np.arange(n, dtype=np.int64), "perplexity": rng.random(n) * 10},
                          {"dataset": dataset_record(prefix), "default_column": "perplexity", "kind": "test"})


def test_round_trip(small_dataset, tmp_path):
    prefix, docs = small_dataset
    scores = _scores(prefix, len(docs))
    path = write_scores(tmp_path / "s.npz", scores)
    back = read_scores(path)
    assert back.num_documents == len(docs)
    assert back.meta["kind"] == "test" and back.meta["dataset"]["num_documents"] == len(docs)
    np.testing.assert_array_equal(back.column(), scores.columns["perplexity"])
    assert back.columns["tokens"].dtype == np.int64
    check_alignment(back, prefix)  # its own dataset: accepted
    with pytest.raises(ValueError, match="no column 'influence'.*perplexity"):
        back.column("influence")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_scores(path, scores)
    write_scores(path, scores, overwrite=True)


def test_fingerprint_tells_datasets_apart(tmp_path, write_dataset, random_documents):
    docs = random_documents(30)
    a = write_dataset(tmp_path / "a", docs)
    same = write_dataset(tmp_path / "same", docs)
    assert dataset_fingerprint(a) == dataset_fingerprint(same)
    changed = [d.copy() for d in docs]
    changed[17][0] = (changed[17][0] + 1) % 257  # one token differs, lengths identical
    assert dataset_fingerprint(write_dataset(tmp_path / "changed", changed)) != dataset_fingerprint(a)
    reordered = docs[1:] + docs[:1]
    assert dataset_fingerprint(write_dataset(tmp_path / "reordered", reordered)) != dataset_fingerprint(a)


def test_large_bin_is_sampled_not_read_whole(tmp_path, write_dataset):
    docs = [np.full(3000, i % 250, dtype=np.uint16) for i in range(1500)]  # 9 MB: more than 64 blocks of 64 KiB
    a = write_dataset(tmp_path / "a", docs)
    docs[-1] = docs[-1].copy()
    docs[-1][-1] = 7  # the very last token is in the last sampled block
    assert dataset_fingerprint(write_dataset(tmp_path / "b", docs)) != dataset_fingerprint(a)


def test_refuses_scores_of_another_dataset(small_dataset, tmp_path, write_dataset, random_documents):
    prefix, docs = small_dataset
    path = write_scores(tmp_path / "s.npz", _scores(prefix, len(docs)))
    other = write_dataset(tmp_path / "other", random_documents(len(docs), seed=5))
    with pytest.raises(ValueError, match=r"does not belong to dataset .*other.*fingerprint"):
        check_alignment(read_scores(path), other)
    fewer = write_dataset(tmp_path / "fewer", docs[:-1])
    with pytest.raises(ValueError, match=f"{len(docs)} documents in the scores, {len(docs) - 1} in the dataset"):
        check_alignment(read_scores(path), fewer)


def test_bad_files(small_dataset, tmp_path):
    prefix, docs = small_dataset
    with pytest.raises(ValueError, match="does not exist"):
        read_scores(tmp_path / "missing.npz")
    np.savez(tmp_path / "plain.npz", score=np.zeros(3))
    with pytest.raises(ValueError, match="no __meta__"):
        read_scores(tmp_path / "plain.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not a NumPy .npz"):
        read_scores(tmp_path / "text.npz")
    record = dataset_record(prefix)
    with pytest.raises(ValueError, match="rows for a dataset of"):
        write_scores(tmp_path / "s.npz", DocumentScores({"x": np.zeros(3)}, {"dataset": record}))
    with pytest.raises(ValueError, match="1-D with one row per document"):
        write_scores(tmp_path / "s.npz", DocumentScores({"x": np.zeros(len(docs)), "y": np.zeros(2)},
                                                        {"dataset": record}))
    with pytest.raises(ValueError, match="must end in .npz"):
        write_scores(tmp_path / "s.npy", _scores(prefix, len(docs)))
    assert not list(tmp_path.glob("*.partial"))
