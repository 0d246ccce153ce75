"""The budget fill over the best ranks only (``kernels.triton_top.select_fill``: radix select, candidate sort, fill)
equals the full sort's fill (``retrieval._fill_budget_device`` with the torch walk) exactly: rows with more spans than
candidates (the radix select) and fewer (every span sorted), ties at the selection's edge, one-token spans, -0.0 and
NaN keys, budgets of 0 and of everything, a walk past a long span. On CPU under ``TRITON_INTERPRET`` (small sizes);
compiled on a GPU (with a row of 20K spans, three tiles of the radix passes)."""

import numpy as np
import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module

triton_top = kernel_module("triton_top")

from ltri_rag import retrieval


def _reference(keys, lengths, budget, monkeypatch):
    monkeypatch.setattr(retrieval, "TOP_FILL", False)
    monkeypatch.setattr(retrieval, "FUSED_FILL", False)  # the torch walk after a full sort, also on a GPU
    return retrieval._fill_budget_device(keys, lengths, budget, device_lengths=lengths.to(keys.device)).cpu()


# (rows, num_spans, max_len, budget, ties, extra candidates)
CASES = [
    (1, 1, 5, 3, False, 0),  # one span longer than the budget
    (2, 40, 9, 60, True, 0),  # every span a candidate, ties
    (3, 300, 30, 500, True, 0),  # radix select (candidates < spans), ties at the edge
    (2, 50, 4, 10_000, False, 0),  # everything fits: no walk
    (1, 37, 6, 0, False, 0),  # a budget of 0 takes nothing
    (4, 700, 64, 2048, False, 0),  # long spans the walk skips, then shorter ones it takes
    (2, 1000, 112, 2048, True, 100),  # more candidates than needed: the same result
    (1, 3000, 40, 300, False, 0),  # three radix tiles of 1,024 keys (the tile is made small here)
]
if DEVICE == "cuda":
    CASES.append((2, 20_000, 112, 2048, True, 0))  # three tiles of 8,192 keys


@pytest.mark.parametrize("case", CASES, ids=lambda c: "R{}S{}L{}b{}t{}x{}".format(*c))
def test_matches_the_full_sort(case, monkeypatch) -> None:
    rows, num_spans, max_len, budget, ties, extra = case
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_top, "_TILE", 1024)  # several tiles at sizes the interpreter runs quickly
    gen = torch.Generator().manual_seed(num_spans * 7 + rows)
    lengths = torch.randint(1, max_len + 1, (num_spans,), generator=gen)
    lengths[torch.randint(0, num_spans, (num_spans // 20 + 1,), generator=gen)] = 1  # gap-filling one-token spans
    keys = torch.randn(rows, num_spans, generator=gen)
    if ties:
        keys = (keys * 4).round() / 4  # a few dozen distinct values: ties everywhere, also at the selection's edge
    keys = keys.to(DEVICE)
    needed = triton_top.candidates_needed(lengths, budget, retrieval._TAIL)
    got = triton_top.select_fill(keys, lengths.to(DEVICE), budget, retrieval._TAIL, needed + extra).cpu()
    want = _reference(keys, lengths, budget, monkeypatch)
    assert got.dtype == torch.bool and got.shape == (rows, num_spans)
    assert torch.equal(got, want)
    assert ((got.long() * lengths).sum(dim=1) <= budget).all()


def test_signed_zeros_and_nan_rank_as_torch_sorts_them(monkeypatch) -> None:
    """-0.0 ties with 0.0 (span order decides) and NaN ranks first, as in torch's stable descending sort."""
    lengths = torch.tensor([2, 2, 2, 2, 2, 2])
    keys = torch.tensor([[1.0, -0.0, 0.0, float("nan"), -1.0, 0.0]], device=DEVICE)
    for budget in (2, 4, 6, 8):
        got = triton_top.select_fill(keys, lengths.to(DEVICE), budget, retrieval._TAIL, 6).cpu()
        assert torch.equal(got, _reference(keys, lengths, budget, monkeypatch)), budget


def test_radix_select_with_every_key_equal(monkeypatch) -> None:
    """All keys tie: the candidates are the first spans in span order."""
    lengths = torch.full((200,), 3)
    keys = torch.zeros(2, 200, device=DEVICE)
    needed = triton_top.candidates_needed(lengths, 30, retrieval._TAIL)
    got = triton_top.select_fill(keys, lengths.to(DEVICE), 30, retrieval._TAIL, needed).cpu()
    assert got[:, :10].all() and not got[:, 10:].any()
    assert torch.equal(got, _reference(keys, lengths, 30, monkeypatch))


def test_candidates_needed() -> None:
    """The most spans that fit together (the shortest ones), plus the tail, at most the spans."""
    assert triton_top.candidates_needed(torch.tensor([5, 1, 1, 3, 9]), 5, 4) == min(5, 3 + 4)
    assert triton_top.candidates_needed(torch.full((100,), 4), 10, 8) == 2 + 8
    assert triton_top.candidates_needed(torch.full((100,), 4), 0, 8) == 8
    assert triton_top.candidates_needed(torch.tensor([2, 2, 2]), 100, 64) == 3
    assert triton_top.candidates_needed(torch.zeros(0, dtype=torch.int64), 10, 8) == 0
    # brute force: the largest n whose n shortest lengths sum to at most the budget
    gen = np.random.default_rng(0)
    for _ in range(50):
        lens = gen.integers(1, 20, size=int(gen.integers(1, 60)))
        budget = int(gen.integers(0, 200))
        sums = np.cumsum(np.sort(lens))
        n_max = int((sums <= budget).sum())
        assert triton_top.candidates_needed(torch.from_numpy(lens), budget, 5) == min(lens.size, n_max + 5)


def test_bad_inputs() -> None:
    keys = torch.zeros(2, 3, device=DEVICE)
    lengths = torch.ones(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        triton_top.select_fill(keys.double(), lengths, 4, 64, 3)
    with pytest.raises(ValueError, match="lengths must be"):
        triton_top.select_fill(keys, lengths[:2], 4, 64, 3)
    with pytest.raises(ValueError, match="candidates must be"):
        triton_top.select_fill(keys, lengths, 4, 64, 0)
    with pytest.raises(ValueError, match="budget"):
        triton_top.select_fill(keys, lengths, -1, 64, 3)
    assert triton_top.select_fill(keys[:, :0], lengths[:0], 4, 64, 3).shape == (2, 0)


def test_candidates_needed_remembered_per_key_tensor() -> None:
    """With a key tensor the count is remembered (new lengths under the same live key are not recounted); another
    key, budget or tail counts again."""
    key = torch.zeros(3)
    assert triton_top.candidates_needed(torch.tensor([1, 1, 1]), 2, 4, key) == 3
    assert triton_top.candidates_needed(torch.full((100,), 50), 2, 4, key) == 3  # remembered for this key
    assert triton_top.candidates_needed(torch.full((100,), 50), 100, 4, key) == 6  # another budget: 2 + 4
    assert triton_top.candidates_needed(torch.full((100,), 50), 100, 4, torch.zeros(3)) == 6
    assert triton_top.candidates_needed(torch.full((100,), 50), 100, 8) == 10  # no key: counted
