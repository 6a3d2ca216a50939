#!/usr/bin/env bash
# The main job, end to end, on the corpus shipped in data/ (Shakespeare, public domain), nanoGPT's
# shakespeare_char setting. Stage implemented so far: ftfy-clean + tokenize into Megatron indexed datasets.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
mkdir -p out/demo
python tools/preprocess_data.py \
  --input data/shakespeare/tinyshakespeare.txt --txt-separator '\n\n' \
  --tokenizer-type CharLevelTokenizer --build-char-vocab --vocab-file out/demo/chars.json \
  --output-prefix out/demo/shakespeare --append-eod --workers 2 --overwrite
python tools/dataset_info.py out/demo/shakespeare_text_document --split 90,10,0 --seq-len 256
