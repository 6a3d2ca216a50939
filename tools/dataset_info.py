#!/usr/bin/env python
"""Describe an indexed dataset and the train/valid/test samples it yields for a sequence length.

    python tools/dataset_info.py out/demo/shakespeare_text_document --split 90,10,0 --seq-len 256
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from megagpt.data.gpt_dataset import SPLIT_NAMES, build_train_valid_test_datasets, split_document_ranges
from megagpt.data.indexed import IndexedDataset


def describe(prefix: str, split: str, seq_len: int, seed: int, cache_dir: str | None) -> dict:
    """Document/token counts of the dataset and, per split, its documents and one-epoch sample count."""
    ds = IndexedDataset(prefix)
    lengths = np.asarray(ds.sequence_lengths)
    info = {"prefix": prefix, "dtype": str(ds.dtype), "documents": len(ds), "tokens": ds.num_tokens,
            "document_tokens": {"min": int(lengths.min()), "median": float(np.median(lengths)),
                                "max": int(lengths.max())}, "splits": {}}
    splits = build_train_valid_test_datasets(ds, split, seq_len, seed=seed, cache_dir=cache_dir)
    for name, (begin, end), gpt in zip(SPLIT_NAMES, split_document_ranges(split, len(ds)), splits):
        info["splits"][name] = {"documents": end - begin,
                                "samples_per_epoch": 0 if gpt is None else len(gpt)}
    if splits[0] is not None:
        info["first_train_sample"] = splits[0][0][:16].tolist()
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    p.add_argument("--split", default="949,50,1", help="train,valid,test weights over documents")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache-dir", default=None, help="where to keep the sample index caches (default: none)")
    args = p.parse_args(argv)
    try:
        info = describe(args.prefix, args.split, args.seq_len, args.seed, args.cache_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    t = info["document_tokens"]
    print(f"{info['prefix']}: {info['documents']:,} documents, {info['tokens']:,} tokens ({info['dtype']}); "
          f"tokens per document min {t['min']}, median {t['median']:.0f}, max {t['max']}")
    for name, s in info["splits"].items():
        print(f"  {name:5s}: {s['documents']:,} documents, {s['samples_per_epoch']:,} samples of "
              f"{args.seq_len}+1 tokens per epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
