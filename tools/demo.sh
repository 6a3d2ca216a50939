#!/usr/bin/env bash
# The main job, end to end, on the corpus shipped in data/ (Shakespeare, public domain), nanoGPT's
# shakespeare_char setting: preprocess -> train on 2 data-parallel ranks with DeepSpeed (2 CPU ranks without a
# GPU; on GPUs one rank per GPU, at most 2: one on a one-GPU machine) ->
# checkpoint and stop half-way -> the same command again resumes -> validation perplexity -> a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
source tools/venv.sh
mkdir -p out/demo
python tools/preprocess_data.py \
  --input data/shakespeare/tinyshakespeare.txt --txt-separator '\n\n' \
  --tokenizer-type CharLevelTokenizer --build-char-vocab --vocab-file out/demo/chars.json \
  --output-prefix out/demo/shakespeare --append-eod --workers 2 --overwrite
python tools/dataset_info.py out/demo/shakespeare_text_document --split 90,10,0 --seq-len 128

rm -rf out/demo/run   # a fresh run each time the demo is started
# the ranks this machine can hold: one per GPU (at most 2, the batch of 16 = 2 x micro batch 8), 2 on CPU
ranks=$(python -c "import torch; print(min(torch.cuda.device_count(), 2) or 2)")
port=$(python -c "from megagpt.engine import free_port; print(free_port())")  # not 29500: another run may hold it
echo "== $ranks rank(s) on $(python -c "import torch; print('GPU' if torch.cuda.is_available() else 'CPU')")"
train=(deepspeed --num_gpus "$ranks" --master_port "$port" megagpt/pretrain.py --config configs/tiny.json --save out/demo/run
       --train-iters 200 --eval-interval 100 --set batch.micro_batch=8 --set schedule.warmup_iters=20
       --set tokenizer.type=CharLevelTokenizer --set tokenizer.vocab_file=out/demo/chars.json)
echo "== training, stopping after the checkpoint at step 100 (as if the job were preempted)"
"${train[@]}" --exit-interval 100
echo "== the same command again: resumes from out/demo/run/latest and finishes"
"${train[@]}"
echo "== validation loss and perplexity (out/demo/run/metrics.jsonl):"
grep valid_loss out/demo/run/metrics.jsonl
python tools/plot_metrics.py --metrics out/demo/run/metrics.jsonl --output out/demo/run/metrics.png --overwrite
echo "== a sample from the trained model"
python tools/generate.py --checkpoint out/demo/run --prompt "ROMEO:" --max-new-tokens 200 --top-k 20 --seed 1
echo "== evaluation: validation perplexity at three context lengths (ALiBi past its training length of 128)"
python tools/evaluate.py --load out/demo/run --data-path out/demo/shakespeare_text_document --split-name valid \
  --seq-lengths 128,256,512 --max-windows 64 --output out/demo/eval.json --overwrite --quiet
echo "== conversion: a Hugging Face export (custom code for ALiBi models), verified against megagpt by logits"
python tools/convert_checkpoint.py --load out/demo/run --to hf --output out/demo/hf --overwrite
