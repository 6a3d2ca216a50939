#!/usr/bin/env python
"""Convert megagpt checkpoints: consolidate a training checkpoint, export it to Hugging Face, or import one.

    python tools/convert_checkpoint.py --load runs/gpt1b --to consolidated --output runs/gpt1b-consolidated [--dtype bf16]
    python tools/convert_checkpoint.py --load runs/gpt1b --to hf --output runs/gpt1b-hf [--hf-arch auto|gpt2|custom]
    python tools/convert_checkpoint.py --from-hf path/to/gpt2 --to megagpt --output runs/gpt2-megagpt

``--load``: a training ``--save`` directory (its ``latest`` checkpoint) or one step directory, written with any
tensor- and data-parallel size, ZeRO-0/1/2 (or any pipeline-parallel size under ZeRO-1), torch AdamW or
bitsandbytes 8-bit.

``--to consolidated``: the full weights (model.safetensors, fp32 or bf16), the optimizer moments
(optimizer.safetensors, fp32), the training state (state.json) and the resolved config (config.json). Resume it in
any (tp, pp, dp) layout with ``pretrain.py --load OUTPUT`` (this is how a run changes its parallel layout);
``--weights-only`` leaves the optimizer out (a release, or the start of a new run with ``checkpoint.init_from``).
``--to universal`` is the same format under its earlier name.

``--to hf``: a Hugging Face directory (``--load`` may also be a consolidated directory, or a weights file with
``--model-config``): the built-in GPT2LMHeadModel when the model computes exactly GPT-2's function, else megagpt's
own architecture as custom code (``trust_remote_code=True``); the tokenizer recorded in the config (or given with
the tokenizer flags) is saved beside it. The export is checked against megagpt's logits before it is renamed into
place. ``--from-hf DIR --to megagpt``: a local GPT-2 (or one of our custom-code exports) as a weights-only
consolidated checkpoint with its tokenizer, ready for ``checkpoint.init_from``. See docs/conversion.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":  # run from a checkout without installing: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.convert import consolidate, save_universal  # noqa: E402
from megagpt.convert.universal import DTYPES  # noqa: E402

TOKENIZER_FLAGS = ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_file", "eod_token")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--load", help="training --save directory or checkpoint step directory (--to hf: also a "
                                       "consolidated directory or a weights file)")
    source.add_argument("--from-hf", metavar="DIR", help="a local Hugging Face GPT-2 directory or one of our "
                                                         "custom-code exports, to import (--to megagpt)")
    parser.add_argument("--to", choices=("consolidated", "universal", "hf", "megagpt"), default=None,
                        help="output format (default: consolidated, or megagpt with --from-hf; universal: the same "
                             "as consolidated)")
    parser.add_argument("--output", required=True, help="directory to create (written as OUTPUT.partial, then renamed)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="weights dtype (consolidated and megagpt: fp32 or bf16; optimizer moments are always "
                             "fp32, and resuming from bf16 weights rounds the fp32 masters)")
    parser.add_argument("--weights-only", action="store_true", help="--to consolidated: leave the optimizer state out")
    parser.add_argument("--hf-arch", choices=("auto", "gpt2", "custom"), default="auto",
                        help="--to hf: GPT2LMHeadModel (gpt2), megagpt custom code (custom), or gpt2 when exact (auto)")
    parser.add_argument("--model-config", help="--to hf with a bare weights file: its model config JSON")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="--to megagpt: pad the vocabulary to a multiple of this (match the run that continues "
                             "from it with checkpoint.init_from)")
    parser.add_argument("--no-verify", action="store_true",
                        help="--to hf: skip loading the export back and comparing its logits with megagpt's")
    tokenizer = parser.add_argument_group("tokenizer for --to hf (default: the one recorded in the config)")
    tokenizer.add_argument("--tokenizer-type", help="GPT2BPETokenizer, HFTokenizer, CharLevelTokenizer, "
                                                    "ByteLevelTokenizer (or a Megatron/NeoX alias)")
    tokenizer.add_argument("--vocab-file", help="GPT2BPETokenizer: vocab.json; CharLevelTokenizer: alphabet JSON")
    tokenizer.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    tokenizer.add_argument("--tokenizer-file", help="HFTokenizer: tokenizer.json")
    tokenizer.add_argument("--eod-token", help="HFTokenizer: the end-of-document token")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.to is None:
        args.to = "megagpt" if args.from_hf else "consolidated"
    return args


def check_combinations(args: argparse.Namespace) -> None:
    """ValueError for flags that do not go together (named in the message)."""
    if (args.from_hf is not None) != (args.to == "megagpt"):
        raise ValueError("--from-hf goes with --to megagpt (and --to megagpt with --from-hf)")
    tokenizer_given = [f"--{f.replace('_', '-')}" for f in TOKENIZER_FLAGS if getattr(args, f) is not None]
    if args.to != "megagpt" and args.make_vocab_size_divisible_by != 128:
        raise ValueError("--make-vocab-size-divisible-by only applies to --from-hf (--to megagpt)")
    if args.to != "hf":
        hf_only = tokenizer_given + [flag for flag, on in (("--model-config", args.model_config),
                                                           ("--no-verify", args.no_verify),
                                                           ("--hf-arch", args.hf_arch != "auto")) if on]
        if hf_only:
            raise ValueError(f"{', '.join(hf_only)} only apply to --to hf")
        if args.dtype == "fp16":
            raise ValueError(f"--dtype fp16 only applies to --to hf; --to {args.to} takes {list(DTYPES)}")
    elif tokenizer_given and args.tokenizer_type is None:
        raise ValueError(f"{', '.join(tokenizer_given)} given without --tokenizer-type")
    if args.weights_only and args.to not in ("consolidated", "universal"):
        raise ValueError("--weights-only applies to --to consolidated (the other outputs hold weights only)")


def _consolidate(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    universal = consolidate(args.load, progress=not args.quiet, weights_only=args.weights_only)
    out = save_universal(universal, args.output, dtype=args.dtype, overwrite=args.overwrite)
    universal.weights_dtype = args.dtype
    drift = universal.source.get("replicas_differing")
    if drift:
        print(f"note: {len(drift)} replicated parameters differed between tensor-parallel ranks or pipeline stages "
              f"(largest {max(drift.values()):.3g}); tensor-parallel rank 0's / the first stage's copies were kept")
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: {universal.describe()}; {total:,} bytes on disk in {time.perf_counter() - start:.1f} s")


def _export_hf(args: argparse.Namespace) -> None:
    from megagpt.config import TokenizerConfig
    from megagpt.convert.weights import read_model_weights
    from megagpt.hf import export_hf

    tokenizer = None
    if args.tokenizer_type is not None:
        tokenizer = TokenizerConfig.from_dict({"type": args.tokenizer_type, "vocab_file": args.vocab_file,
                                               "merge_file": args.merge_file, "tokenizer_file": args.tokenizer_file,
                                               "eod_token": args.eod_token})
    weights = read_model_weights(args.load, args.model_config, progress=not args.quiet)
    out = export_hf(weights, args.output, arch=args.hf_arch, dtype=args.dtype, overwrite=args.overwrite,
                    tokenizer=tokenizer, verify=not args.no_verify)
    print(f"wrote {out}: Hugging Face export of {weights.source}")


def _import_hf(args: argparse.Namespace) -> None:
    from megagpt.hf import import_hf

    import_hf(args.from_hf, args.output, dtype=args.dtype, overwrite=args.overwrite,
              make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_combinations(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if os.path.exists(args.output) and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite to replace it or choose another --output",
              file=sys.stderr)
        return 1
    run = {"hf": _export_hf, "megagpt": _import_hf}.get(args.to, _consolidate)
    if args.quiet and args.to in ("hf", "megagpt"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        run(args)
    except (ValueError, NotImplementedError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
