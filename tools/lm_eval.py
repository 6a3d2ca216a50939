#!/usr/bin/env python
"""lm-evaluation-harness with megagpt models registered: every lm-eval flag works, plus ``--model megagpt``.

Example:
    python tools/lm_eval.py --model megagpt --model_args load=out/demo/run --batch_size 8 \\
        --tasks lambada_openai,hellaswag --output_path out/demo/lm_eval
    # local task YAMLs (their data_files are resolved against the working directory)
    cd tests/data/lm_eval_tasks && python ../../../tools/lm_eval.py --model megagpt \\
        --model_args load=$PWD/../../../out/demo/run,dtype=float32 --device cpu --include_path . \\
        --tasks megagpt_tiny_mc,megagpt_tiny_ppl,megagpt_tiny_gen --limit 5

model_args of megagpt (megagpt/lm_eval_adapter.py): load=<checkpoint> (training save or step dir of any layout,
consolidated dir, or a weights file with model_config=<json>), dtype (float32|bfloat16|float16), max_length
(default: the model's seq_len; ALiBi models may exceed it), max_gen_toks, seed, attention_backend, and
tokenizer_type/vocab_file/merge_file/tokenizer_file/eod_token when the checkpoint's config records no tokenizer.
Batch size and device are lm-eval's own --batch_size (an integer) and --device: lm-eval defaults to cuda:0, so
give --device cpu on a machine without a GPU. ``python tools/lm_eval.py run --help`` lists lm-eval's flags.
"""
import os
import sys

# Run as a script, this file's directory comes first on sys.path, and this file's name would then hide the
# lm_eval package itself: drop the directory before importing lm_eval.
_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _TOOLS]

import megagpt.lm_eval_adapter  # noqa: E402,F401  registers --model megagpt before lm-eval parses its arguments
from lm_eval.__main__ import cli_evaluate  # noqa: E402

if __name__ == "__main__":
    cli_evaluate()
