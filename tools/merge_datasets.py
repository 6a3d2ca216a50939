#!/usr/bin/env python
"""Concatenate indexed datasets (e.g. the shards of a multi-node preprocessing run), in the order given.

    python tools/merge_datasets.py --datasets out/s0_text_document out/s1_text_document \\
        --output-prefix out/corpus_text_document
"""
from __future__ import annotations

import argparse
import os
import sys

from megagpt.data.preprocess import merge_datasets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--datasets", nargs="+", help="dataset prefixes (without .bin/.idx), merged in this order")
    src.add_argument("--input", help="a directory: merge every dataset in it, sorted by name (Megatron's behaviour)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    prefixes = args.datasets
    if args.input:
        prefixes = sorted(os.path.join(args.input, f[:-4]) for f in os.listdir(args.input) if f.endswith(".idx"))
    try:
        info = merge_datasets(prefixes, args.output_prefix, overwrite=args.overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets into {info['output_prefix']}.bin/.idx: "
          f"{info['documents']:,} documents, {info['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
