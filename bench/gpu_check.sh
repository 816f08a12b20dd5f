#!/usr/bin/env bash
# One call on a bare GPU machine: build dqgemm, run the tests, benchmark, summarize.
#
#   bash bench/gpu_check.sh [OUT_DIR]          (default: $OUT, else bench/out)
#
# Steps (each logged; a failing step is reported and the next still runs):
#   1. facts: nvidia-smi (name, driver, clocks), python/torch/triton versions
#   2. build: pip install --no-build-isolation --no-deps -e .  (DQGEMM_CUDA_ARCHS=90a by
#      default); if the CUDA extension fails to build, rebuild without it so the peers and
#      the Triton backend are still measured, and say so
#   3. tests: python -m pytest -q tests (capped at TEST_TIMEOUT seconds)
#   4. layer benchmark: python -m dqgemm bench $BENCH_ARGS --json --plot  (full table in
#      bench.log)
#   5. end-to-end decode: python -m dqgemm bench --model $E2E_MODEL $E2E_ARGS, FP16 and
#      then each backend in its own process, merged (unless SKIP_E2E=1)
#   6. summary (printed last): build/test status, the summary table, FP16 vs anchors.md,
#      the decode table.
# Files in OUT_DIR (the device tool returns at most 8; the optional steps below add theirs):
#   check.log  bench.log  bench_<gpu>_<date>.json  bench_<gpu>_<date>.png  e2e_<gpu>_<date>.json
#
# Time on an H100 with the defaults: build ~25 s, tests <= TEST_TIMEOUT, layer bench ~100 s,
# decode ~45 s: about 5 minutes.
# Optional steps before the tests: DECODE_QUICK=1 runs bench/cuda_decode_quick.py (cuda_decode
# correctness of every configuration, then key timings; decode_quick.json; if it fails, the
# benchmark and the decode run are skipped), NCU=1 profiles cuda_decode with Nsight Compute
# (bench/cuda_decode_ncu.py $NCU_ARGS, e.g. NCU_ARGS="4096 4096" for K x N; ncu.txt),
# SANITIZE=1 runs compute-sanitizer memcheck and racecheck on bench/cuda_decode_sanitize.py
# and bench/cuda_prefill_sanitize.py (sanitize_{memcheck,racecheck}.txt,
# sanitize_prefill_{memcheck,racecheck}.txt; SANITIZE_TARGETS="decode prefill" picks), PREFILL_SWEEP=1 times every cuda_prefill
# launch choice (bench/cuda_prefill_bench.py $PREFILL_ARGS; prefill_sweep.json / .txt).
# NCU_PREFILL=1 profiles one cuda_prefill configuration (ncu_prefill.txt; NCU_PREFILL_ARGS),
# PREFILL_VARIANTS times cuda_prefill builds with other nvcc flags (end of this script).
# DECODE_VARIANTS (see the end of this script) rebuilds with other nvcc flags and times
# each variant with the quick check, after everything else.
# Knobs (environment): BENCH_ARGS (default below), E2E_MODEL (llama3-8b), E2E_ARGS,
# E2E_BACKENDS (default: every usable backend but reference), TEST_TIMEOUT (150),
# TEST_PATHS (tests), BENCH_TIMEOUT / E2E_TIMEOUT (seconds per process, 0 = none),
# SKIP_TESTS=1, SKIP_BENCH=1, SKIP_E2E=1, SKIP_BUILD=1, PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export DQGEMM_CUDA_ARCHS=${DQGEMM_CUDA_ARCHS:-90a}
BENCH_ARGS=${BENCH_ARGS:-"--shapes anchors --m 1,16,64,256,1024,4096"}
E2E_MODEL=${E2E_MODEL:-llama3-8b}
E2E_ARGS=${E2E_ARGS:-"--batch-sizes 1,8,32"}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
TEST_PATHS=${TEST_PATHS:-tests}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-0}
E2E_TIMEOUT=${E2E_TIMEOUT:-0}
LOG="$OUT_DIR/check.log"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
case "$GPU_NAME" in
  *H100*) TAG=h100 ;; *H200*) TAG=h200 ;; *A100*) TAG=a100 ;; "") TAG=cpu ;;
  *) TAG=$(echo "$GPU_NAME" | tr -cs 'A-Za-z0-9' '_' | tr 'A-Z' 'a-z' | sed 's/_$//') ;;
esac
DATE=$(date -u +%F)
JSON="$OUT_DIR/bench_${TAG}_${DATE}.json"
PNG="$OUT_DIR/bench_${TAG}_${DATE}.png"
E2E_JSON="$OUT_DIR/e2e_${TAG}_${DATE}.json"

: > "$LOG"
stamp "gpu_check: GPU='${GPU_NAME:-none}' out=$OUT_DIR"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu --format=csv 2>&1
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
} >> "$LOG"

BUILD="ok"
if [ "${SKIP_BUILD:-0}" != "1" ]; then
  stamp "build: pip install -e . (DQGEMM_CUDA_ARCHS=$DQGEMM_CUDA_ARCHS)"
  if ! $PY -m pip install --no-build-isolation --no-deps -e . >> "$LOG" 2>&1; then
    BUILD="FAILED with the CUDA extension; rebuilt without it (DQGEMM_NO_CUDA=1)"
    stamp "build: $BUILD"
    grep -n "error" "$LOG" | head -20
    DQGEMM_NO_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . >> "$LOG" 2>&1 \
      || BUILD="FAILED (even without the extension)"
  fi
fi
stamp "build: $BUILD"
$PY -m dqgemm info >> "$LOG" 2>&1 || stamp "dqgemm info failed"

if [ "${DECODE_QUICK:-0}" = "1" ]; then
  stamp "decode quick: python bench/cuda_decode_quick.py"
  timeout 240 $PY bench/cuda_decode_quick.py "$OUT_DIR/decode_quick.json" >> "$LOG" 2>&1
  QUICK_RC=$?
  stamp "decode quick: rc=$QUICK_RC"
  if [ $QUICK_RC -ne 0 ]; then
    # a wrong kernel is not worth timing: keep the device minutes for the tests
    stamp "decode quick failed: skipping the benchmark and the decode run"
    grep -E "checks:|Error|error" "$LOG" | tail -5
    SKIP_BENCH=1 SKIP_E2E=1
  fi
fi
if [ "${NCU:-0}" = "1" ]; then
  stamp "ncu: bench/cuda_decode_ncu.py"
  timeout 180 ncu --clock-control none --kernel-name regex:decode_gemm --launch-skip 2 \
    --launch-count 2 --section SpeedOfLight --section Occupancy --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SchedulerStats --section LaunchStats \
    $PY bench/cuda_decode_ncu.py ${NCU_ARGS:-} > "$OUT_DIR/ncu.txt" 2>&1
  stamp "ncu: rc=$?"
fi
if [ "${NCU_PREFILL:-0}" = "1" ]; then
  # one cuda_prefill configuration (bench/cuda_prefill_ncu.py $NCU_PREFILL_ARGS:
  # K N M M_TILE N_TILE SPLITS [BITS [WS]]) with the stall reasons per instruction
  stamp "ncu prefill: bench/cuda_prefill_ncu.py ${NCU_PREFILL_ARGS:-8192 28672 2048 128 256 1 4 1}"
  # shellcheck disable=SC2086
  timeout 240 ncu --clock-control none --kernel-name regex:prefill_gemm --launch-skip 3 \
    --launch-count 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    --section Occupancy --section SourceCounters \
    $PY bench/cuda_prefill_ncu.py ${NCU_PREFILL_ARGS:-8192 28672 2048 128 256 1 4 1} \
    > "$OUT_DIR/ncu_prefill.txt" 2>&1
  stamp "ncu prefill: rc=$?"
fi

if [ "${SANITIZE:-0}" = "1" ]; then
  # compute-sanitizer memcheck and racecheck on the small cuda_decode sweep (every token
  # tile, width, dtype, zero mode, group variant and the stream-K fixup), and on the
  # cuda_prefill sweep (every configuration and split; racecheck on its --quick subset)
  for tool in memcheck racecheck; do
    if [[ " ${SANITIZE_TARGETS:-decode prefill} " == *" decode "* ]]; then
      stamp "sanitize: compute-sanitizer --tool $tool bench/cuda_decode_sanitize.py"
      timeout 240 compute-sanitizer --tool $tool $PY bench/cuda_decode_sanitize.py \
        > "$OUT_DIR/sanitize_$tool.txt" 2>&1
      stamp "sanitize $tool: rc=$? $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT_DIR/sanitize_$tool.txt" | tail -1)"
    fi
    if [[ " ${SANITIZE_TARGETS:-decode prefill} " == *" prefill "* ]]; then
      quick=""
      [ "$tool" = "racecheck" ] && quick="--quick"
      stamp "sanitize: compute-sanitizer --tool $tool bench/cuda_prefill_sanitize.py $quick"
      timeout 240 compute-sanitizer --tool $tool $PY bench/cuda_prefill_sanitize.py $quick \
        > "$OUT_DIR/sanitize_prefill_$tool.txt" 2>&1
      stamp "sanitize prefill $tool: rc=$? $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT_DIR/sanitize_prefill_$tool.txt" | tail -1)"
    fi
  done
fi

if [ "${PREFILL_SWEEP:-0}" = "1" ]; then
  # every cuda_prefill launch choice against FP16 (the data of configs/cuda_prefill.json's
  # measured table: bench/cuda_prefill_table.py); PREFILL_ARGS picks shapes / M / bits
  stamp "prefill sweep: bench/cuda_prefill_bench.py ${PREFILL_ARGS:---bits 4 --m 64,256,1024,4096 --splits 1,2,4 --no-dequant}"
  # shellcheck disable=SC2086
  timeout "${PREFILL_TIMEOUT:-300}" $PY bench/cuda_prefill_bench.py \
    ${PREFILL_ARGS:---bits 4 --m 64,256,1024,4096 --splits 1,2,4 --no-dequant} \
    --json "$OUT_DIR/prefill_sweep.json" > "$OUT_DIR/prefill_sweep.txt" 2>&1
  stamp "prefill sweep: rc=$?"
fi

TESTS="skipped"
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  stamp "tests: pytest -q $TEST_PATHS (timeout ${TEST_TIMEOUT}s)"
  # shellcheck disable=SC2086
  timeout "$TEST_TIMEOUT" $PY -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} $TEST_PATHS >> "$LOG" 2>&1
  rc=$?
  TESTS=$(grep -E "(passed|failed|error)" "$LOG" | tail -1)
  [ $rc -eq 124 ] && TESTS="TIMED OUT after ${TEST_TIMEOUT}s (last: ${TESTS:-none})"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && TESTS="rc=$rc: $TESTS"
  stamp "tests: $TESTS"
fi

# A CUDA error that breaks the context (illegal address) ends a process; the run then
# resumes in a fresh one without the backend that broke it (runner.py, --resume).
RESUME=""
BENCH_RC="skipped"
: > "$OUT_DIR/bench.log"
ATTEMPTS="1 2 3 4"
[ "${SKIP_BENCH:-0}" = "1" ] && ATTEMPTS=""
for attempt in $ATTEMPTS; do
  stamp "bench: python -m dqgemm bench $BENCH_ARGS $RESUME"
  # shellcheck disable=SC2086
  timeout "$BENCH_TIMEOUT" $PY -m dqgemm bench $BENCH_ARGS --json "$JSON" --plot "$PNG" --table full $RESUME \
    >> "$OUT_DIR/bench.log" 2>&1
  BENCH_RC=$?
  stamp "bench: rc=$BENCH_RC"
  [ -f "$JSON" ] || break
  ABORTED=$($PY -c "import json,sys; print(json.load(open(sys.argv[1])).get('aborted') or '')" "$JSON")
  [ -z "$ABORTED" ] && break
  stamp "bench: aborted ($ABORTED); resuming without the backend that broke the context"
  RESUME="--resume $JSON"
done

# End-to-end decode: FP16 once, then each usable dqgemm backend in its own process (one
# backend's CUDA error cannot take the others' rows with it); merged into one JSON.
E2E_RC="skipped"
if [ "${SKIP_E2E:-0}" != "1" ]; then
  E2E_TMP=$(mktemp -d)
  BACKENDS=${E2E_BACKENDS:-$($PY -c "from dqgemm.bench.e2e import usable_backends as u; print(' '.join(sorted(set(u(4, 'cuda')) | set(u(8, 'cuda')))))" 2>/dev/null)}
  E2E_RC=0
  i=0
  for be in fp16 $BACKENDS; do
    i=$((i + 1))
    if [ "$be" = fp16 ]; then VARIANTS="--variants fp16"; BE="auto"; else VARIANTS="--variants int4,int8"; BE=$be; fi
    stamp "e2e: python -m dqgemm bench --model $E2E_MODEL $E2E_ARGS $VARIANTS --e2e-backends $BE"
    # shellcheck disable=SC2086
    timeout "$E2E_TIMEOUT" $PY -m dqgemm bench --model "$E2E_MODEL" $E2E_ARGS $VARIANTS --e2e-backends "$BE" \
      --json "$E2E_TMP/e2e_$i.json" --no-progress >> "$OUT_DIR/bench.log" 2>&1 || E2E_RC=$?
  done
  $PY - "$E2E_JSON" "$E2E_TMP"/e2e_*.json <<'PYEOF' || E2E_RC="merge failed"
import json, sys
from dqgemm.bench.e2e import add_speedups
docs = [json.load(open(p)) for p in sys.argv[2:]]
merged = dict(docs[0], e2e=add_speedups([r for d in docs for r in d["e2e"]]),
              commands=[d.get("command") for d in docs])
json.dump(merged, open(sys.argv[1], "w"), indent=1)
PYEOF
  stamp "e2e: rc=$E2E_RC"
fi

# A/B of kernel variants, last (each rebuilds the extension with its nvcc flags, so nothing
# after this uses the default build): DECODE_VARIANTS="name=-DFLAG name2=-DFLAG2" times each
# with bench/cuda_decode_quick.py into decode_quick_<name>.json. With DQGEMM_OBJ_CACHE
# pointing at objects compiled beforehand (setup.py), a rebuild is a link.
for spec in ${DECODE_VARIANTS:-}; do
  name=${spec%%=*}; flags=${spec#*=}
  stamp "variant $name: rebuild with DQGEMM_NVCC_FLAGS=$flags"
  if DQGEMM_NVCC_FLAGS="$flags" $PY -m pip install --no-build-isolation --no-deps -e . >> "$LOG" 2>&1; then
    timeout 240 $PY bench/cuda_decode_quick.py "$OUT_DIR/decode_quick_$name.json" >> "$LOG" 2>&1
    stamp "variant $name: rc=$?"
  else
    stamp "variant $name: build failed"
  fi
done

# PREFILL_VARIANTS="name=-DFLAG,-DFLAG2 name2=base ...": the same for cuda_prefill, timed by
# bench/cuda_prefill_bench.py --probe $PREFILL_VARIANT_ARGS into prefill_variant_<name>.json
# (probe builds, made with a macro of the tree under test, may give wrong results on
# purpose: timed anyway).
for spec in ${PREFILL_VARIANTS:-}; do
  name=${spec%%=*}; flags=${spec#*=}
  [ "$flags" = "base" ] && flags=""
  flags=${flags//,/ }  # several flags: -DA=1,-DB=1
  stamp "prefill variant $name: rebuild with DQGEMM_NVCC_FLAGS=$flags"
  if DQGEMM_NVCC_FLAGS="$flags" $PY -m pip install --no-build-isolation --no-deps -e . >> "$LOG" 2>&1; then
    # shellcheck disable=SC2086
    timeout 240 $PY bench/cuda_prefill_bench.py --probe ${PREFILL_VARIANT_ARGS:---bits 4 --m 256,2048 --m-tiles 128 --n-tiles 256 --ws 1 --splits 1 --no-dequant} \
      --json "$OUT_DIR/prefill_variant_$name.json" > "$OUT_DIR/prefill_variant_$name.txt" 2>&1
    stamp "prefill variant $name: rc=$? $(grep -A20 '^summary' "$OUT_DIR/prefill_variant_$name.txt" | tail -n +2 | tr -s ' ' | paste -sd';')"
  else
    stamp "prefill variant $name: build failed"
  fi
done

echo
echo "================ summary ($(( $(date +%s) - T0 )) s) ================"
echo "GPU: ${GPU_NAME:-none}   build: $BUILD   tests: $TESTS   bench rc: $BENCH_RC   e2e rc: $E2E_RC"
if [ -f "$JSON" ]; then
  $PY - "$JSON" <<'PYEOF'
import json, statistics, sys
from dqgemm.bench import report
doc = json.load(open(sys.argv[1]))
print(report.summary_table(doc))
cmp = report.anchor_comparison(doc)
if cmp:
    ratios = [c["ratio"] for c in cmp]
    print(f"FP16 vs anchors.md ({len(cmp)} points): median ratio {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")
for note in report.skipped_notes(doc)[:12]:
    print("  not timed:", note)
PYEOF
else
  echo "no benchmark JSON; tail of bench.log:"; tail -30 "$OUT_DIR/bench.log"
fi
if [ -f "$E2E_JSON" ]; then
  $PY -c "import json,sys; from dqgemm.bench.e2e import format_results; print(format_results(json.load(open(sys.argv[1]))['e2e']))" "$E2E_JSON"
fi
