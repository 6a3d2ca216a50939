#!/usr/bin/env python
"""Convert a megagpt training checkpoint into one consolidated (layout-independent, "universal") checkpoint.

    python tools/convert_checkpoint.py --load runs/gpt1b --to consolidated --output runs/gpt1b-consolidated [--dtype bf16]

``--load``: a training ``--save`` directory (its ``latest`` checkpoint) or one step directory, written with any
tensor- and data-parallel size, ZeRO-0/1/2 (or any pipeline-parallel size under ZeRO-1), torch AdamW or
bitsandbytes 8-bit. The output
holds the full weights (model.safetensors, fp32 or bf16), the optimizer moments (optimizer.safetensors, fp32),
the training state (state.json) and the resolved config (config.json). Resume it in any (tp, pp, dp) layout with
``pretrain.py --load OUTPUT`` (this is how a run changes its parallel layout); ``--weights-only`` leaves the
optimizer out (a release, or the start of a new run with ``checkpoint.init_from``). ``--to universal`` is the
same format under its earlier name.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":  # run from a checkout without installing: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.convert import consolidate, save_universal  # noqa: E402
from megagpt.convert.universal import DTYPES, weights_only  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="training --save directory or checkpoint step directory")
    parser.add_argument("--to", choices=("consolidated", "universal"), default="consolidated",
                        help="output format (universal: the same as consolidated)")
    parser.add_argument("--output", required=True, help="directory to create (written as OUTPUT.partial, then renamed)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="weights dtype (optimizer moments are always fp32; resuming from bf16 weights rounds "
                             "the fp32 masters)")
    parser.add_argument("--weights-only", action="store_true", help="leave the optimizer state out")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.path.exists(args.output) and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite to replace it or choose another --output",
              file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        universal = consolidate(args.load, progress=not args.quiet)
        if args.weights_only:
            universal = weights_only(universal)
        out = save_universal(universal, args.output, dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, NotImplementedError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    universal.weights_dtype = args.dtype
    drift = universal.source.get("replicas_differing")
    if drift:
        print(f"note: {len(drift)} replicated parameters differed between tensor-parallel ranks or pipeline stages "
              f"(largest {max(drift.values()):.3g}); tensor-parallel rank 0's / the first stage's copies were kept")
    total = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out}: {universal.describe()}; {total:,} bytes on disk in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
