#!/usr/bin/env bash
# The GPU benchmark session in one command: CUDA correctness checks, then posttrain vs TRL and the
# compute floor on a ~0.5B random-initialized Qwen2 shape in bf16. Logs and JSON go to $OUT (default
# ./gpu-out). Uses the machine's python3 (torch with CUDA); wheels in .whl/ (trl, datasets, ...) are
# installed into /tmp/site first when present, for machines that cannot reach a package index.
#   [PARTS="cuda grpo floor"] bash benchmarks/gpu_run.sh [grpo_vs_trl rounds (default 2)]
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
ROUNDS=${1:-2}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-packages \
    .whl/*.whl || exit 1
  # A path with "site-packages" in it: dill (under datasets' hashing) pickles modules found anywhere else
  # by value, and pyarrow's module dict cannot be pickled (PicklingError: MonthDayNano) -- TRL then fails.
  export PYTHONPATH=/tmp/site-packages
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import sys, torch, transformers, trl, datasets; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"

PARTS=${PARTS:-cuda grpo floor}
if [[ " $PARTS " == *" cuda "* ]]; then
  echo "== cuda_check"; SECONDS=0
  timeout 150 python3 benchmarks/cuda_check.py >"$OUT/cuda_check.log" 2>&1; echo "exit $? in ${SECONDS}s"
  grep -E "^(PASS|FAIL)|checks passed|Error" "$OUT/cuda_check.log"
fi

GPU_ARGS=${GPU_ARGS:-"--preset qwen2-0.5b --arch qwen2 --vocab-size 151936 --device cuda --dtype bfloat16 --prompts 16 \
  --generations 8 --max-completion-length 256 --threads 0 --steps 2 --warmup 1"}
if [[ " $PARTS " == *" grpo "* ]]; then
  echo "== grpo_vs_trl"; SECONDS=0
  timeout $((60 + 150 * ROUNDS)) python3 benchmarks/grpo_vs_trl.py $GPU_ARGS --rounds "$ROUNDS" \
    --json "$OUT/grpo_vs_trl.json" >"$OUT/grpo_vs_trl.log" 2>&1; echo "exit $? in ${SECONDS}s"
  grep -vE "Writing|Loading|it/s\]" "$OUT/grpo_vs_trl.log" | tail -25
fi

if [[ " $PARTS " == *" floor "* ]]; then
  echo "== floor"; SECONDS=0
  timeout 150 python3 benchmarks/floor.py $GPU_ARGS --rounds 1 >"$OUT/floor.log" 2>&1; echo "exit $? in ${SECONDS}s"
  grep -vE "Writing|Loading|it/s\]|INFO" "$OUT/floor.log" | tail -12
fi
