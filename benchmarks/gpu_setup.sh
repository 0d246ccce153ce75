#!/usr/bin/env bash
# On the lent GPU, after parts staged by gpu_prepare.sh were copied to /tmp/m: reassemble every model whose parts
# are all there (kept only when its sha256 matches; otherwise the parts stay for another try), install the package
# and the bench wheels into /tmp/site once, and copy the benchmarks and data out of the checkout (the checkout is
# replaced at the next call, so work left running in the background must not read from it). Safe to run again as
# more parts arrive:
#
#   bash benchmarks/gpu_setup.sh && export PYTHONPATH=/tmp/site:/tmp/run LTRI_DATA_DIR=/tmp/data && cd /tmp/run
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
mkdir -p /tmp/m
cd /tmp/m
while read -r sum name; do
  [ -e "$name" ] && continue
  ls "$name".part* >/dev/null 2>&1 || continue
  cat "$name".part* > "$name.tmp"
  if [ "$(sha256sum "$name.tmp" | cut -d' ' -f1)" = "$sum" ]; then
    mv "$name.tmp" "$name" && rm -f "$name".part* && echo "assembled $name"
  else
    rm -f "$name.tmp" && echo "incomplete: $name ($(ls "$name".part* | wc -l) parts so far)"
  fi
done < "$repo"/.gpu/meta/SHA256SUMS
if [ ! -e /tmp/site/.installed ]; then
  if ls minilm.whl.part* >/dev/null 2>&1; then
    cat minilm.whl.part* > "$(cat "$repo"/.gpu/meta/minilm.name)" && rm -f minilm.whl.part*
  fi
  cd "$repo"
  # transformers / regex go to their own folder, put on the path only by grids that need them (Gemma 3: the
  # device's transformers mis-converts its GGUF tokenizer); other models keep the device's version
  newer=$(ls .gpu/whl-newer/*.whl .gpu/whl/transformers-*.whl .gpu/whl/regex-*.whl 2>/dev/null || true)
  rest=$(ls .gpu/whl/*.whl | grep -v -e '/transformers-' -e '/regex-' -e '/setuptools-')
  python3 -m pip install -q --no-index --no-deps --target /tmp/site $rest $(ls /tmp/m/*.whl 2>/dev/null || true)
  [ -z "$newer" ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site-newer $newer
  # built with the staged setuptools (gpu_prepare.sh) where there is one, on the path of the build only
  build_env=
  if ls .gpu/whl/setuptools-*.whl >/dev/null 2>&1; then
    build_env=/tmp/build-env
    python3 -m pip install -q --no-index --no-deps --target "$build_env" .gpu/whl/setuptools-*.whl
  fi
  PYTHONPATH=$build_env python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation \
    --target /tmp/site .
  touch /tmp/site/.installed
fi
cd "$repo"
# faiss travels in a folder of its own (gpu_prepare.sh): installed by the first call that carries it
if [ ! -e /tmp/site/.faiss ] && ls .gpu/whl-faiss/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl-faiss/*.whl && touch /tmp/site/.faiss
fi
# the checkout itself must not be on sys.path (its ltri_rag/ lacks the installed kernels/storage mapping)
mkdir -p /tmp/run /tmp/data
rm -rf /tmp/run/benchmarks.new && cp -r benchmarks /tmp/run/benchmarks.new
[ -d /tmp/run/benchmarks ] || mv /tmp/run/benchmarks.new /tmp/run/benchmarks
rm -rf /tmp/run/benchmarks.new
[ -d /tmp/run/tests ] || cp -r tests /tmp/run/tests
[ -d .gpu/data ] && cp -rn .gpu/data/. /tmp/data/
ls -la /tmp/m
echo "ready: export PYTHONPATH=/tmp/site:/tmp/run LTRI_DATA_DIR=/tmp/data; cd /tmp/run"
