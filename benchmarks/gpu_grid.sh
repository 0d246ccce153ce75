#!/usr/bin/env bash
# On the lent GPU, after benchmarks/gpu_setup.sh: start a grid in the background (it outlives the call that starts
# it), resuming from rows already committed, and stopping cleanly at the session's deadline.
#
#   bash benchmarks/gpu_grid.sh NAME WORKERS SEED_DIR MODULE ARGS...
#
# NAME: folder under /tmp/res for this grid; WORKERS: processes spread over every visible GPU; SEED_DIR: a results
# folder of the checkout whose samples.jsonl the grid resumes from ("-" for none); MODULE ARGS: the grid command
# (benchmarks.evaluate or benchmarks.tune and its arguments, without --out / --max-seconds). The deadline is read
# from /tmp/deadline (epoch seconds; written by the session's first call). Collect with benchmarks/gpu_collect.sh.
# EXTRA_SITE=/tmp/site-newer puts the staged newer transformers first on the path (Gemma 3 needs it).
# GPUS=1 (a comma-separated list) keeps the grid off the other GPUs, e.g. to time a benchmark alone on GPU 0 while
# the grid runs on GPU 1 (CUDA_VISIBLE_DEVICES=0 for the benchmark).
set -euo pipefail
name=$1 workers=$2 seed=$3 module=$4
shift 4
out=/tmp/res/$name
mkdir -p "$out"
if [ "$seed" != "-" ] && [ -f "$seed/samples.jsonl" ] && [ ! -f "$out/samples.jsonl" ]; then
  cp "$seed/samples.jsonl" "$out/samples.jsonl"
  [ -f "$seed/meta.json" ] && cp "$seed/meta.json" "$out/meta.json"
fi
left=$(( $(cat /tmp/deadline) - $(date +%s) ))
gpus=${GPUS:-$(python3 -c "import torch; print(','.join(map(str, range(torch.cuda.device_count()))))")}
export PYTHONPATH=${EXTRA_SITE:+$EXTRA_SITE:}/tmp/site:/tmp/run LTRI_DATA_DIR=/tmp/data
cd /tmp/run
setsid nohup python3 -m benchmarks.parallel --workers "$workers" --gpus "$gpus" "$module" "$@" \
  --out "$out" --max-seconds "$left" > "$out.log" 2>&1 < /dev/null &
echo "started $name: $workers workers on GPUs $gpus, $left s left"
