#!/usr/bin/env bash
# On the lent GPU: copy every background grid's rows, run records and errors to $OUT/NAME, with its worker logs
# joined into one file (a call brings back only a few files per folder), and print the row counts.
set -uo pipefail
count() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }
for dir in /tmp/res/*/; do
  dir=${dir%/}
  name=$(basename "$dir")
  mkdir -p "$OUT/$name"
  for f in samples.jsonl meta.json errors.jsonl; do [ -f "$dir/$f" ] && cp "$dir/$f" "$OUT/$name/"; done
  for log in "$dir"/logs/*.log; do [ -f "$log" ] && { echo "== $log"; tail -n 40 "$log"; }; done > "$OUT/$name/logs.txt"
  echo "$name: $(count "$dir/samples.jsonl") rows, $(count "$dir/errors.jsonl") errors"
done
echo "running workers: $(pgrep -fc 'benchmarks.(evaluate|tune)' || true)"
