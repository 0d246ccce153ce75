"""On CUDA: compiling the selection sorts ahead of use (``kernels.precompile``) fills Triton's cache with exactly the
kernels ``sort_fill`` then launches. In an empty cache directory, a child process compiles every variant; then a
fresh process runs ``sort_fill`` at row lengths that launch every variant (its results checked against the
reference fill) and must compile no sort kernel of its own: if the ahead-of-use compile keyed any variant
differently from a real launch (argument types, alignment, settings), that process would add it to the cache.
Skipped without a GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_NAMES = ("_sort_fill_kernel", "_chunk_top_kernel")

_PRECOMPILE = """
from ltri_rag.kernels.precompile import precompile_sort_kernels
job = precompile_sort_kernels(0, tail=64, progress=False, timeout=600)
print(len(job.variants), len(job.processes))
again = precompile_sort_kernels(0, tail=64, progress=False)
print(again is None)
"""

# row lengths and budgets whose plans together launch every variant (checked in the script): spans of 4-8 tokens,
# so that a budget of 600 tokens reads ~214 ranks (chunks keep 256) and one of 1,000 ~314 (chunks keep 512)
_RUN = """
import torch
from ltri_rag import retrieval
from ltri_rag.kernels import triton_sort_fill as t
cases = [(100, 600), (200, 600), (400, 600), (800, 600), (2048, 600), (16384, 600), (4096, 1000), (16384, 1000)]
g = torch.Generator(device="cuda").manual_seed(0)
seen = set()
for n, budget in cases:
    keys = torch.randn(2, n, device="cuda", generator=g)
    lengths = torch.randint(4, 9, (n,), device="cuda", generator=g)
    c = t.candidates_needed(lengths.cpu(), budget, 64) if n > t.MAX_SPANS else None
    seen |= {(s.kernel, tuple(sorted(s.meta.items()))) for s in t.launch_plan(n, c)}
    got = t.sort_fill(keys, lengths, budget, 64, candidates=c)
    retrieval.SORT_FILL = False
    want = retrieval._fill_budget_device(keys, lengths.cpu(), budget, lengths)
    retrieval.SORT_FILL = True
    assert torch.equal(got, want), n
assert seen == {(k, tuple(sorted(m.items()))) for k, m in t.launch_variants()}, seen
torch.cuda.synchronize()
print("ok")
"""


def _sort_binaries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.cubin") if p.stem in _NAMES)


def _python(script: str, cache: Path) -> str:
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache), "LTRI_PRECOMPILE": "0"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_precompiled_kernels_are_the_ones_launched(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    cache = tmp_path / "triton-cache"
    lines = _python(_PRECOMPILE, cache).split()
    from ltri_rag.kernels.triton_sort_fill import launch_variants

    assert int(lines[0]) == len(launch_variants()) and int(lines[1]) >= 1
    assert lines[2] == "True"  # the second call found every marker
    before = _sort_binaries(cache)
    assert len(before) == len(launch_variants())
    assert _python(_RUN, cache).strip().endswith("ok")
    assert _sort_binaries(cache) == before  # the launches compiled nothing new
