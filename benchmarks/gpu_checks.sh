#!/usr/bin/env bash
# On the lent GPU, after benchmarks/gpu_setup.sh (and before any grid, so nothing else runs on the GPU): every
# compiled-kernel test, then the kernel benchmarks side by side with their baselines, each step under its own time
# limit so the whole fits one device call (~9 minutes). Results go to $OUT/checks/ (one results.tgz: a call brings
# back at most 8 files).
#
#   bash benchmarks/gpu_checks.sh            # from the checkout; uses /tmp/site and /tmp/run as gpu_setup.sh left them
#
# STEPS="tests local scoring decode" picks steps (default: all of tests local scoring decode e2e).
set -uo pipefail
out=$(mktemp -d)
steps=${STEPS:-tests local scoring decode e2e}
export PYTHONPATH=/tmp/site:/tmp/run LTRI_DATA_DIR=/tmp/data PYTHONUNBUFFERED=1
rm -rf /tmp/run/benchmarks /tmp/run/tests && cp -r benchmarks tests /tmp/run/  # this checkout's scripts and tests
cd /tmp/run
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
    local) step local 60 python3 -m benchmarks.bench_local_attention --out "$out/local_attention" ;;
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
