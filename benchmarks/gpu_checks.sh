#!/usr/bin/env bash
# On the lent GPU, after benchmarks/gpu_setup.sh (and before any grid, so nothing else runs on the GPU): every
# compiled-kernel test, then the kernel benchmarks side by side with their baselines (the local-attention one with
# its launch-settings sweep), the end-to-end benchmarks and the engine's stage profile, each step under its own
# time limit, one device call per group (a call may run 10 minutes):
#
#   STEPS="tests local" bash benchmarks/gpu_checks.sh            # ~8 min
#   STEPS="kernels" ...                                           # ~2 min: the other kernels' compiled unit tests
#   STEPS="scoring decode small e2e" bash benchmarks/gpu_checks.sh   # ~8 min
#   STEPS="profile" ... ; STEPS="e2e8b" ...                       # ~5 / ~9.5 min
#
# Timings of host-side work (e2e, profile) are only meaningful while no quality grid shares the host's CPUs (a grid
# on the other GPU still does): run them before any grid starts (session 4's e2e run did not; see
# benchmarks/results/e2e_qwen_h200/README.md).
#
# from the checkout, after gpu_setup.sh (it uses the package installed in /tmp/site). Results: $OUT/results.tgz (a call brings
# back at most 8 files). Default STEPS: all of them.
set -uo pipefail
out=$(mktemp -d)
steps=${STEPS:-tests kernels local scoring decode small e2e profile e2e8b}
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
    kernels) step kernels 240 python3 -m pytest -q -p no:cacheprovider tests/unit/test_triton_select.py tests/unit/test_triton_sort_fill.py \
             tests/unit/test_triton_rope.py tests/unit/test_triton_assemble.py tests/unit/test_host_cache.py \
             tests/unit/test_triton_consensus.py tests/unit/test_triton_slots.py tests/unit/test_select_pair.py \
             tests/unit/test_rotary_turns.py ;;
    local) step local 240 python3 -m benchmarks.bench_local_attention --sweep --out "$out/local_attention" ;;
    scoring) step scoring 90 python3 -m benchmarks.bench_span_scoring --out "$out/span_scoring" ;;
    decode) [ -f benchmarks/bench_decode_attention.py ] && \
              step decode 90 python3 -m benchmarks.bench_decode_attention --out "$out/decode_attention" ;;
    small) step small 120 python3 -m benchmarks.bench_small_kernels --out "$out/small_kernels" ;;
    e2e) step e2e 240 python3 -m benchmarks.bench_e2e --model qwen2.5-0.5b-random --lengths 8192 32768 131072 \
           --decode-lengths 8192 32768 131072 --decode-tokens 16 --modes full streaming ltri ltri_gpu_pool \
           --chunk 2048 --backend auto --time-limit 220 --out "$out/e2e_qwen" ;;
    e2e8b) step e2e8b 560 python3 -m benchmarks.bench_e2e --model llama3-8b-random \
           --lengths 32768 131072 524288 1048576 --decode-lengths 8192 32768 131072 524288 1048576 \
           --decode-tokens 16 --modes full streaming ltri --backend auto --time-limit 540 --out "$out/e2e_llama8b" ;;
    profile) [ -f /tmp/m/qwen2.5-coder-0.5b.gguf ] && \
           step profile 300 python3 -m benchmarks.profile_engine --model qwen=/tmp/m/qwen2.5-coder-0.5b.gguf \
             --length 32768 --modes ltri infllm streaming --backends torch auto --out "$out/profile_qwen" ;;
    *) echo "unknown step $s" ;;
  esac
done
nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used --format=csv,noheader > "$out/gpu.txt"
mkdir -p "$OUT" && tar czf "$OUT/results.tgz" -C "$out" . && rm -rf "$out"
