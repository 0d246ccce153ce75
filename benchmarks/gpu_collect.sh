#!/usr/bin/env bash
# On the lent GPU: gather every background grid's rows, run records and errors as NAME/ (a tuning grid's dev/ and
# test/ folders as NAME-dev/, NAME-test/), with its worker logs joined into one file, print the row counts, record
# the GPUs' and CPUs' load (are the grids GPU- or CPU-bound?), and pack it all into $OUT/results.tgz: a call brings
# back at most 8 files. Unpack here with `tar xzf .../results.tgz -C DIR`.
set -uo pipefail
final=$OUT
OUT=$(mktemp -d)
count() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }
for dir in /tmp/res/*/; do
  dir=${dir%/}
  grid=$(basename "$dir")
  for sub in "$dir" "$dir"/*/; do
    sub=${sub%/}
    [ -f "$sub/samples.jsonl" ] || [ -f "$sub/errors.jsonl" ] || [ "$sub" = "$dir" ] || continue
    name=$grid
    [ "$sub" = "$dir" ] || name=$grid-$(basename "$sub")
    mkdir -p "$OUT/$name"
    for f in samples.jsonl meta.json errors.jsonl tuning.md tuning.json; do
      [ -f "$sub/$f" ] && cp "$sub/$f" "$OUT/$name/"
    done
    [ "$sub" = "$dir" ] && for log in "$dir"/logs/*.log; do [ -f "$log" ] && { echo "== $log"; tail -n 40 "$log"; }; done \
      > "$OUT/$name/logs.txt"
    echo "$name: $(count "$sub/samples.jsonl") rows, $(count "$sub/errors.jsonl") errors"
  done
done
echo "running workers: $(pgrep -fc 'benchmarks.(evaluate|tune)' || true)"
{ date; uptime; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; } | tee -a "$OUT/load.txt"
tar czf "$final/results.tgz" -C "$OUT" . && rm -rf "$OUT"
