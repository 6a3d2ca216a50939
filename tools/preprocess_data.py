#!/usr/bin/env python
"""Clean (ftfy), tokenize and write corpora as Megatron-compatible indexed datasets (.bin/.idx).

Flags follow Megatron-LM / GPT-NeoX where they exist. Example:
    python tools/preprocess_data.py --input data.jsonl.zst --output-prefix out/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2/vocab.json --merge-file gpt2/merges.txt \\
        --append-eod --workers 2
writes out/corpus_text_document.bin/.idx and out/corpus_report.json.
"""
from __future__ import annotations

import argparse
import codecs
import json
import sys

from megagpt.data.preprocess import PreprocessOptions, preprocess
from megagpt.data.sources import find_sources, iter_units
from megagpt.data.tokenizers import TOKENIZER_ALIASES, build_char_vocab, build_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True,
                   help="files, directories or globs of .jsonl[.gz|.zst], .json.zst, .txt[.gz|.zst], .parquet")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract; one dataset per key")
    g.add_argument("--txt-separator", default=None,
                   help="split .txt files into documents at this string (Python escapes allowed, e.g. '\\n\\n\\n'); "
                        "default: one document per file")
    g.add_argument("--num-shards", type=int, default=1, help="split the corpus into this many contiguous shards")
    g.add_argument("--shard-index", type=int, default=0, help="which shard this process writes")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=sorted(TOKENIZER_ALIASES))
    g.add_argument("--vocab-file", help="GPT-2 vocab.json, or the character alphabet JSON for CharLevelTokenizer")
    g.add_argument("--merge-file", help="GPT-2 merges.txt")
    g.add_argument("--tokenizer-file", help="a Hugging Face tokenizer.json (HFTokenizer)")
    g.add_argument("--eod-token", help="end-of-document token of a Hugging Face tokenizer")
    g.add_argument("--build-char-vocab", action="store_true",
                   help="CharLevelTokenizer: first collect the corpus alphabet into --vocab-file")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to every document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g.add_argument("--overwrite", action="store_true", help="replace existing output datasets")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes (output is identical for every count)")
    g.add_argument("--no-ftfy", action="store_true", help="skip ftfy.fix_text cleaning")
    g.add_argument("--strict", action="store_true", help="exit non-zero at the first bad record instead of skipping")
    g.add_argument("--log-interval", type=int, default=10000, help="with --no-progress: print a progress line every N documents")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _char_vocab(args, separator: str | None) -> None:
    if not args.vocab_file:
        raise SystemExit("error: --build-char-vocab needs --vocab-file (where to write the alphabet)")
    sep = separator.encode() if separator else None

    def texts():
        for src in find_sources(args.input):
            for unit in iter_units(src, args.json_keys, txt_separator=sep):
                if unit.format == "jsonl":
                    for line in unit.payload.splitlines():
                        if line.strip():
                            obj = json.loads(line)
                            yield from (obj[k] for k in args.json_keys if isinstance(obj.get(k), str))
                else:
                    yield from (v.decode("utf-8") if isinstance(v, bytes) else v
                                for _, doc in unit.payload for v in doc.values() if isinstance(v, (str, bytes)))
    build_char_vocab(texts(), args.vocab_file)


def main(argv=None) -> int:
    args = parse_args(argv)
    separator = codecs.decode(args.txt_separator, "unicode_escape") if args.txt_separator is not None else None
    try:
        if args.build_char_vocab:
            _char_vocab(args, separator)
        tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_file,
                                    args.eod_token)
        report = preprocess(PreprocessOptions(
            inputs=args.input, output_prefix=args.output_prefix, tokenizer=tokenizer, json_keys=args.json_keys,
            append_eod=args.append_eod, ftfy=not args.no_ftfy, workers=args.workers, strict=args.strict,
            overwrite=args.overwrite, num_shards=args.num_shards, shard_index=args.shard_index,
            txt_separator=separator, progress=not args.no_progress, log_interval=args.log_interval))
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(report)
    return 0


def print_summary(report: dict) -> None:
    print(f"records read      {report['records_read']:,}")
    print(f"documents written {report['documents_written']:,}")
    for reason, info in report["skipped"].items():
        print(f"skipped ({reason}) {info['count']:,}  first at {info['first']}")
    for key, out in report["outputs"].items():
        print(f"[{key}] {out['prefix']}.bin/.idx: {out['documents']:,} documents, {out['tokens']:,} tokens")
        for reason, info in out["skipped"].items():
            print(f"[{key}] skipped ({reason}) {info['count']:,}  first at {info['first']}")
    print(f"input {report['input_bytes'] / 1e6:,.1f} MB in {report['seconds']:.1f} s: "
          f"{report['mb_per_s']:.2f} MB/s, {report['tokens_per_s']:,.0f} tokens/s")
    print(f"report: {report['report_path']}")


if __name__ == "__main__":
    sys.exit(main())
