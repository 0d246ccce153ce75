"""The one-program sort and budget fill (``kernels.triton_sort_fill.sort_fill``) equals the reference fill
(``retrieval._fill_budget_device``: torch's stable sort, then the torch walk) exactly: ties, one-token spans, -0.0
and NaN keys, budgets of 0 and of everything, a walk past a long span, rows up to the kernel's limit. On CPU under
``TRITON_INTERPRET`` (small sizes); compiled on a GPU."""

import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module

triton_sort_fill = kernel_module("triton_sort_fill")

from ltri_rag import retrieval


def _reference(keys, lengths, budget, monkeypatch):
    monkeypatch.setattr(retrieval, "SORT_FILL", False)
    monkeypatch.setattr(retrieval, "FUSED_FILL", False)  # the torch walk after a full sort, also on a GPU
    return retrieval._fill_budget_device(keys, lengths, budget, device_lengths=lengths.to(keys.device)).cpu()


# (rows, num_spans, max_len, budget, ties)
CASES = [
    (1, 1, 5, 3, False),  # one span longer than the budget
    (2, 40, 9, 60, True),  # ties: span order decides
    (3, 300, 30, 500, True),  # several rows, a block of 512 with padding
    (2, 50, 4, 10_000, False),  # everything fits: no walk
    (1, 37, 6, 0, False),  # a budget of 0 takes nothing
    (4, 700, 64, 2048, False),  # long spans the walk skips, then shorter ones it takes
    (2, 16, 1, 16, False),  # the prefix is exactly every span
    (2, 2048, 112, 2048, True),  # the longest row the kernel takes
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "R{}S{}L{}b{}t{}".format(*c))
def test_matches_the_reference_fill(case, monkeypatch) -> None:
    rows, num_spans, max_len, budget, ties = case
    gen = torch.Generator().manual_seed(num_spans * 7 + rows)
    lengths = torch.randint(1, max_len + 1, (num_spans,), generator=gen)
    lengths[torch.randint(0, num_spans, (num_spans // 20 + 1,), generator=gen)] = 1  # gap-filling one-token spans
    keys = torch.randn(rows, num_spans, generator=gen)
    if ties:
        keys = (keys * 4).round() / 4  # a few dozen distinct values: ties everywhere
    keys = keys.to(DEVICE)
    got = triton_sort_fill.sort_fill(keys, lengths.to(DEVICE), budget, retrieval._TAIL).cpu()
    want = _reference(keys, lengths, budget, monkeypatch)
    assert got.dtype == torch.bool and got.shape == (rows, num_spans)
    assert torch.equal(got, want)
    assert ((got.long() * lengths).sum(dim=1) <= budget).all()


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
    with pytest.raises(ValueError, match="num_spans"):
        triton_sort_fill.sort_fill(torch.zeros(1, too_long, device=DEVICE),
                                   torch.ones(too_long, dtype=torch.int64, device=DEVICE), 4, 64)
    assert triton_sort_fill.sort_fill(keys[:, :0], lengths[:0], 4, 64).shape == (2, 0)
