"""The one-program sort and budget fill (``kernels.triton_sort_fill.sort_fill``) equals the reference fill
(``retrieval._fill_budget_device``: torch's stable sort, then the torch walk) exactly: ties, one-token spans, -0.0
and NaN keys, budgets of 0 and of everything, a walk past a long span, rows up to the kernel's limit. On CPU under
``TRITON_INTERPRET`` (small sizes); compiled on a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module

triton_sort_fill = kernel_module("triton_sort_fill")

from ltri_rag import retrieval

# The kernels call triton's own jit functions (tl.sort, tl.cumsum, tl.sum). The interpreter can run them only if
# triton was first imported with TRITON_INTERPRET set, which an earlier test file of this process may have
# prevented. Then the tests below run in a fresh process of their own (test_in_a_fresh_interpreter_process).
_STANDARD_INTERPRETED = DEVICE == "cuda" or type(pytest.importorskip("triton.language").sort).__name__ != "JITFunction"


@pytest.fixture(autouse=True)
def _interpretable(request):
    if not _STANDARD_INTERPRETED and request.node.name != "test_in_a_fresh_interpreter_process":
        pytest.skip("run in a fresh interpreter process instead (test_in_a_fresh_interpreter_process)")


@pytest.mark.skipif(_STANDARD_INTERPRETED, reason="not needed: triton was imported with the interpreter on, so "
                                                  "this process runs the tests below itself")
@pytest.mark.filterwarnings("ignore")
def test_in_a_fresh_interpreter_process() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
                         cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


def _reference(keys, lengths, budget, monkeypatch):
    monkeypatch.setattr(retrieval, "SORT_FILL", False)
    monkeypatch.setattr(retrieval, "FUSED_FILL", False)  # the torch walk after a full sort, also on a GPU
    return retrieval._fill_budget_device(keys, lengths, budget, device_lengths=lengths.to(keys.device)).cpu()


def _inputs(rows, num_spans, max_len, ties, seed):
    """Host lengths 1..max_len (one in 20 set to 1, as gap-filling pieces are) and ``[rows, S]`` keys on DEVICE
    (with ``ties``: a few dozen distinct values, ties everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (num_spans,), generator=gen)
    lengths[torch.randint(0, num_spans, (num_spans // 20 + 1,), generator=gen)] = 1
    keys = torch.randn(rows, num_spans, generator=gen)
    if ties:
        keys = (keys * 4).round() / 4
    return lengths, keys.to(DEVICE)


# (rows, num_spans, max_len, budget, ties)
CASES = [
    (1, 1, 5, 3, False),  # one span longer than the budget
    (2, 40, 9, 60, True),  # ties: span order decides
    (3, 300, 30, 500, True),  # several rows, a block of 512 with padding
    (2, 50, 4, 10_000, False),  # everything fits: no walk
    (1, 37, 6, 0, False),  # a budget of 0 takes nothing
    (4, 700, 64, 2048, False),  # long spans the walk skips, then shorter ones it takes
    (2, 16, 1, 16, False),  # the prefix is exactly every span
    (2, 1024, 112, 2048, True),  # the longest row one program sorts
]

# rows longer than MAX_SPANS, with MAX_SPANS, CHUNK and the tail made small here so that the interpreter runs
# several rounds of several chunks quickly: (rows, num_spans, max_len, budget, ties, extra candidates)
LONG_CASES = [
    (2, 300, 30, 100, True, 0),  # 300 -> 2 chunks' best 64 -> 1 chunk's -> one program
    (1, 1000, 64, 150, False, 5),  # more candidates than needed: the same result
    (3, 700, 9, 60, True, 0),  # several rows, short spans: 700 -> 3 chunks -> 1 -> one program
    (1, 129, 40, 0, False, 0),  # a budget of 0
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "R{}S{}L{}b{}t{}".format(*c))
def test_matches_the_reference_fill(case, monkeypatch) -> None:
    rows, num_spans, max_len, budget, ties = case
    lengths, keys = _inputs(rows, num_spans, max_len, ties, seed=num_spans * 7 + rows)
    got = triton_sort_fill.sort_fill(keys, lengths.to(DEVICE), budget, retrieval._TAIL).cpu()
    want = _reference(keys, lengths, budget, monkeypatch)
    assert got.dtype == torch.bool and got.shape == (rows, num_spans)
    assert torch.equal(got, want)
    assert ((got.long() * lengths).sum(dim=1) <= budget).all()


@pytest.mark.parametrize("case", LONG_CASES, ids=lambda c: "R{}S{}L{}b{}t{}x{}".format(*c))
def test_long_rows_through_chunk_tops(case, monkeypatch) -> None:
    rows, num_spans, max_len, budget, ties, extra = case
    monkeypatch.setattr(triton_sort_fill, "MAX_SPANS", 64)
    monkeypatch.setattr(triton_sort_fill, "CHUNK", 64)
    monkeypatch.setattr(triton_sort_fill, "MIN_KEEP", 16)
    monkeypatch.setattr(retrieval, "_TAIL", 4)  # the reference's tail too
    lengths, keys = _inputs(rows, num_spans, max_len, ties, seed=num_spans + rows)
    needed = triton_sort_fill.candidates_needed(lengths, budget, 4)
    got = triton_sort_fill.sort_fill(keys, lengths.to(DEVICE), budget, 4, candidates=needed + extra).cpu()
    assert torch.equal(got, _reference(keys, lengths, budget, monkeypatch))


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device: rows of 20K-64K spans take too long under the "
                                              "Triton interpreter (the interpreter runs the same code at small sizes)")
@pytest.mark.parametrize("num_spans", [1025, 20_000, 65_536])
def test_long_rows_at_the_library_sizes(num_spans, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(num_spans)
    lengths = torch.randint(16, 113, (num_spans,), generator=gen)
    lengths[torch.randint(0, num_spans, (num_spans // 200 + 1,), generator=gen)] = 1
    keys = ((torch.randn(2, num_spans, generator=gen) * 8).round() / 8).to(DEVICE)
    needed = triton_sort_fill.candidates_needed(lengths, 2048, retrieval._TAIL)
    assert needed <= triton_sort_fill.MAX_CANDIDATES
    got = triton_sort_fill.sort_fill(keys, lengths.to(DEVICE), 2048, retrieval._TAIL, candidates=needed).cpu()
    assert torch.equal(got, _reference(keys, lengths, 2048, monkeypatch))


def test_signed_zeros_and_nan_rank_as_torch_sorts_them(monkeypatch) -> None:
    """-0.0 ties with 0.0 (span order decides) and NaN ranks first, as in torch's stable descending sort."""
    lengths = torch.tensor([2, 2, 2, 2, 2, 2])
    keys = torch.tensor([[1.0, -0.0, 0.0, float("nan"), -1.0, 0.0]], device=DEVICE)
    for budget in (2, 4, 6, 8):
        got = triton_sort_fill.sort_fill(keys, lengths.to(DEVICE), budget, retrieval._TAIL).cpu()
        assert torch.equal(got, _reference(keys, lengths, budget, monkeypatch)), budget


def test_walk_takes_short_spans_after_a_long_one() -> None:
    """Ranks: 3, 3, then 9 (does not fit in 4 left), then 2 and 2 (fit): the walk takes those after the skip."""
    lengths = torch.tensor([3, 3, 9, 2, 2, 5], device=DEVICE)
    keys = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]], device=DEVICE)
    got = triton_sort_fill.sort_fill(keys, lengths, 10, retrieval._TAIL).cpu()
    assert got.tolist() == [[True, True, False, True, True, False]]


def test_selection_takes_the_kernel_on_cuda_rows_within_the_limit(monkeypatch) -> None:
    """``retrieval._fill_budget_device`` hands CUDA rows of up to ``SORT_FILL_MAX_SPANS`` spans to the kernel and
    longer ones to the full sort; both give the reference's spans."""
    if DEVICE != "cuda":
        pytest.skip("the dispatch is for CUDA keys")
    calls = []
    real = retrieval.sort_fill
    monkeypatch.setattr(retrieval, "sort_fill", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    gen = torch.Generator().manual_seed(3)
    monkeypatch.setattr(retrieval, "SORT_FILL_ROUNDS", False)
    for num_spans in (100, retrieval.SORT_FILL_MAX_SPANS + 1):
        lengths = torch.randint(1, 64, (num_spans,), generator=gen)
        keys = torch.randn(2, num_spans, generator=gen).cuda()
        got = retrieval._fill_budget_device(keys, lengths, 2048, device_lengths=lengths.cuda()).cpu()
        assert torch.equal(got, _reference(keys, lengths, 2048, monkeypatch))
        monkeypatch.setattr(retrieval, "SORT_FILL", True)
    assert calls == [(2, 100)]


def test_bad_inputs() -> None:
    keys = torch.zeros(2, 3, device=DEVICE)
    lengths = torch.ones(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        triton_sort_fill.sort_fill(keys.double(), lengths, 4, 64)
    with pytest.raises(ValueError, match="lengths must be"):
        triton_sort_fill.sort_fill(keys, lengths[:2], 4, 64)
    with pytest.raises(ValueError, match="budget"):
        triton_sort_fill.sort_fill(keys, lengths, -1, 64)
    too_long = triton_sort_fill.MAX_SPANS + 1
    with pytest.raises(ValueError, match="needs candidates"):
        triton_sort_fill.sort_fill(torch.zeros(1, too_long, device=DEVICE),
                                   torch.ones(too_long, dtype=torch.int64, device=DEVICE), 4, 64)
    assert triton_sort_fill.sort_fill(keys[:, :0], lengths[:0], 4, 64).shape == (2, 0)


def test_candidates_needed() -> None:
    """The most spans that fit together (the shortest ones), plus the tail, at most the spans; brute force."""
    import numpy as np

    assert triton_sort_fill.candidates_needed(torch.tensor([5, 1, 1, 3, 9]), 5, 4) == min(5, 3 + 4)
    assert triton_sort_fill.candidates_needed(torch.full((100,), 4), 10, 8) == 2 + 8
    assert triton_sort_fill.candidates_needed(torch.full((100,), 4), 0, 8) == 8
    assert triton_sort_fill.candidates_needed(torch.zeros(0, dtype=torch.int64), 10, 8) == 0
    gen = np.random.default_rng(0)
    for _ in range(50):
        lens = gen.integers(1, 20, size=int(gen.integers(1, 60)))
        budget = int(gen.integers(0, 200))
        n_max = int((np.cumsum(np.sort(lens)) <= budget).sum())
        assert triton_sort_fill.candidates_needed(torch.from_numpy(lens), budget, 5) == min(lens.size, n_max + 5)


def test_candidates_needed_remembered_per_key_tensor() -> None:
    """With a key tensor the count is remembered (other lengths under the same live key are not recounted);
    another key, budget or tail counts again."""
    key = torch.zeros(3)
    assert triton_sort_fill.candidates_needed(torch.tensor([1, 1, 1]), 2, 4, key) == 3
    assert triton_sort_fill.candidates_needed(torch.full((100,), 50), 2, 4, key) == 3  # remembered for this key
    assert triton_sort_fill.candidates_needed(torch.full((100,), 50), 100, 4, key) == 6  # another budget: 2 + 4
    assert triton_sort_fill.candidates_needed(torch.full((100,), 50), 100, 8) == 10  # no key: counted
