#!/usr/bin/env python
"""Generate text from a trained megagpt model (KV-cached; greedy, temperature, top-k, top-p).

Example:
    python tools/generate.py --checkpoint out/demo/run --prompt "ROMEO:" --num-samples 3 --max-new-tokens 200 \\
        --top-k 50 --seed 1234
``--checkpoint``: a training save directory (any parallel layout), a consolidated directory, or a weights file with
``--model-config``. The tokenizer is the one recorded in the checkpoint's config (its ``tokenizer`` section) unless
``--tokenizer-type`` and its files are given.
``--prompt FILE:path`` reads the prompt from a file; an empty prompt starts from the EOD token.
"""
from __future__ import annotations

import argparse

import torch

from megagpt.convert.weights import build_gpt, read_model_weights
from megagpt.data.tokenizers import TOKENIZER_ALIASES
from megagpt.generate import generate_text, read_prompt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="a training --save directory or step directory (any parallel layout), a consolidated "
                        "directory, or a state dict file (.safetensors, or a torch file loaded weights-only)")
    g.add_argument("--model-config", default=None,
                   help="JSON ModelConfig (or a full config with a 'model' section); default for a training "
                        "checkpoint: the config saved beside it")
    g.add_argument("--attention-backend", default=None,
                   help="override the config's attention backend (triton, flex, sdpa, reference, flash)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", choices=sorted(TOKENIZER_ALIASES),
                   help="default: the tokenizer recorded in the checkpoint's config")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--tokenizer-file")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default="", help="prompt text, or FILE:path; empty starts from EOD")
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--no-stop-at-eod", action="store_true", help="keep generating past the EOD token")
    g.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence per token (debugging)")
    return p.parse_args(argv)


def main(argv=None) -> list[str]:
    """Run the command line; prints prompt + continuation per sample and returns the continuations."""
    args = parse_args(argv)
    weights = read_model_weights(args.checkpoint, args.model_config)
    tokenizer = weights.build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_file)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model = build_gpt(weights, device=args.device, dtype=dtype, attention_backend=args.attention_backend)
    prompt = read_prompt(args.prompt)
    samples = generate_text(model, tokenizer, prompt, args.max_new_tokens,
                            num_samples=args.num_samples, temperature=0.0 if args.greedy else args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            stop_at_eod=not args.no_stop_at_eod, use_kv_cache=not args.no_kv_cache)
    for sample in samples:
        print(prompt + sample)
        print("---------------")
    return samples


if __name__ == "__main__":
    main()
