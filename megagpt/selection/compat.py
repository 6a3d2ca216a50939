"""Does a checkpoint's tokenizer fit an indexed dataset? The dataset's tokenizer record (megagpt/data/
tokenizer_record.py: type, vocabulary size, EOD id, fingerprint of its files) against the checkpoint's tokenizer,
and the dataset's largest token id against both vocabularies."""
from __future__ import annotations

from megagpt.data import tokenizer_record
from megagpt.data.indexed import IndexedDataset


def check_tokenizer_fits(weights, dataset: IndexedDataset, tokenizer=None) -> dict:
    """Refuse (ValueError naming both) a checkpoint whose tokenizer disagrees with ``dataset``.

    ``tokenizer``: the checkpoint's recorded tokenizer (or one built from flags, as ``ModelWeights.build_tokenizer``).
    When the dataset has a tokenizer record, its fingerprint and EOD id must equal that tokenizer's; either way the
    dataset's largest token id (cached scan for data without a record) must lie inside the tokenizer's vocabulary
    and the model's embedding. Returns what was compared, for the score file's metadata."""
    prefix = dataset.path_prefix
    record = tokenizer_record.read_record(prefix)
    described = tokenizer.describe() if tokenizer is not None else None
    if record is not None and tokenizer is not None:
        fingerprint = tokenizer_record.tokenizer_fingerprint(tokenizer)
        if fingerprint != record.fingerprint or int(tokenizer.eod) != record.eod:
            raise ValueError(f"dataset {prefix} was made with {record.type} (fingerprint {record.fingerprint}, eod "
                             f"{record.eod}; {tokenizer_record.record_path(prefix)}) but {weights.source} records "
                             f"{described} (fingerprint {fingerprint}, eod {tokenizer.eod}): different vocabularies. "
                             "Score it with a checkpoint of its own tokenizer (or re-tokenize it)")
    largest = record.max_token_id if record is not None else tokenizer_record.largest_token_id(prefix)
    model_vocab = weights.model_config.vocab_size
    limit, owner = model_vocab, f"the model of {weights.source} (model.vocab_size={model_vocab})"
    if tokenizer is not None:
        limit, owner = tokenizer.vocab_size, f"the tokenizer of {weights.source} ({described})"
    if largest >= limit:
        raise ValueError(f"dataset {prefix} holds token id {largest}, outside the {limit}-token "
                         f"vocabulary of {owner}: the dataset was tokenized with another tokenizer. Score it with "
                         "a checkpoint of its own tokenizer (or re-tokenize it)")
    return {"largest_token_id": largest, "model_vocab_size": model_vocab, "tokenizer": described,
            "tokenizer_vocab_size": tokenizer.vocab_size if tokenizer is not None else None,
            "dataset_tokenizer_record": record.to_dict() if record is not None else None}
