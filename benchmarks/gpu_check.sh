#!/usr/bin/env bash
# One device call proves megagpt's GPU path, everything written under $OUT so that one call brings it all back:
#   0. benchmarks/smoke_train.py: megagpt/pretrain.py trains a tiny model 20 steps, stopped at 10 and resumed, on the
#      device (bf16, ZeRO-1): the loop gets past step 1, evaluates, saves, and resumes bit for bit (docs/gpu.md);
#   1. build the C++ helpers; run tests/gpu (kernels and model on CUDA: bf16/fp16, head dims 64/128, odd lengths up to
#      8,192, forward and backward against float64 references) and tests/data/test_helpers.py (C++ vs numpy);
#   2. benchmarks/bench_attention.py: causal bf16, head dim 128, 16k tokens per call, lengths 512 - 8k, every backend,
#      TFLOP/s (FlashAttention convention), peak memory and the measured bf16 matmul peak;
#   3. benchmarks/bench_train.py: gpt127- and gpt1b-shaped models under `deepspeed --num_gpus 1` (bf16, ZeRO-1, AdamW and
#      AdamW8bit, synthetic tokens) beside transformers' GPT2LMHeadModel (SDPA, fused AdamW, bf16 autocast);
#   4. $OUT/summary.json (each part's status and time), device.txt, versions.json, logs/, and each part's JSON.
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh          # GPU machine, project root; fits in --budget-s (480)
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh --dry      # CPU, toy sizes, Triton interpreter: proves the script
# Options: --parts build,smoke,tests,attention,train (default: all), --budget-s SECONDS (default 480; --dry 1500), --overwrite.
# A GPU image without deepspeed / bitsandbytes / ftfy: ship .whl/ (../shared/gpu/wheelhouse.sh); it is installed with
# --target into $MEGAGPT_SITE (default /tmp/megagpt-site), never over the image's own torch.
# Exit status: 0 when every part passed, 1 when one failed or ran out of time (the others still run), 2 for bad usage.
set -uo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
DRY=0; PARTS=build,smoke,tests,attention,train; BUDGET=""; OVERWRITE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --parts) PARTS=${2:?--parts needs a value}; shift ;;
    --budget-s) BUDGET=${2:?--budget-s needs a value}; shift ;;
    --overwrite) OVERWRITE=1 ;;
    -h|--help) usage ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage ;;
  esac
  shift
done
for part in ${PARTS//,/ }; do
  case "$part" in build|smoke|tests|attention|train) ;; *) echo "gpu_check.sh: --parts: unknown part '$part'" >&2; exit 2 ;; esac
done
[ -n "$BUDGET" ] || BUDGET=$([ "$DRY" = 1 ] && echo 1500 || echo 480)  # a 2-core CPU is slow at the dry run
# Caps per part (seconds): tests, attention, one training case. The interpreter on a shared CPU needs more.
if [ "$DRY" = 1 ]; then CAPS=(600 300 400); else CAPS=(150 150 150); fi
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget-s must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac
OUT=${OUT:-$ROOT/out/gpu_check}
if [ -e "$OUT/summary.json" ] && [ "$OVERWRITE" = 0 ]; then
  echo "gpu_check.sh: $OUT already holds a finished check (summary.json); use another OUT or --overwrite" >&2; exit 2
fi
PYTHON=${PYTHON:-python3}
if [ "$DRY" = 0 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: torch sees no CUDA device here; use --dry for the CPU rehearsal" >&2; exit 2
fi
# --overwrite: nothing of the earlier check may pass for this one's
rm -rf "$OUT/summary.json" "$OUT/logs" "$OUT/smoke" "$OUT/train" "$OUT/attention.json" "$OUT/tests.xml" "$OUT/versions.json" \
  "$OUT/device.txt"
mkdir -p "$OUT/logs" || exit 2
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu_check $(elapsed)s] $*"; }

# ---- environment: the wheels the GPU image lacks, then the device line and the versions
SITE=${MEGAGPT_SITE:-/tmp/megagpt-site}
if ! "$PYTHON" -c 'import deepspeed, bitsandbytes, ftfy' >/dev/null 2>&1; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    say "installing .whl/ into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
      >"$OUT/logs/install.log" 2>&1 || say "wheel install FAILED (logs/install.log)"
    export PATH="$SITE/bin:$PATH"
  else
    say "deepspeed/bitsandbytes/ftfy missing and no .whl/ (run ../shared/gpu/wheelhouse.sh and carry .whl/)"
  fi
fi
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
[ "$DRY" = 0 ] || export MEGAGPT_GPU_CHECK_DRY=1 TRITON_INTERPRET=1
{ date -u +%Y-%m-%dT%H:%M:%SZ; uname -a; nvidia-smi 2>&1 || echo "no nvidia-smi"; } >"$OUT/device.txt"
"$PYTHON" - >"$OUT/versions.json" 2>"$OUT/logs/versions.log" <<'PY'
import importlib.metadata, json, platform, sys
import torch
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
info.update({name: version(name) for name in ("triton", "deepspeed", "bitsandbytes", "transformers", "numpy",
                                               "flash-attn", "ftfy", "pybind11", "setuptools", "pytest")})
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_bytes=props.total_memory,
                multiprocessors=props.multi_processor_count)
print(json.dumps(info, indent=1))
PY
MISSING=$("$PYTHON" - "$OUT/versions.json" 2>/dev/null <<'PY'
import json, sys
versions = json.load(open(sys.argv[1]))
needed = ("deepspeed", "bitsandbytes", "transformers", "pybind11", "setuptools", "pytest")
print(" ".join(name for name in needed if not versions.get(name)))
PY
)
[ -z "$MISSING" ] || say "MISSING here: $MISSING (the parts needing them will fail; EXTRA_WHEELS=... for wheelhouse.sh)"
say "device: $(sed -n '1,/^$/p' "$OUT/device.txt" | grep -m1 -E 'H100|H200|A100|NVIDIA|GPU' || echo cpu) | $(tr -d '\n ' <"$OUT/versions.json" | cut -c1-200)"

# ---- the parts: each with a time limit, its log under logs/, its status in summary.json
declare -A STATUS SECONDS_TAKEN
has_part() { case ",$PARTS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
# run_part NAME LIMIT_S COMMAND...: SIGINT at the limit (pytest still writes its report), SIGKILL 20 s later.
run_part() {
  local name=$1 limit=$2; shift 2
  local begin; begin=$(date +%s)
  if [ "$limit" -lt 30 ]; then
    say "$name: SKIPPED, only ${limit}s of the budget left"; STATUS[$name]=skipped; SECONDS_TAKEN[$name]=0; return
  fi
  say "$name (limit ${limit}s): $*"
  timeout -s INT -k 20 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  SECONDS_TAKEN[$name]=$(( $(date +%s) - begin ))
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]=timeout ;;
    *) STATUS[$name]="failed (exit $rc)" ;;
  esac
  say "$name: ${STATUS[$name]} after ${SECONDS_TAKEN[$name]}s (logs/$name.log)"
  tail -n 25 "$OUT/logs/$name.log"
}
left() { echo $(( BUDGET - $(elapsed) - ${1:-0} )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

if has_part build; then
  if [ "$DRY" = 1 ]; then  # leave this checkout's own helper library alone
    BUILD=$(mktemp -d)
    run_part build "$(min 120 "$(left)")" "$PYTHON" setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp"
    rm -rf "$BUILD"
  else
    run_part build "$(min 120 "$(left)")" "$PYTHON" setup.py -q build_ext --inplace
  fi
fi
if has_part smoke; then  # the training loop itself first: everything after it assumes it runs
  run_part smoke "$(min 120 "$(left 200)")" "$PYTHON" benchmarks/smoke_train.py --output "$OUT/smoke" \
    --device "$([ "$DRY" = 1 ] && echo cpu || echo cuda)" --precision bf16
fi
if has_part tests; then
  run_part tests "$(min "${CAPS[0]}" "$(left 300)")" "$PYTHON" -m pytest -v -rA -p no:cacheprovider --junitxml "$OUT/tests.xml" \
    tests/gpu tests/data/test_helpers.py
fi
if [ "$DRY" = 1 ]; then
  ATTENTION_ARGS=(--device cpu --seq-lens 64 --head-dims 128 --tokens 64 --heads 2 --dtype bf16 --matmul-size 256)
  TRAIN_ARGS=(--dry)
else
  # longest first: a part cut short by its limit loses 512, which no target names (FlexAttention compiles per shape)
  ATTENTION_ARGS=(--device cuda --seq-lens 8192 4096 2048 1024 512 --head-dims 128 --tokens 16384 --heads 16
                  --dtype bf16)
  TRAIN_ARGS=(--shapes gpt1b gpt127)  # the targets are gpt1b's: first, in case the budget runs out
fi
if has_part attention; then
  run_part attention "$(min "${CAPS[1]}" "$(left 170)")" "$PYTHON" benchmarks/bench_attention.py "${ATTENTION_ARGS[@]}" \
    --output "$OUT/attention.json"
fi
if has_part train; then
  limit=$(left 10)
  run_part train "$limit" "$PYTHON" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" --output "$OUT/train" \
    --matmul-peak-json "$OUT/attention.json" --timeout-s "$(min "${CAPS[2]}" "$(( limit > 40 ? limit - 20 : 20 ))")"
fi

# ---- summary: written last (a check cut short has none), printed so that the call's output tail carries it
FAILED=0
{
  echo "{"
  echo "  \"dry\": $([ "$DRY" = 1 ] && echo true || echo false), \"budget_s\": $BUDGET, \"total_s\": $(elapsed),"
  echo "  \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\","
  echo "  \"parts\": {"
  sep=""
  for part in build smoke tests attention train; do
    has_part "$part" || continue
    [ "${STATUS[$part]}" = ok ] || FAILED=1
    printf '%s    "%s": {"status": "%s", "seconds": %s, "log": "logs/%s.log"}' "$sep" "$part" "${STATUS[$part]}" \
      "${SECONDS_TAKEN[$part]}" "$part"
    sep=$',\n'
  done
  printf '\n  },\n  "files": ["device.txt", "versions.json", "smoke/smoke.json", "tests.xml", "attention.json", "train/train.json"]\n}\n'
} >"$OUT/summary.json.partial" && mv "$OUT/summary.json.partial" "$OUT/summary.json"
echo "================ gpu_check summary ($([ "$DRY" = 1 ] && echo 'DRY RUN on CPU: NOT GPU figures' || echo GPU)) ================"
cat "$OUT/summary.json"
[ -f "$OUT/tests.xml" ] && grep -o '<testsuite [^>]*' "$OUT/tests.xml" | head -n 1
[ -f "$OUT/logs/attention.log" ] && sed -n '/^attention benchmark on/,$p' "$OUT/logs/attention.log"
[ -f "$OUT/train/train.json" ] && "$PYTHON" benchmarks/bench_train.py --output "$OUT/train" --print-table 2>/dev/null
exit $FAILED
