"""megagpt/selection/compat.py: a checkpoint's tokenizer against the dataset's tokenizer record and largest id."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from megagpt.data import tokenizer_record
from megagpt.data.indexed import IndexedDataset, IndexedDatasetWriter
from megagpt.data.tokenizers import ByteLevelTokenizer
from megagpt.selection.compat import check_tokenizer_fits


def _dataset(tmp_path, ids, record=None):
    prefix = tmp_path / "d"
    with IndexedDatasetWriter(prefix) as writer:
        writer.add_document(np.asarray(ids))
    if record is not None:
        tokenizer_record.write_record(prefix, record)
    return IndexedDataset(prefix)


def _weights(vocab_size=300):
    return SimpleNamespace(source="ckpt/", model_config=SimpleNamespace(vocab_size=vocab_size))


def test_a_matching_record_passes_and_is_reported(tmp_path):
    tok = ByteLevelTokenizer()
    dataset = _dataset(tmp_path, [1, 2, 200], tokenizer_record.record_for(tok, 200))
    checked = check_tokenizer_fits(_weights(), dataset, tok)
    assert checked["largest_token_id"] == 200 and checked["dataset_tokenizer_record"]["type"] == tok.describe()["type"]


def test_a_record_of_another_tokenizer_is_refused_naming_both(tmp_path):
    tok = ByteLevelTokenizer()
    other = dataclasses.replace(tokenizer_record.record_for(tok, 5), fingerprint="sha256:" + "0" * 64)
    dataset = _dataset(tmp_path, [1, 2, 5], other)  # ids fit: only the record can tell
    with pytest.raises(ValueError, match=r"d\.tokenizer\.json.*ckpt/.*different vocabularies"):
        check_tokenizer_fits(_weights(), dataset, tok)


def test_without_a_record_ids_past_the_vocabulary_are_refused(tmp_path):
    dataset = _dataset(tmp_path, [1, 2, 290])
    with pytest.raises(ValueError, match="token id 290, outside the 257-token vocabulary"):
        check_tokenizer_fits(_weights(), dataset, ByteLevelTokenizer())
    with pytest.raises(ValueError, match="token id 290, outside the 280-token"):
        check_tokenizer_fits(_weights(280), dataset)
