"""Unit tests for ``ltri_rag.index_vectors`` (per-span index vector counts and selection)."""

from __future__ import annotations

import random

import pytest
import torch

from ltri_rag.index_vectors import dynamic_counts, select_index_tokens, static_counts

# ---------------------------------------------------------------------------------------------------------------
# static_counts
# ---------------------------------------------------------------------------------------------------------------


def test_static_counts_clamps_to_length():
    lengths = torch.tensor([1, 2, 3, 4, 5, 100])
    counts = static_counts(lengths, 4)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [1, 2, 3, 4, 4, 4]
    assert static_counts(lengths, 1).tolist() == [1] * 6
    assert static_counts(torch.zeros(0, dtype=torch.int64), 4).numel() == 0


# ---------------------------------------------------------------------------------------------------------------
# dynamic_counts
# ---------------------------------------------------------------------------------------------------------------


def brute_dynamic(lengths, rank, base, minimum, maximum, eps=1e-6):
    rank = [float(r) for r in rank]
    n = len(rank)
    out = []
    for k in range(n):
        left = rank[k - 1] if k > 0 else rank[k]
        right = rank[k + 1] if k < n - 1 else rank[k]
        neighbours = max((left + right) / 2, eps)
        confidence = max(rank[k], 0.0) / neighbours
        raw = float(maximum) if confidence <= 0 else round(base / confidence)
        out.append(min(max(raw, minimum), maximum, int(lengths[k])))
    return out


def test_dynamic_counts_low_confidence_span_gets_more_vectors():
    lengths = torch.full((7,), 100)
    rank = torch.tensor([1.0, 1.0, 0.05, 1.0, 1.0, 20.0, 1.0])
    counts = dynamic_counts(lengths, rank, base=4, minimum=1, maximum=16)
    assert counts.dtype == torch.int64
    low, high = counts[2].item(), counts[5].item()
    assert low > high
    assert low == 16  # base / (0.05 / 1) = 80 -> maximum
    assert high == 1  # base / (20 / 1) -> rounds to 0 -> minimum
    # a span as confident as both neighbours gets the base count
    assert counts[0].item() == 4


def test_dynamic_counts_monotone_in_confidence():
    lengths = torch.full((3,), 1000)
    previous = None
    for r in [0.01, 0.1, 0.3, 0.5, 1.0, 2.0, 4.0, 8.0]:
        rank = torch.tensor([1.0, r, 1.0])
        c = dynamic_counts(lengths, rank, base=8, minimum=1, maximum=64)[1].item()
        if previous is not None:
            assert c <= previous, (r, c, previous)
        previous = c
    assert dynamic_counts(lengths, torch.tensor([1.0, 0.01, 1.0]), base=8, minimum=1, maximum=64)[1] == 64
    assert dynamic_counts(lengths, torch.tensor([1.0, 8.0, 1.0]), base=8, minimum=1, maximum=64)[1] == 1


@pytest.mark.parametrize("bad_rank", [0.0, -0.5, -100.0])
def test_dynamic_counts_non_positive_rank_gets_maximum(bad_rank):
    lengths = torch.full((5,), 50)
    rank = torch.tensor([1.0, 2.0, bad_rank, 0.5, 1.0])
    counts = dynamic_counts(lengths, rank, base=2, minimum=1, maximum=12)
    assert counts[2].item() == 12


def test_dynamic_counts_never_exceed_length():
    lengths = torch.tensor([1, 2, 3, 1, 5])
    rank = torch.tensor([-1.0, -1.0, 0.0, 0.001, 1.0])  # all would want many vectors
    counts = dynamic_counts(lengths, rank, base=8, minimum=4, maximum=16)
    assert (counts <= lengths).all()
    assert counts.tolist() == [1, 2, 3, 1, 4]


def test_dynamic_counts_single_span_and_empty():
    assert dynamic_counts(torch.tensor([10]), torch.tensor([0.7]), base=3, minimum=1, maximum=8).tolist() == [3]
    assert dynamic_counts(torch.tensor([10]), torch.tensor([-0.7]), base=3, minimum=1, maximum=8).tolist() == [8]
    empty = dynamic_counts(torch.zeros(0, dtype=torch.int64), torch.zeros(0), base=3, minimum=1, maximum=8)
    assert empty.numel() == 0 and empty.dtype == torch.int64


def test_dynamic_counts_negative_neighbours_use_eps_floor():
    # neighbours' mean <= 0 is floored at eps: any positive rank is then hugely confident -> minimum
    counts = dynamic_counts(torch.full((3,), 50), torch.tensor([-1.0, 0.5, -1.0]), base=4, minimum=2, maximum=8)
    assert counts[1].item() == 2


def test_dynamic_counts_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for _ in range(100):
        n = rng.randint(1, 30)
        lengths = torch.randint(1, 40, (n,), generator=gen)
        rank = torch.randn(n, generator=gen) * 0.5 + 0.3
        base, minimum = rng.randint(1, 8), rng.randint(1, 4)
        maximum = rng.randint(minimum, 24)
        counts = dynamic_counts(lengths, rank, base=base, minimum=minimum, maximum=maximum)
        assert counts.tolist() == brute_dynamic(lengths.tolist(), rank.tolist(), base, minimum, maximum)
        assert ((counts >= torch.clamp(lengths, max=minimum)) & (counts <= maximum) & (counts <= lengths)).all()


# ---------------------------------------------------------------------------------------------------------------
# select_index_tokens
# ---------------------------------------------------------------------------------------------------------------


def partition(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ends = torch.tensor(lengths).cumsum(0)
    return ends - torch.tensor(lengths), ends


def test_select_index_tokens_small_example():
    key_mass = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.2, 0.8, 0.3, 0.7],
            [0.9, 0.1, 0.2, 0.7, 0.1, 0.6, 0.5],
        ]
    )
    starts, ends = partition([3, 4])
    counts = torch.tensor([2, 1])
    token_idx, owner = select_index_tokens(key_mass, starts, ends, counts)
    assert token_idx.shape == (3, 2)
    assert owner.tolist() == [0, 0, 1]
    # head 0: span 0 -> tokens 1 (0.9), 2 (0.5); span 1 -> token 4 (0.8)
    assert token_idx[:, 0].tolist() == [1, 2, 4]
    # head 1: span 0 -> tokens 0 (0.9), 2 (0.2); span 1 -> token 3 (0.7)
    assert token_idx[:, 1].tolist() == [0, 2, 3]


def test_select_index_tokens_matches_brute_force_topk():
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(1)
    for _ in range(40):
        num_spans = rng.randint(1, 12)
        lengths = [rng.randint(1, 20) for _ in range(num_spans)]
        num_tokens = sum(lengths)
        num_kv_heads = rng.choice([1, 2, 3, 8])
        key_mass = torch.rand(num_kv_heads, num_tokens, generator=gen)  # distinct values (no ties)
        starts, ends = partition(lengths)
        counts = torch.tensor([rng.randint(0, length) for length in lengths])
        token_idx, owner = select_index_tokens(key_mass, starts, ends, counts)
        total = int(counts.sum())
        assert token_idx.shape == (total, num_kv_heads)
        assert owner.shape == (total,)
        assert owner.tolist() == torch.repeat_interleave(torch.arange(num_spans), counts).tolist()
        for h in range(num_kv_heads):
            expected = []
            for s, e, c in zip(starts.tolist(), ends.tolist(), counts.tolist()):
                top = torch.topk(key_mass[h, s:e], c).indices + s  # sorted, best first
                expected.extend(top.tolist())
            assert token_idx[:, h].tolist() == expected
        # every selected token lies inside its owning span
        assert ((token_idx >= starts[owner][:, None]) & (token_idx < ends[owner][:, None])).all()


def test_select_index_tokens_full_counts_select_every_token_once():
    gen = torch.Generator().manual_seed(2)
    lengths = [5, 1, 7, 3]
    starts, ends = partition(lengths)
    key_mass = torch.rand(4, sum(lengths), generator=gen)
    token_idx, owner = select_index_tokens(key_mass, starts, ends, torch.tensor(lengths))
    for h in range(4):
        assert sorted(token_idx[:, h].tolist()) == list(range(sum(lengths)))


def test_select_index_tokens_rejects_spans_not_covering_tokens():
    key_mass = torch.rand(2, 10)
    starts, ends = partition([3, 4])  # covers 7 of 10 tokens
    with pytest.raises(ValueError, match="7"):
        select_index_tokens(key_mass, starts, ends, torch.tensor([1, 1]))
