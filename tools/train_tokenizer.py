#!/usr/bin/env python
"""Train a GPT-2-style byte-level BPE tokenizer (Hugging Face ``tokenizers``, offline) into a tokenizer.json.

Reads the same inputs as tools/preprocess_data.py. Example:
    python tools/train_tokenizer.py --input data.jsonl.zst --vocab-size 32000 --ftfy --output out/tokenizer.json
    python tools/preprocess_data.py --input data.jsonl.zst --output-prefix out/corpus \\
        --tokenizer-type HFTokenizer --tokenizer-file out/tokenizer.json --append-eod
"""
from __future__ import annotations

import argparse
import codecs
import json
import sys

from megagpt.data.tokenizers import GPT2_EOD
from megagpt.data.train_tokenizer import train_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="files, directories or globs of .jsonl[.gz|.zst], .json.zst, .txt[.gz|.zst], .parquet")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose text to train on")
    p.add_argument("--txt-separator", default=None,
                   help="split .txt files into documents at this string (Python escapes allowed, e.g. '\\n\\n\\n'); "
                        "default: one document per file")
    p.add_argument("--vocab-size", type=int, required=True,
                   help="tokens in the vocabulary, the 256 byte symbols and the special tokens included")
    p.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen at least this many times")
    p.add_argument("--special-tokens", nargs="+", default=[GPT2_EOD],
                   help=f"special tokens, given ids 0, 1, ... in this order (default: {GPT2_EOD})")
    p.add_argument("--ftfy", action="store_true",
                   help="ftfy-clean documents first (do so when preprocess_data.py will clean them: its default)")
    p.add_argument("--output", required=True, help="path of the tokenizer.json to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    separator = codecs.decode(args.txt_separator, "unicode_escape") if args.txt_separator is not None else None
    try:
        summary = train_tokenizer(args.input, args.output, args.vocab_size, min_frequency=args.min_frequency,
                                  special_tokens=args.special_tokens, json_keys=args.json_keys, ftfy=args.ftfy,
                                  txt_separator=separator, overwrite=args.overwrite,
                                  show_progress=not args.no_progress)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"documents         {summary['documents']:,} ({summary['text_bytes'] / 1e6:,.1f} MB of text)")
    if summary["skipped"]:
        print(f"skipped records   {json.dumps(summary['skipped'])}")
    for key, skipped in summary["key_skipped"].items():
        if skipped:
            print(f"[{key}] skipped   {json.dumps(skipped)}")
    print(f"vocabulary        {summary['vocab_size']:,} tokens (asked {summary['requested_vocab_size']:,})")
    print(f"special tokens    {json.dumps(summary['special_tokens'], ensure_ascii=False)}")
    eod = (f"{summary['eod_token']} = {summary['eod']}" if summary["eod_token"] is not None
           else "none found: pass --eod-token to preprocess_data.py")
    print(f"end of document   {eod}")
    print(f"wrote {summary['output']} in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
