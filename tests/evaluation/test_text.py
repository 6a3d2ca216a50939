"""megagpt/evaluation/text.py: bits per byte / char of the original text, and the data split's token stream."""
import math

import numpy as np
import pytest
import torch

from megagpt.data.gpt_dataset import split_document_ranges
from megagpt.data.indexed import IndexedDatasetWriter
from megagpt.data.tokenizers import ByteLevelTokenizer
from megagpt.evaluation import evaluate_data, evaluate_text, split_tokens

TEXT = "Grüße aus Köln! 日本語のテキスト ✓ naïve café — fin.\n"  # multibyte UTF-8: bytes != chars


def total_nll(model, tokens) -> float:
    """NLL (nats) of tokens[1:], one forward over the whole stream (it fits in the model's seq_len)."""
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
    with torch.no_grad():
        logits = model(tokens[:, :-1]).double()
    return torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:], reduction="sum").item()


def test_bits_per_byte_and_char_of_multibyte_text(byte_model, tmp_path):
    path = tmp_path / "multi.txt"
    path.write_text(TEXT, encoding="utf-8")
    n_bytes, n_chars = len(TEXT.encode("utf-8")), len(TEXT)
    assert n_bytes > n_chars + 20
    tokens = ByteLevelTokenizer().encode(TEXT)
    result = evaluate_text(byte_model, ByteLevelTokenizer(), path, seq_length=n_bytes, stride=n_bytes, batch_size=2)
    nats = total_nll(byte_model, tokens)
    assert (result["bytes"], result["chars"], result["tokens"]) == (n_bytes, n_chars, n_bytes - 1)
    assert result["task"] == "text:multi.txt" and result["windows"] == 1
    for key, denominator in (("bits_per_byte", n_bytes), ("bits_per_char", n_chars)):
        expected = nats / math.log(2) / denominator
        assert abs(result[key] - expected) < 1e-5, f"{key} {result[key]} vs {expected}"
    assert abs(result["loss"] - nats / (n_bytes - 1)) < 1e-5


@pytest.mark.parametrize("seq_length,windows,whole_chars", [(12, 3, True), (16, 2, False)])
def test_max_windows_counts_the_covered_prefix(byte_model, tmp_path, seq_length, windows, whole_chars):
    path = tmp_path / "t.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    result = evaluate_text(byte_model, ByteLevelTokenizer(), path, seq_length, seq_length, 4, max_windows=windows)
    covered = seq_length * windows + 1  # token 0 and the targets of the windows scored
    assert result["truncated"] and result["tokens"] == covered - 1
    prefix = TEXT.encode("utf-8")[:covered]
    if whole_chars:  # 37 bytes end on a character boundary
        assert (result["bytes"], result["chars"]) == (covered, len(prefix.decode("utf-8")))
        assert abs(result["bits_per_byte"] - result["nll_sum"] / math.log(2) / covered) < 1e-9
    else:  # 33 bytes cut a multibyte character in two: that prefix is no text, so no bits per byte
        assert result["bytes"] is None and result["bits_per_byte"] is None and result["bits_per_char"] is None


def test_text_file_errors(byte_model, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        evaluate_text(byte_model, ByteLevelTokenizer(), bad, 8, 8, 1)
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_text(byte_model, ByteLevelTokenizer(), tmp_path / "none.txt", 8, 8, 1)


def test_data_split_is_the_training_document_split(byte_model, tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, int(rng.integers(3, 12))).tolist() + [256] for _ in range(40)]
    with IndexedDatasetWriter(tmp_path / "corpus") as writer:
        for doc in docs:
            writer.add_document(doc)
    begin, end = split_document_ranges("80,15,5", len(docs))[1]
    expected = np.concatenate([docs[i] for i in range(begin, end)])
    np.testing.assert_array_equal(split_tokens(tmp_path / "corpus", "80,15,5", "valid"), expected)
    result = evaluate_data(byte_model, tmp_path / "corpus", "80,15,5", "valid", 32, 32, 4)
    assert result["task"] == "data:corpus:valid" and result["tokens"] == len(expected) - 1
    nll = sum(total_nll(byte_model, expected[i:i + 33]) for i in range(0, len(expected) - 1, 32))
    assert abs(result["loss"] - nll / (len(expected) - 1)) < 1e-5
    with pytest.raises(ValueError, match="holds no documents"):
        evaluate_data(byte_model, tmp_path / "corpus", "100,0,0", "valid", 32, 32, 4)
    with pytest.raises(ValueError, match="corpus.idx not found"):
        split_tokens(tmp_path / "missing" / "corpus", "80,15,5", "valid")


def test_a_byte_order_mark_is_not_text(byte_model, tmp_path):
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_bytes("naïve text, twice naïve".encode())
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    a = evaluate_text(byte_model, ByteLevelTokenizer(), plain, 8, 4, 2)
    b = evaluate_text(byte_model, ByteLevelTokenizer(), marked, 8, 4, 2)
    assert {k: v for k, v in a.items() if k != "task"} == {k: v for k, v in b.items() if k != "task"}
