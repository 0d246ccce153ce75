#!/usr/bin/env bash
# On the lent GPU, after benchmarks/gpu_setup.sh (and before any grid, so nothing else runs on the GPU): every
# compiled-kernel test, then the kernel benchmarks side by side with their baselines (the local-attention one with
# its launch-settings sweep), each step under its own time limit. All steps take ~14 minutes: two device calls,
#
#   STEPS="tests local" bash benchmarks/gpu_checks.sh       # ~8 min
#   STEPS="scoring decode e2e" bash benchmarks/gpu_checks.sh  # ~6.5 min
#
# from the checkout, after gpu_setup.sh (it uses the package installed in /tmp/site). Results: $OUT/results.tgz (a call brings
# back at most 8 files). Default STEPS: all five.
set -uo pipefail
out=$(mktemp -d)
steps=${STEPS:-tests local scoring decode e2e}
# this checkout's scripts and tests, in their own folder (a grid running from /tmp/run keeps its copy)
run=/tmp/checks_run
rm -rf "$run" && mkdir -p "$run" && cp -r benchmarks tests pyproject.toml "$run"/  # pyproject: the pytest marks
export PYTHONPATH=/tmp/site:$run LTRI_DATA_DIR=/tmp/data PYTHONUNBUFFERED=1
cd "$run"
step() {  # name limit command...
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "exit $? after $SECONDS s"; tail -n 25 "$out/$name.log"
}
for s in $steps; do
  case $s in
    tests) step tests 240 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/unit/test_triton_local.py \
             tests/unit/test_triton_scoring.py $(ls tests/unit/test_triton_decode.py 2>/dev/null) ;;
    local) step local 240 python3 -m benchmarks.bench_local_attention --sweep --out "$out/local_attention" ;;
    scoring) step scoring 90 python3 -m benchmarks.bench_span_scoring --out "$out/span_scoring" ;;
    decode) [ -f benchmarks/bench_decode_attention.py ] && \
              step decode 90 python3 -m benchmarks.bench_decode_attention --out "$out/decode_attention" ;;
    e2e) step e2e 200 python3 -m benchmarks.bench_e2e --model qwen2.5-0.5b-random --lengths 8192 32768 131072 \
           --decode-lengths 8192 32768 131072 --decode-tokens 16 --modes full streaming ltri --chunk 2048 \
           --backend auto --time-limit 180 --out "$out/e2e_qwen" ;;
    *) echo "unknown step $s" ;;
  esac
done
nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used --format=csv,noheader > "$out/gpu.txt"
mkdir -p "$OUT" && tar czf "$OUT/results.tgz" -C "$out" . && rm -rf "$out"
