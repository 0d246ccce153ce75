#!/usr/bin/env bash
# On the lent GPU, after the parts staged by gpu_prepare.sh were copied to /tmp/m: reassemble and check the models,
# install the package and the bench wheels into /tmp/site (nothing system-wide), and print the environment to use:
#
#   bash benchmarks/gpu_setup.sh && export PYTHONPATH=/tmp/site:/tmp/run LTRI_DATA_DIR=$PWD/.gpu/data && cd /tmp/run
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
cd /tmp/m
for first in *.gguf.part00; do
  [ -e "$first" ] || continue
  name=${first%.part00}
  cat "$name".part* > "$name" && rm -f "$name".part*
done
if ls minilm.whl.part* >/dev/null 2>&1; then
  cat minilm.whl.part* > "$(cat "$repo"/.gpu/meta/minilm.name)"
  rm -f minilm.whl.part*
fi
sha256sum -c --ignore-missing "$repo"/.gpu/meta/SHA256SUMS
cd "$repo"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl /tmp/m/*.whl
python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --target /tmp/site .
# the checkout itself must not be on sys.path (its ltri_rag/ lacks the installed kernels/storage mapping):
# run from /tmp/run, which only links the benchmark and test folders
mkdir -p /tmp/run && ln -sfn "$repo"/benchmarks /tmp/run/benchmarks && ln -sfn "$repo"/tests /tmp/run/tests
echo "ready: export PYTHONPATH=/tmp/site:/tmp/run LTRI_DATA_DIR=$repo/.gpu/data; cd /tmp/run"
