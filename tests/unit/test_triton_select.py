"""The one-launch budget fill (``kernels.triton_select.fill_ranked``) equals the torch reference
(``retrieval._fill_budget_device``) exactly: prefixes that end anywhere in a block or take everything, long spans
skipped by the walk, budgets of 0, several rows, ties. On CPU under ``TRITON_INTERPRET`` (set here, before the kernel
module is imported); compiled on a GPU."""

import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module

triton_select = kernel_module("triton_select")

from ltri_rag import retrieval


@pytest.fixture(autouse=True)
def _torch_references(monkeypatch: pytest.MonkeyPatch) -> None:
    """The references are the torch paths, also on a GPU: there ``retrieval._rank_keys`` would call ``rank_keys``
    itself (``FUSED_RANK``) and ``_fill_budget_device`` the sort-fill kernel (``SORT_FILL``), so a compiled run
    would compare the kernels with kernels."""
    monkeypatch.setattr(retrieval, "FUSED_RANK", False)
    monkeypatch.setattr(retrieval, "SORT_FILL", False)
    monkeypatch.setattr(retrieval, "FUSED_FILL", False)


def _fill(keys, lengths, budget, block):
    order = torch.argsort(keys, dim=1, descending=True, stable=True)
    ranked = lengths.to(keys.device)[order]
    return triton_select.fill_ranked(order, ranked, torch.cumsum(ranked, dim=1), budget, retrieval._TAIL,
                                     block=block)


# (rows, num_spans, max_len, budget, block)
CASES = [
    (1, 1, 5, 3, 16),  # one span longer than the budget
    (1, 40, 9, 60, 16),  # the prefix ends inside the third block
    (3, 200, 30, 500, 64),  # several rows, the walk crosses blocks
    (2, 50, 4, 10_000, 16),  # everything fits: no walk
    (1, 37, 6, 0, 16),  # a budget of 0 takes nothing
    (4, 300, 64, 2048, 128),  # long spans the walk skips, then shorter ones it takes
    (1, 16, 1, 16, 16),  # the prefix is exactly every span
]


@pytest.mark.parametrize("scalar_walk", [True, False], ids=["scalar_walk", "reduce_walk"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "R{}S{}L{}b{}B{}".format(*c))
def test_matches_the_torch_fill(case, scalar_walk, monkeypatch) -> None:
    rows, num_spans, max_len, budget, block = case
    monkeypatch.setattr(triton_select, "SCALAR_WALK", scalar_walk)
    gen = torch.Generator().manual_seed(num_spans * 7 + rows)
    lengths = torch.randint(1, max_len + 1, (num_spans,), generator=gen)
    keys = torch.randn(rows, num_spans, generator=gen)
    keys[:, ::5] = keys[:, :1].clone()  # ties: the stable order decides
    keys = keys.to(DEVICE)
    got = _fill(keys, lengths, budget, block)
    want = retrieval._fill_budget_device(keys, lengths, budget, device_lengths=lengths.to(DEVICE))
    assert got.dtype == torch.bool and got.shape == (rows, num_spans)
    assert torch.equal(got.cpu(), want.cpu())
    taken = (got.cpu().long() * lengths).sum(dim=1)
    assert (taken <= budget).all()


def test_walk_takes_short_spans_after_a_long_one() -> None:
    """Ranks: 3, 3, then 9 (does not fit in 4 left), then 2 and 2 (fit): the walk takes those after the skip."""
    lengths = torch.tensor([3, 3, 9, 2, 2, 5])
    keys = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]], device=DEVICE)
    got = _fill(keys, lengths, 10, 16).cpu()
    assert got.tolist() == [[True, True, False, True, True, False]]


def test_bad_inputs() -> None:
    order = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="one \\[R, S\\] shape"):
        triton_select.fill_ranked(order, order[:, :2], order, 4, 64)
    with pytest.raises(ValueError, match="int64"):
        triton_select.fill_ranked(order, order.int(), order, 4, 64)
    with pytest.raises(ValueError, match="powers of two"):
        triton_select.fill_ranked(order, order, order, 4, 48)
    assert triton_select.fill_ranked(order[:, :0], order[:, :0], order[:, :0], 4, 64).shape == (2, 0)


# (num_heads, rows, num_spans, prior, recency, nonfinite, block)
RANK_CASES = [
    (4, 1, 37, False, False, False, 16),  # shared selection, three blocks
    (8, 2, 300, True, True, False, 64),  # per KV head, prior and persistence
    (32, 1, 1000, True, True, True, 128),  # Llama-like heads, -inf and NaN scores (the floor)
    (6, 3, 5, False, True, True, 16),  # a tail block, recency only
]


def _rank_inputs(num_heads, num_spans, nonfinite, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_heads, num_spans, generator=gen) ** 3 / num_spans
    if nonfinite:
        scores[:, ::7] = -float("inf")
        scores[1, 3] = float("nan")
    prior = torch.rand(num_spans, generator=gen)
    recency = torch.rand(num_spans, generator=gen) * 2
    return scores.to(DEVICE), prior.to(DEVICE), recency.to(DEVICE)


@pytest.mark.parametrize("case", RANK_CASES, ids=lambda c: "H{}R{}S{}p{:d}r{:d}n{:d}B{}".format(*c))
def test_rank_keys_match_the_torch_keys(case) -> None:
    num_heads, rows, num_spans, use_prior, use_recency, nonfinite, block = case
    scores, prior, recency = _rank_inputs(num_heads, num_spans, nonfinite, seed=num_spans)
    kwargs = dict(prior=prior if use_prior else None, prior_weight=0.5 if use_prior else 0.0,
                  recency=recency if use_recency else None, bonus=1.5 if use_recency else 0.0)
    got = triton_select.rank_keys(scores, rows, block=block, **kwargs)
    want = retrieval._rank_keys(scores, rows, kwargs["recency"], kwargs["bonus"], False, 1, kwargs["prior"],
                                kwargs["prior_weight"])
    assert got.shape == (rows, num_spans) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    again = triton_select.rank_keys(scores, rows, block=block, **kwargs)
    assert torch.equal(got, again)  # deterministic: no atomics


@pytest.mark.parametrize("num_spans", [300, 321])
def test_rank_keys_when_each_part_walks_several_tiles(num_spans, monkeypatch) -> None:
    """A long memory: the partial sums have a fixed number of parts per row (128 on a GPU, 4 here), each
    program walking a run of tiles; the keys still match the torch keys and are deterministic."""
    monkeypatch.setattr(triton_select, "_MAX_PARTS", 4)
    scores, prior, recency = _rank_inputs(4, num_spans, True, seed=5)
    got = triton_select.rank_keys(scores, 2, prior=prior, prior_weight=0.5, recency=recency, bonus=1.5, block=16)
    want = retrieval._rank_keys(scores, 2, recency, 1.5, False, 1, prior, 0.5)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert torch.equal(got, triton_select.rank_keys(scores, 2, prior=prior, prior_weight=0.5, recency=recency,
                                                    bonus=1.5, block=16))


def test_rank_keys_without_any_finite_score() -> None:
    scores = torch.full((4, 9), -float("inf"), device=DEVICE)
    got = triton_select.rank_keys(scores, 2)
    want = retrieval._rank_keys(scores, 2, None, 0.0, False, 1, None, 0.0)
    assert torch.equal(got, want) and (got == 0).all()
    assert triton_select.rank_keys(scores[:, :0], 1).shape == (1, 0)
    with pytest.raises(ValueError, match="multiple of rows"):
        triton_select.rank_keys(scores[:3], 2)


def test_rank_keys_write_into_out() -> None:
    """Into half of a two-selection tensor (``retrieval.select_spans_pair``): the same keys, the other half
    untouched; an ``out`` of the wrong shape, dtype or layout is refused, naming what it got."""
    scores, prior, _ = _rank_inputs(4, 50, True, seed=7)
    both = torch.full((4, 50), 7.0, device=DEVICE)
    got = triton_select.rank_keys(scores, 2, prior=prior, prior_weight=0.5, out=both[2:])
    assert got.data_ptr() == both[2:].data_ptr()
    assert torch.equal(both[2:], triton_select.rank_keys(scores, 2, prior=prior, prior_weight=0.5))
    assert bool((both[:2] == 7.0).all())
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 \[2, 50\].*\(3, 50\)"):
        triton_select.rank_keys(scores, 2, out=both[:3])
    with pytest.raises(ValueError, match="float64"):
        triton_select.rank_keys(scores, 2, out=both[2:].double())
    with pytest.raises(ValueError, match="strides"):
        triton_select.rank_keys(scores, 2, out=torch.zeros(50, 2, device=DEVICE).t())


@pytest.mark.parametrize("num_spans,rows", [(1, 1), (37, 2), (1500, 1), (2100, 8)])
def test_recency_update_matches_torch_bit_for_bit(num_spans: int, rows: int) -> None:
    """``recency * decay + selected.any(0)`` in one launch: the torch path's float32 bits (a fused multiply-add
    would round once where torch rounds twice, and differ in the last bit for some of these values)."""
    gen = torch.Generator().manual_seed(num_spans)
    recency = (torch.rand(num_spans, generator=gen) * 3).to(DEVICE)
    selected = (torch.rand(rows, num_spans, generator=gen) < 0.3).to(DEVICE)
    for decay in (0.9, 0.7071):
        got = triton_select.update_recency_triton(recency, selected, decay)
        want = recency * decay + selected.any(dim=0).float()
        assert torch.equal(got, want)
        if num_spans > 1000:  # the values tell the two roundings from one: an FMA form would fail above
            one_rounding = (recency.double() * torch.tensor(decay).float().double()
                            + selected.any(dim=0).double()).float()
            assert not torch.equal(one_rounding, want)
        assert torch.equal(retrieval.update_recency(recency, selected, decay), want)
    assert triton_select.update_recency_triton(recency[:0], selected[:, :0], 0.9).shape == (0,)
    with pytest.raises(ValueError, match=r"selected must be a \[R, %d\] bool tensor" % num_spans):
        triton_select.update_recency_triton(recency, selected.float(), 0.9)
    with pytest.raises(ValueError, match="recency must be a \\[S\\] float32"):
        triton_select.update_recency_triton(recency.double(), selected, 0.9)
