#!/usr/bin/env bash
# On the lent GPU, after benchmarks/gpu_setup.sh: the KV memory benchmark (bench_memory), which outlives one device
# call at 1M tokens. `start` launches it detached from the call (setsid: a plain background job is killed when the
# call ends) and returns; `poll` waits up to WAIT seconds (default 500) for it to end, then copies its results to
# $OUT. The machine is released after ~30 s idle, which ends the run: chain the poll calls without a pause.
#
#   SIZES="100000 1000000" bash benchmarks/gpu_memory.sh start
#   WAIT=540 bash benchmarks/gpu_memory.sh poll        # again until it says "ended"
set -uo pipefail
res=/tmp/res/mem
case ${1:-} in
  start)
    mkdir -p "$res" /tmp/stores
    cd /tmp/run || exit 1
    PYTHONPATH=/tmp/site:/tmp/run LTRI_DATA_DIR=/tmp/data PYTHONUNBUFFERED=1 setsid nohup \
      python3 -m benchmarks.bench_memory --model "qwen=/tmp/m/qwen2.5-coder-0.5b.gguf" --sizes ${SIZES:-100000 1000000} \
      --questions "${QUESTIONS:-8}" --out "$res" --store-dir /tmp/stores > "$res.log" 2>&1 < /dev/null &
    echo $! > "$res.pid"
    echo "started $(cat "$res.pid")" ;;
  poll)
    pid=$(cat "$res.pid")
    for _ in $(seq 1 $(( ${WAIT:-500} / 5 ))); do kill -0 "$pid" 2>/dev/null || break; sleep 5; done
    kill -0 "$pid" 2>/dev/null && echo "running" || echo "ended"
    tr '\r' '\n' < "$res.log" | grep -v -e '^ingest' -e 'Converting' -e 'Loading' | tail -20
    tail -c 300 "$res.log" | tr '\r' '\n' | tail -2
    cp "$res"/bench.json "$res"/bench.md "$res.log" "$OUT"/ 2>/dev/null
    df -h /tmp | tail -1 ;;
  *) echo "usage: $0 start|poll" >&2; exit 2 ;;
esac
