#!/usr/bin/env bash
# One device call for the Triton backend: build, GPU test sweep, compile warm-up, tune/bench.
# Usage (repo root, on the GPU machine): bash bench/triton_gpu_run.sh tune|bench|tests  (logs in $OUT)
# Knobs: SKIP_TESTS=1, TEST_TIMEOUT, WARM_TIMEOUT, TUNE_TIMEOUT, TUNE_ARGS (e.g. "--shapes 8192x28672
# --ms 1,16"), BUILD_TIMEOUT. The tuned table keeps the other GPUs' entries.
set -o pipefail
export PYTHONUNBUFFERED=1 DQGEMM_CUDA_ARCHS=90a
MODE=${1:-tune}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
T0=$(date +%s)
timeout ${BUILD_TIMEOUT:-100} python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
# if the build failed or timed out, the Python package still imports from the tree (no _C)
export PYTHONPATH=$PWD/python:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
echo "build done at $(( $(date +%s) - T0 ))s"; nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout ${TEST_TIMEOUT:-110} python3 -m pytest -n 16 -p no:cacheprovider tests/test_triton.py \
      --maxfail=30 -rf --tb=line -W ignore -v 2>&1 | tee $OUT/tests.log | grep -E "FAIL|ERROR|passed|failed" | tail -40
  echo "tests done at $(( $(date +%s) - T0 ))s"
fi
# file names carry the GPU (h100, h200, ...); the table file keeps one entry per GPU
TAG=$(python3 -c "import re, sys, torch; sys.path.insert(0, 'bench'); from triton_tune import short_device_name; print(re.sub(r'\W+', '_', short_device_name(torch.cuda.get_device_name())).lower())")
if [ "$MODE" = tests ]; then
  # quick check of the shipped table path (bench mode, rel. error per problem)
  timeout ${TUNE_TIMEOUT:-30} python3 bench/triton_tune.py --mode bench --shapes ${SHAPES:-28672x8192} \
      --ms 1,16,64,256 --out $OUT/triton_check.json 2>&1 | grep -v -i warn
  exit 0
fi
for i in 0 1 2 3 4 5 6 7; do
  timeout ${WARM_TIMEOUT:-40} python3 bench/triton_tune.py --mode $MODE --warm-only --shard $i/8 > /tmp/warm$i.log 2>&1 &
done
wait
echo "warm done at $(( $(date +%s) - T0 ))s"; cat /tmp/warm*.log | grep -v Warning | tail -5
if [ "$MODE" = tune ]; then
  # the shipped table, with this GPU's entry (re)written: copy it to
  # python/dqgemm/configs/triton_h100.json after checking it
  cp python/dqgemm/configs/triton_h100.json $OUT/triton_h100.json
  timeout ${TUNE_TIMEOUT:-120} python3 bench/triton_tune.py --mode tune --out $OUT/triton_tune_$TAG.json \
      --table $OUT/triton_h100.json ${TUNE_ARGS:-} 2>&1 | tee $OUT/tune.log | grep -v Warning
else
  timeout ${TUNE_TIMEOUT:-120} python3 bench/triton_tune.py --mode bench --out $OUT/triton_bench_$TAG.json \
      2>&1 | tee $OUT/bench.log | grep -v Warning
fi
echo "all done at $(( $(date +%s) - T0 ))s"
