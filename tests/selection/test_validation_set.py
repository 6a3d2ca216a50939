"""megagpt/selection/validation_set.py: a text file or an indexed split as the validation set, refused when its
tokenizer is not the training set's (as the preprocessing reports record them) or its ids leave the vocabulary."""
import json

import numpy as np
import pytest

from influence_testing import write_dataset
from megagpt.data.tokenizers import ByteLevelTokenizer
from megagpt.selection.validation_set import load_validation_set

BYTE = {"type": "ByteLevelTokenizer", "vocab_size": 257, "eod": 256}
CHAR = {"type": "CharLevelTokenizer", "vocab_file": "/nowhere/chars.json", "vocab_size": 60, "eod": 59}


def _dataset_with_report(root, name, tokenizer, documents):
    prefix = write_dataset(root / f"{name}_text_document", documents)
    (root / f"{name}_report.json").write_text(json.dumps({"tokenizer": tokenizer,
                                                          "outputs": {"text": {"prefix": prefix}}}))
    return prefix


def test_a_text_file_is_tokenized_with_the_training_sets_tokenizer(tmp_path):
    train = _dataset_with_report(tmp_path, "train", BYTE, [np.arange(10)])
    text = tmp_path / "heldout.txt"
    text.write_text("to be or not to be")
    valid = load_validation_set(train, 257, text_file=str(text), tokenizer=ByteLevelTokenizer())
    np.testing.assert_array_equal(valid.tokens, ByteLevelTokenizer().encode("to be or not to be"))
    assert valid.record["tokens"] == 18 and valid.record["text_file"] == str(text)
    with pytest.raises(ValueError, match="records no tokenizer"):
        load_validation_set(train, 257, text_file=str(text))
    with pytest.raises(ValueError, match="exactly one of --valid-data-path and --valid-text-file"):
        load_validation_set(train, 257, data_path=train, text_file=str(text))


def test_another_tokenizer_or_vocabulary_is_refused(tmp_path):
    train = _dataset_with_report(tmp_path, "train", CHAR, [np.arange(10)])
    text = tmp_path / "heldout.txt"
    text.write_text("abc")
    with pytest.raises(ValueError, match=r"heldout.txt shares no tokenizer with the training set .*train_text_document"):
        load_validation_set(train, 257, text_file=str(text), tokenizer=ByteLevelTokenizer())
    other = _dataset_with_report(tmp_path, "other", BYTE, [np.arange(300) % 257])
    with pytest.raises(ValueError, match="shares no tokenizer"):
        load_validation_set(train, 257, data_path=other, split="1")
    unrecorded = write_dataset(tmp_path / "plain", [np.arange(100)])  # no report: only the ids can be checked
    with pytest.raises(ValueError, match="token id 99, outside the model's vocabulary"):
        load_validation_set(train, 64, data_path=unrecorded, split="0,1,0")
