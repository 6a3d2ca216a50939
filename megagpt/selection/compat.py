"""Does a checkpoint's tokenizer fit an indexed dataset? One function, so that the dataset's own tokenizer record
(type, vocabulary size, EOD id, fingerprint of its files: issue 16) extends it in one place."""
from __future__ import annotations

import numpy as np

from megagpt.data.indexed import IndexedDataset, data_file_path


def largest_token_id(dataset: IndexedDataset) -> int:
    """The largest token id in the dataset's ``.bin`` (-1 when it holds no tokens), read in 64 Mi-token pieces."""
    if dataset.num_tokens == 0:
        return -1
    tokens = np.memmap(data_file_path(dataset.path_prefix), mode="r", dtype=dataset.dtype)
    piece = 1 << 26
    return int(max(int(tokens[i:i + piece].max()) for i in range(0, len(tokens), piece)))


def check_tokenizer_fits(weights, dataset: IndexedDataset, tokenizer=None) -> dict:
    """Refuse (ValueError naming both) a checkpoint whose tokenizer disagrees with ``dataset``.

    What is checked today: the dataset's largest token id is inside the vocabulary of the tokenizer recorded in the
    checkpoint (``tokenizer``: one built from flags instead, as ``ModelWeights.build_tokenizer``), and inside the
    model's embedding either way. Returns what was compared, for the score file's metadata."""
    largest = largest_token_id(dataset)
    model_vocab = weights.model_config.vocab_size
    described = tokenizer.describe() if tokenizer is not None else None
    limit, owner = model_vocab, f"the model of {weights.source} (model.vocab_size={model_vocab})"
    if tokenizer is not None:
        limit, owner = tokenizer.vocab_size, f"the tokenizer of {weights.source} ({described})"
    if largest >= limit:
        raise ValueError(f"dataset {dataset.path_prefix} holds token id {largest}, outside the {limit}-token "
                         f"vocabulary of {owner}: the dataset was tokenized with another tokenizer. Score it with "
                         "a checkpoint of its own tokenizer (or re-tokenize it)")
    return {"largest_token_id": largest, "model_vocab_size": model_vocab, "tokenizer": described,
            "tokenizer_vocab_size": tokenizer.vocab_size if tokenizer is not None else None}
