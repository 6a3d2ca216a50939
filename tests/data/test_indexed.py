"""The MMIDIDX format: exact header bytes, byte identity with Megatron-LM's writer, round trips, bad pairs."""
import os
import struct

import numpy as np
import pytest

from megagpt.data.indexed import (IndexedDataset, IndexedDatasetWriter, best_dtype, data_file_path,
                                  index_file_path)


def _random_docs(rng, n=50, vocab=50257):
    return [rng.integers(0, vocab, size=rng.integers(1, 300)) for _ in range(n)]


def test_header_bytes_are_megatrons(tmp_path):
    prefix = tmp_path / "d"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_document([1, 2, 3])
        w.add_document([7])
    raw = open(index_file_path(prefix), "rb").read()
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 2)
                + struct.pack("<Q", 3) + np.array([3, 1], np.int32).tobytes() + np.array([0, 6], np.int64).tobytes()
                + np.array([0, 1, 2], np.int64).tobytes())
    assert raw == expected
    assert open(data_file_path(prefix), "rb").read() == np.array([1, 2, 3, 7], np.uint16).tobytes()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_byte_identical_to_megatron_lm(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    mc = pytest.importorskip("megatron.core.datasets.indexed_dataset", reason="megatron-core is the oracle")
    rng = np.random.default_rng(0)
    docs = _random_docs(rng, vocab=60000)
    ours = tmp_path / "ours"
    with IndexedDatasetWriter(ours, dtype) as w:
        for d in docs:
            w.add_document(d)
    theirs = str(tmp_path / "theirs")
    builder = mc.IndexedDatasetBuilder(data_file_path(theirs), dtype=dtype)
    for d in docs:
        builder.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    builder.finalize(index_file_path(theirs))
    for path in (data_file_path, index_file_path):
        assert open(path(ours), "rb").read() == open(path(theirs), "rb").read()
    # and Megatron reads ours
    mds = mc.IndexedDataset(str(ours))
    assert len(mds) == len(docs)
    assert np.array_equal(mds[len(docs) // 2], docs[len(docs) // 2])


def test_round_trip_and_partial_get(tmp_path):
    rng = np.random.default_rng(1)
    docs = _random_docs(rng)
    prefix = tmp_path / "d"
    with IndexedDatasetWriter(prefix, best_dtype(50257)) as w:
        w.add_documents(np.concatenate(docs[:10]), [len(d) for d in docs[:10]])
        for d in docs[10:]:
            w.add_document(d)
    ds = IndexedDataset(prefix)
    assert len(ds) == ds.num_documents == len(docs)
    assert ds.num_tokens == sum(map(len, docs))
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)
    d = docs[3]
    assert np.array_equal(ds.get(3, offset=1, length=len(d) - 1), d[1:])
    with pytest.raises(IndexError):
        ds.get(3, offset=1, length=len(d))


def test_int32_for_large_vocab():
    assert best_dtype(50257) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(128256) == np.int32


def test_out_of_range_ids_refused(tmp_path):
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        with pytest.raises(ValueError, match="outside the range"):
            w.add_documents(np.array([70000], np.int64), [1])
        w.add_document([1])


def test_no_final_files_until_finalize_and_discard_on_error(tmp_path):
    prefix = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix) as w:
            w.add_document([1, 2])
            assert not os.path.exists(data_file_path(prefix)) and not os.path.exists(index_file_path(prefix))
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_refuses_overwrite(tmp_path):
    prefix = tmp_path / "d"
    with IndexedDatasetWriter(prefix) as w:
        w.add_document([1])
    with pytest.raises(FileExistsError, match="overwrite"):
        IndexedDatasetWriter(prefix)
    with IndexedDatasetWriter(prefix, overwrite=True) as w:
        w.add_document([2, 3])
    assert IndexedDataset(prefix).num_tokens == 2


def _write(prefix, docs):
    with IndexedDatasetWriter(prefix) as w:
        for d in docs:
            w.add_document(d)


def test_truncated_bin_refused(tmp_path):
    prefix = tmp_path / "d"
    _write(prefix, [[1, 2, 3], [4, 5]])
    with open(data_file_path(prefix), "r+b") as f:
        f.truncate(6)
    with pytest.raises(ValueError, match="mismatched or truncated"):
        IndexedDataset(prefix)


def test_truncated_idx_refused(tmp_path):
    prefix = tmp_path / "d"
    _write(prefix, [[1, 2, 3], [4, 5]])
    with open(index_file_path(prefix), "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        IndexedDataset(prefix)


def test_mismatched_pair_refused(tmp_path):
    _write(tmp_path / "a", [[1, 2, 3], [4, 5]])
    _write(tmp_path / "b", [[1, 2, 3, 4, 5, 6]])
    os.replace(data_file_path(tmp_path / "b"), data_file_path(tmp_path / "a"))
    with pytest.raises(ValueError, match="mismatched"):
        IndexedDataset(tmp_path / "a")


def test_bad_magic_and_missing_file(tmp_path):
    prefix = tmp_path / "d"
    _write(prefix, [[1]])
    raw = bytearray(open(index_file_path(prefix), "rb").read())
    raw[0:7] = b"NOTIDX!"
    open(index_file_path(prefix), "wb").write(raw)
    with pytest.raises(ValueError, match="not a Megatron MMIDIDX"):
        IndexedDataset(prefix)
    os.remove(data_file_path(prefix))
    with pytest.raises(FileNotFoundError, match=r"needs both"):
        IndexedDataset(prefix)
