#!/usr/bin/env bash
# The open device work of issue 4, one step per device call (each fits the 10 minutes a call may run). The order
# and the rules each step decides are in benchmarks/DEVICE_PLAN.md. Committed, so that a fresh checkout has the plan
# (the git-ignored .gpu/ folder does not survive a session).
#
#   bash benchmarks/device_plan.sh STEP      # on the lent GPU, from the checkout; results under $OUT/STEP/
#
# Every step first runs benchmarks/gpu_setup.sh (idempotent: it assembles the model parts copied to /tmp/m, installs
# the package and the staged wheels into /tmp/site once, and copies benchmarks/ and tests/ to /tmp/run), so each call
# carries .gpu/whl, .gpu/meta and .gpu/data (see benchmarks/gpu_prepare.sh). faiss travels apart (.gpu/whl-faiss: with
# the tree and .gpu/whl it passes a call's 64 MiB): `tests` and `pytest` of the memory tests need it, so carry it in
# a call of its own on the warm machine first (e.g. `bash benchmarks/gpu_setup.sh`, carrying .gpu/whl-faiss .gpu/meta).
# Steps:
#
#   tests        every GPU test (tests/gpu), log in gpu_tests.log
#   pytest FILE.. the named test files or node ids only (e.g. tests/gpu/test_memory_cuda.py), log in gpu_tests.log
#   pdl_ab       PDL_FINISH (ltri_pdl_finish: the decode attention's finish as a dependent launch) against the
#                defaults, end to end, 2 rounds
#   decode_ab    the decode defaults against session 33's (evict stride 64, evicting steps eager), 2 rounds
#   s35_ab       session 35's two candidates together (ltri_s35: FUSED_FINISH, SLOT_GLUE_IN_KERNEL) against the
#                defaults, end to end, 2 rounds
#   slot_ab      SLOT_GLUE_IN_KERNEL alone (ltri_slot_glue) against the defaults, end to end, 2 rounds
#   lv48_dev     niah_longvalue48 grid, dev split (decides evict_stride; resumable: call again to finish)
#   lv48_test    the same grid on the test split (reported)
#   decode_sweep decode attention (two launches, one launch) and the one-launch read floor over launch settings,
#                16K and 128K keys
#   decode_splits the same over split counts (1, 2, 4 and 8 programs per multiprocessor at 16K) and warps
#   decode_kernel the decode attention benchmark at its default settings, both model shapes, 4K / 16K / 128K
#   host_profile host profile of a 32K prefill and 16 decode steps, with pstats files
#   flat         time per token and prefill at 8K / 128K / 1M with the defaults, one process
#   smem_audit   every kernel variant of a request compiled again for sm_86: does it fit 99 KiB of shared memory
#                per block (RTX 30xx / 40xx, A10, L4) or launch through launch_fitting (shared_memory_audit.py)
#   full         prefill at 8K / 128K against Hugging Face full attention (SDPA), each mode in its own process,
#                ROUNDS rounds (default 2; the 3x-at-128K target), decode at 8K
set -uo pipefail
step=${1:?usage: bash benchmarks/device_plan.sh STEP}
: "${OUT:?OUT must name the folder whose files come back}"
bash benchmarks/gpu_setup.sh > /tmp/gpu_setup.log 2>&1 || { tail -n 20 /tmp/gpu_setup.log; exit 1; }
rm -rf /tmp/run/benchmarks /tmp/run/tests && cp -r benchmarks tests pyproject.toml /tmp/run/  # this checkout's copy
export PYTHONPATH=/tmp/site:/tmp/run LTRI_DATA_DIR=/tmp/data PYTHONUNBUFFERED=1
repo=$PWD
out=$OUT/$step
mkdir -p "$out"
cd /tmp/run
qwen=/tmp/m/qwen2.5-coder-0.5b.gguf
grid() {  # split: the niah_longvalue48 grid of benchmarks/results/longvalue48_h200_qwen/README.md, resumed
  local split=$1 res=/tmp/res/lv48-$1 seed=$repo/benchmarks/results/longvalue48_h200_qwen/$1
  [ -f "$qwen" ] || { echo "no $qwen: copy the model parts first"; exit 1; }
  mkdir -p "$res"
  [ -f "$res/samples.jsonl" ] || [ ! -f "$seed/samples.jsonl" ] || cp "$seed/samples.jsonl" "$seed/meta.json" "$res/"
  local secs=${LV48_SECONDS:-540}  # a shorter call leaves partial rows, which the next call (or session) resumes
  timeout $((secs + 30)) python3 -m benchmarks.parallel --workers 8 --gpus 0 benchmarks.evaluate --model "qwen=$qwen" \
    --tasks niah_longvalue48 --lengths 16384 32768 --samples 20 --split "$split" --backend triton \
    --systems ltri 'ltri_e64={"evict_stride": 64}' --out "$res" --max-seconds "$secs"
  cp "$res"/samples.jsonl "$res"/meta.json "$out"/ 2>/dev/null
  wc -l "$out"/samples.jsonl
}
case $step in
  tests)
    timeout 560 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/unit/test_triton_decode.py \
      tests/unit/test_triton_assemble.py tests/unit/test_triton_specialization.py > "$out/gpu_tests.log" 2>&1
    tail -n 15 "$out/gpu_tests.log" ;;
  pytest)
    [ $# -gt 1 ] || { echo "usage: bash benchmarks/device_plan.sh pytest FILE..."; exit 2; }
    timeout 560 python3 -m pytest -q -p no:cacheprovider "${@:2}" > "$out/gpu_tests.log" 2>&1
    tail -n 15 "$out/gpu_tests.log" ;;
  pdl_ab)
    timeout 570 python3 -m benchmarks.bench_e2e --model llama3-8b-random --lengths 8192 131072 \
      --decode-lengths 8192 131072 --decode-tokens 256 --modes ltri ltri_pdl_finish --isolate on --rounds 2 \
      --no-profile --backend auto --time-limit 560 --out "$out" ;;
  decode_ab)
    timeout 570 python3 -m benchmarks.bench_e2e --model llama3-8b-random --lengths 8192 131072 \
      --decode-lengths 8192 131072 --decode-tokens 256 --modes ltri ltri_s33_decode --isolate on --rounds 2 \
      --no-profile --backend auto --time-limit 560 --out "$out" ;;
  s35_ab)
    timeout 570 python3 -m benchmarks.bench_e2e --model llama3-8b-random --lengths 8192 131072 \
      --decode-lengths 8192 131072 --decode-tokens 256 --modes ltri ltri_s35 --isolate on --rounds 2 \
      --no-profile --backend auto --time-limit 560 --out "$out" ;;
  slot_ab)
    timeout 570 python3 -m benchmarks.bench_e2e --model llama3-8b-random --lengths 8192 131072 \
      --decode-lengths 8192 131072 --decode-tokens 256 --modes ltri ltri_slot_glue --isolate on --rounds 2 \
      --no-profile --backend auto --time-limit 560 --out "$out" ;;
  lv48_dev) grid dev ;;
  lv48_test) grid test ;;
  decode_sweep)
    timeout 570 python3 -m benchmarks.bench_decode_attention --models llama3-8b --contexts 16384 131072 \
      --grid block_n=32,64,128 num_warps=4,8 num_stages=2,3,4 --out "$out" ;;
  decode_splits)
    timeout 570 python3 -m benchmarks.bench_decode_attention --models llama3-8b --contexts 16384 131072 \
      --grid num_splits=17,33,66,132 num_warps=4,8 --out "$out" ;;
  decode_kernel)
    timeout 570 python3 -m benchmarks.bench_decode_attention --out "$out" ;;
  host_profile)
    timeout 570 python3 -m benchmarks.host_profile --length 32768 --chunks 2048 --decode-tokens 16 --top 45 \
      --dump "$out/pstats" > "$out/host_profile_32k.txt" 2>&1
    head -n 3 "$out/host_profile_32k.txt" ;;
  flat)
    timeout 570 python3 -m benchmarks.bench_e2e --model llama3-8b-random --lengths 8192 131072 1048576 \
      --decode-lengths 8192 131072 1048576 --decode-tokens 256 --modes ltri --isolate off --backend auto \
      --time-limit 560 --out "$out" ;;
  smem_audit)
    timeout 570 python3 -m benchmarks.shared_memory_audit --out "$out" ;;
  full)
    timeout 290 python3 -m benchmarks.bench_e2e --model llama3-8b-random --lengths 8192 131072 \
      --decode-lengths 8192 --decode-tokens 64 --modes full ltri --isolate on --rounds "${ROUNDS:-2}" --no-profile \
      --backend auto --time-limit 280 --out "$out" ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
