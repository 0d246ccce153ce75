"""Unit tests for ``ltri_rag.spans`` (semantic span segmentation on the attention map)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ltri_rag.spans import (
    Spans,
    band_to_dense,
    fill_gaps,
    nms_spans,
    row_thresholds,
    segment_fixed,
    segment_triangle,
    span_rank,
    span_rank_band,
    triangle_scores,
)

# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def random_causal(n: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Random causal map with rows summing to at most 1."""
    a = torch.rand(n, n, generator=gen, dtype=torch.float64).tril()
    a = a / a.sum(dim=1, keepdim=True).clamp(min=1e-12)
    a = a * torch.rand(n, 1, generator=gen, dtype=torch.float64)  # row sums in (0, 1]
    return a.to(dtype)


def brute_triangle(a: torch.Tensor, theta: torch.Tensor, x: int, y: int) -> float:
    """S(x, y) = sum_{x <= j <= i <= y} (A[i, j] - theta_i), inclusive ``y``."""
    total = 0.0
    for i in range(x, y + 1):
        for j in range(x, i + 1):
            total += float(a[i, j]) - float(theta[i])
    return total


def brute_cut(a: torch.Tensor, x: int, y: int) -> float:
    """C(x, y) = sum_{i > y} sum_{x <= j <= y} A[i, j] over all rows of ``a``."""
    total = 0.0
    for i in range(y + 1, a.shape[0]):
        for j in range(x, y + 1):
            total += float(a[i, j])
    return total


def dense_to_band(a: torch.Tensor, band_width: int) -> torch.Tensor:
    """``band[i, o] = a[i, i - o]`` (0 where ``i - o < 0``)."""
    n = a.shape[0]
    band = torch.zeros(n, band_width, dtype=a.dtype)
    for i in range(n):
        for o in range(min(band_width, i + 1)):
            band[i, o] = a[i, i - o]
    return band


def assert_partition(spans: Spans, num_rows: int, max_len: int) -> None:
    starts, ends = spans.starts.tolist(), spans.ends.tolist()
    assert spans.starts.dtype == torch.int64 and spans.ends.dtype == torch.int64
    assert len(starts) == len(ends) == len(spans) == spans.rank.numel()
    assert starts[0] == 0
    assert ends[-1] == num_rows
    for k in range(len(starts) - 1):
        assert ends[k] == starts[k + 1], (starts, ends)
    for s, e in zip(starts, ends):
        assert 1 <= e - s <= max_len, (s, e, max_len)
    assert torch.equal(spans.lengths, spans.ends - spans.starts)


def assert_pairs_partition(pairs: list[tuple[int, int]], num_rows: int, max_len: int) -> None:
    assert pairs, "empty partition"
    assert pairs[0][0] == 0
    assert pairs[-1][1] == num_rows
    for (_, e0), (s1, _) in zip(pairs[:-1], pairs[1:]):
        assert e0 == s1, pairs
    for s, e in pairs:
        assert 1 <= e - s <= max_len, (s, e, max_len)


# ---------------------------------------------------------------------------------------------------------------
# band_to_dense / row_thresholds
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_rows,band_width", [(1, 1), (1, 4), (3, 2), (5, 5), (17, 6), (6, 20)])
def test_band_to_dense_matches_brute_force(num_rows, band_width):
    gen = torch.Generator().manual_seed(num_rows * 100 + band_width)
    band = torch.rand(num_rows, band_width, generator=gen)
    dense = band_to_dense(band)
    assert dense.shape == (num_rows, num_rows)
    assert dense.dtype == band.dtype
    expected = torch.zeros(num_rows, num_rows)
    for i in range(num_rows):
        for o in range(band_width):
            if i - o >= 0:
                expected[i, i - o] = band[i, o]
    assert torch.equal(dense, expected)
    # causal and within the band
    assert torch.equal(dense, dense.tril())
    if band_width < num_rows:
        assert torch.equal(dense, dense.triu(-(band_width - 1)))


def test_band_to_dense_round_trip_with_dense_to_band():
    gen = torch.Generator().manual_seed(0)
    a = random_causal(12, gen, torch.float32)
    assert torch.equal(band_to_dense(dense_to_band(a, 12)), a)
    # a narrower band keeps only the diagonals it covers
    assert torch.equal(band_to_dense(dense_to_band(a, 3)), a.triu(-2))


@pytest.mark.parametrize("first_row_pos", [0, 1, 5, 100])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_row_thresholds_matches_brute_force(first_row_pos, alpha):
    gen = torch.Generator().manual_seed(7)
    num_rows, band_width = 9, 4
    band = torch.rand(num_rows, band_width, generator=gen, dtype=torch.float64)
    theta = row_thresholds(band, alpha, first_row_pos)
    assert theta.shape == (num_rows,)
    for i in range(num_rows):
        width = min(i + first_row_pos + 1, band_width)
        assert theta[i].item() == pytest.approx(alpha * band[i].sum().item() / width, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# triangle_scores / span_rank vs brute force
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,min_len,max_len",
    [(1, 1, 1), (1, 1, 3), (3, 1, 3), (3, 2, 5), (5, 1, 5), (8, 3, 4), (17, 1, 17), (17, 4, 9), (17, 10, 25)],
)
def test_triangle_scores_match_brute_force(n, min_len, max_len):
    gen = torch.Generator().manual_seed(1000 + 31 * n + min_len * 7 + max_len)
    a = random_causal(n, gen)
    theta = torch.rand(n, generator=gen, dtype=torch.float64) * 0.3
    s = triangle_scores(a, theta, min_len, max_len)
    assert s.shape == (n, max_len - min_len + 1)
    assert s.dtype == torch.float64
    for x in range(n):
        for col, length in enumerate(range(min_len, max_len + 1)):
            y = x + length - 1
            if y >= n:
                assert s[x, col].item() == -math.inf, (x, length)
            else:
                assert s[x, col].item() == pytest.approx(brute_triangle(a, theta, x, y), abs=1e-10), (x, length)


def test_triangle_scores_float32_input():
    gen = torch.Generator().manual_seed(3)
    a = random_causal(11, gen, torch.float32)
    theta = torch.rand(11, generator=gen) * 0.2
    s = triangle_scores(a, theta, 2, 6)
    a64, t64 = a.double(), theta.double()
    for x in range(11):
        for col, length in enumerate(range(2, 7)):
            y = x + length - 1
            expected = brute_triangle(a64, t64, x, y) if y < 11 else -math.inf
            assert s[x, col].item() == pytest.approx(expected, abs=1e-5)


def test_triangle_score_uniform_block_is_zero_at_uniform_threshold():
    # Row i of a block starting at 0 attends uniformly to keys 0..i: A[i, j] = 1/(i+1) = theta_i -> S = 0 for
    # every prefix [0, y]; with a lower threshold the score is the positive area difference.
    n = 6
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        a[i, : i + 1] = 1.0 / (i + 1)
    theta = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    s = triangle_scores(a, theta, 1, n)
    for length in range(1, n + 1):
        assert s[0, length - 1].item() == pytest.approx(0.0, abs=1e-12)
    s0 = triangle_scores(a, torch.zeros(n, dtype=torch.float64), 1, n)
    for length in range(1, n + 1):
        assert s0[0, length - 1].item() == pytest.approx(float(length), abs=1e-12)  # row sums are 1


@pytest.mark.parametrize(
    "total,num_rows,min_len,max_len",
    [(1, 1, 1, 1), (3, 1, 1, 2), (3, 3, 1, 3), (5, 3, 2, 4), (17, 17, 1, 17), (17, 9, 2, 6), (25, 17, 4, 12)],
)
def test_span_rank_matches_brute_force(total, num_rows, min_len, max_len):
    gen = torch.Generator().manual_seed(2000 + 13 * total + num_rows)
    a = random_causal(total, gen)
    theta = torch.rand(num_rows, generator=gen, dtype=torch.float64) * 0.3
    rank = span_rank(a, theta, num_rows, min_len, max_len)
    assert rank.shape == (num_rows, max_len - min_len + 1)
    for x in range(num_rows):
        for col, length in enumerate(range(min_len, max_len + 1)):
            y = x + length - 1
            if y >= num_rows:
                assert rank[x, col].item() == -math.inf, (x, length)
                continue
            expected = (brute_triangle(a, theta, x, y) - brute_cut(a, x, y)) / length
            assert rank[x, col].item() == pytest.approx(expected, abs=1e-10), (x, length)


def test_span_rank_cut_uses_rows_after_the_segment():
    # Later rows attending into the last span lower its rank by exactly their mass / length.
    gen = torch.Generator().manual_seed(5)
    num_rows = 6
    a = random_causal(num_rows, gen)
    theta = torch.full((num_rows,), 0.05, dtype=torch.float64)
    base = span_rank(a, theta, num_rows, 1, num_rows)
    big = torch.zeros(num_rows + 2, num_rows + 2, dtype=torch.float64)
    big[:num_rows, :num_rows] = a
    big[num_rows, 2:4] = 0.25  # lookahead row attends into keys 2, 3
    big[num_rows + 1, num_rows] = 1.0  # attends only to a lookahead key: no cut
    rank = span_rank(big, theta, num_rows, 1, num_rows)
    # span [2, 6) (length 4) loses 0.5 / 4
    assert rank[2, 3].item() == pytest.approx(base[2, 3].item() - 0.5 / 4, abs=1e-12)
    # span [0, 3) (length 3) contains key 2 only: loses 0.25 / 3
    assert rank[0, 2].item() == pytest.approx(base[0, 2].item() - 0.25 / 3, abs=1e-12)
    # span [4, 6) is not attended by lookahead rows: unchanged
    assert rank[4, 1].item() == pytest.approx(base[4, 1].item(), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# nms_spans / fill_gaps
# ---------------------------------------------------------------------------------------------------------------


def test_nms_spans_greedy_by_rank_without_overlap():
    inf = -math.inf
    # min_len 2: column c is length c + 2
    rank = torch.tensor(
        [
            [0.5, 0.9, inf],  # start 0: best [0, 3) rank 0.9
            [0.1, 0.2, inf],  # start 1: overlaps
            [0.3, 0.95, inf],  # start 2: best [2, 5) rank 0.95 -> accepted first, so [0, 3) is suppressed
            [0.4, inf, inf],  # start 3: overlaps [2, 5)
            [0.8, inf, inf],  # start 4: overlaps [2, 5)
            [inf, inf, inf],  # start 5: nothing
        ],
        dtype=torch.float64,
    )
    assert nms_spans(rank, 2, 0.0) == [(2, 5)]
    # raising the threshold rejects everything
    assert nms_spans(rank, 2, 0.95) == []
    # start 0 alone when start 2 is removed
    rank2 = rank.clone()
    rank2[2] = inf
    assert nms_spans(rank2, 2, 0.0) == [(0, 3), (4, 6)]


def test_nms_spans_output_sorted_and_above_threshold():
    gen = torch.Generator().manual_seed(11)
    for _ in range(20):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        min_len, max_len = 1 + int(torch.randint(0, 3, (1,), generator=gen)), 8
        a = random_causal(n, gen)
        lo, hi = min(min_len, n), min(max_len, n)
        theta = torch.rand(n, generator=gen, dtype=torch.float64) * 0.2
        rank = span_rank(a, theta, n, lo, hi)
        pairs = nms_spans(rank, lo, -0.5)
        assert pairs == sorted(pairs)
        for (s0, e0), (s1, _) in zip(pairs[:-1], pairs[1:]):
            assert e0 <= s1
        for s, e in pairs:
            assert lo <= e - s <= hi and e <= n
            # each accepted span is its start's best length and above the threshold
            assert rank[s, e - s - lo].item() == pytest.approx(rank[s].max().item())
            assert rank[s, e - s - lo].item() > -0.5


def test_fill_gaps_examples():
    assert fill_gaps([], 10, 4) == [(0, 3), (3, 6), (6, 10)]
    assert fill_gaps([], 8, 4) == [(0, 4), (4, 8)]
    assert fill_gaps([], 3, 4) == [(0, 3)]
    assert fill_gaps([(0, 10)], 10, 10) == [(0, 10)]
    assert fill_gaps([(2, 5)], 9, 3) == [(0, 2), (2, 5), (5, 7), (7, 9)]
    assert fill_gaps([(0, 2), (2, 4)], 4, 2) == [(0, 2), (2, 4)]


@pytest.mark.parametrize("seed", range(4))
def test_fill_gaps_random_partitions(seed):
    rng = random.Random(1234 + seed)
    for _ in range(100):
        num_rows = rng.randint(1, 200)
        max_len = rng.randint(1, 40)
        # sorted, non-overlapping spans no longer than max_len
        spans: list[tuple[int, int]] = []
        cursor = 0
        while cursor < num_rows:
            cursor += rng.randint(0, 2 * max_len)
            length = rng.randint(1, max_len)
            if cursor + length > num_rows:
                break
            if rng.random() < 0.6:
                spans.append((cursor, cursor + length))
            cursor += length
        pairs = fill_gaps(spans, num_rows, max_len)
        assert_pairs_partition(pairs, num_rows, max_len)
        # the input spans are kept
        assert set(spans) <= set(pairs)
        # each gap between input spans is cut into the fewest near-equal pieces
        bounds = [0] + [b for span in spans for b in span] + [num_rows]
        for gap_start, gap_end in zip(bounds[0::2], bounds[1::2]):
            pieces = [p for p in pairs if gap_start <= p[0] and p[1] <= gap_end]
            if gap_end == gap_start:
                assert not pieces
                continue
            assert sum(e - s for s, e in pieces) == gap_end - gap_start
            assert len(pieces) == math.ceil((gap_end - gap_start) / max_len), (gap_start, gap_end, pieces)
            lengths = [e - s for s, e in pieces]
            assert max(lengths) - min(lengths) <= 1, pieces


# ---------------------------------------------------------------------------------------------------------------
# segment_triangle on planted block-diagonal maps
# ---------------------------------------------------------------------------------------------------------------


def planted_band(
    seed: int, num_blocks: int, extra_blocks: int = 0, band_width: int = 64, noise: float = 0.05
) -> tuple[torch.Tensor, list[int]]:
    """Band of a causal map where each row attends to its own block's tokens up to itself.

    Block lengths are drawn in [8, 40]. Each row is ``(1 - noise) * uniform-over-own-block-prefix + noise * random
    causal noise``, scaled to a row sum in [0.9, 1]. Returns the band of all rows (``num_blocks + extra_blocks``
    blocks) and the boundaries of the first ``num_blocks`` blocks.
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 41, (num_blocks + extra_blocks,), generator=gen).tolist()
    total = sum(lengths)
    a = torch.zeros(total, total, dtype=torch.float64)
    start = 0
    for length in lengths:
        for i in range(start, start + length):
            a[i, start : i + 1] = 1.0 / (i - start + 1)
        start += length
    noise_map = torch.rand(total, total, generator=gen, dtype=torch.float64).tril()
    noise_map = noise_map / noise_map.sum(dim=1, keepdim=True)
    a = (1.0 - noise) * a + noise * noise_map
    a = a * (0.9 + 0.1 * torch.rand(total, 1, generator=gen, dtype=torch.float64))
    bounds = [0]
    for length in lengths[:num_blocks]:
        bounds.append(bounds[-1] + length)
    return dense_to_band(a, band_width).float(), bounds


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("first_row_pos", [0, 1000])
def test_segment_triangle_recovers_planted_blocks(seed, first_row_pos):
    band, bounds = planted_band(seed, num_blocks=8)
    num_rows = bounds[-1]
    assert band.shape[0] == num_rows
    spans = segment_triangle(band, num_rows, alpha=1.0, min_len=4, max_len=64, min_score=0.0,
                             first_row_pos=first_row_pos)
    assert spans.starts.tolist() == bounds[:-1]
    assert spans.ends.tolist() == bounds[1:]
    assert_partition(spans, num_rows, 64)


@pytest.mark.parametrize("seed", [10, 11, 12, 13, 14])
def test_segment_triangle_recovers_planted_blocks_with_lookahead_rows(seed):
    band, bounds = planted_band(seed, num_blocks=6, extra_blocks=3)
    num_rows = bounds[-1]
    assert band.shape[0] > num_rows  # rows after the segment supply the cut term
    spans = segment_triangle(band, num_rows, alpha=1.0, min_len=4, max_len=64, min_score=0.0)
    assert spans.starts.tolist() == bounds[:-1]
    assert spans.ends.tolist() == bounds[1:]
    assert_partition(spans, num_rows, 64)


def test_segment_triangle_rank_of_planted_blocks():
    # the reported rank of each final span is its span_rank entry (positive for the planted, non-initial blocks)
    band, bounds = planted_band(3, num_blocks=6, extra_blocks=2)
    num_rows = bounds[-1]
    spans = segment_triangle(band, num_rows, alpha=1.0, min_len=4, max_len=64, min_score=0.0)
    dense = band_to_dense(band.float())
    theta = row_thresholds(band[:num_rows].float(), 1.0)
    rank = span_rank(dense, theta, num_rows, 4, 64)
    assert spans.rank.dtype == torch.float32
    for k, (s, e) in enumerate(zip(spans.starts.tolist(), spans.ends.tolist())):
        assert spans.rank[k].item() == pytest.approx(rank[s, e - s - 4].item(), rel=1e-5, abs=1e-6)
    assert (spans.rank[1:] > 0).all()


def test_segment_triangle_rank_zero_for_spans_outside_candidate_lengths():
    # Nothing passes NMS (huge threshold), so [0, 10) is filled with two pieces of 5 < min_len = 6: no candidate
    # of that length exists and the reported rank is 0.
    band = torch.full((10, 10), 0.1)
    spans = segment_triangle(band, 10, alpha=1.0, min_len=6, max_len=6, min_score=1e9)
    assert spans.starts.tolist() == [0, 5] and spans.ends.tolist() == [5, 10]
    assert torch.equal(spans.rank, torch.zeros(2))


# ---------------------------------------------------------------------------------------------------------------
# partition property
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_segment_triangle_always_partitions(seed):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    for _ in range(25):
        num_rows = rng.randint(1, 90)
        total = num_rows + rng.randint(0, 30)
        band_width = rng.randint(1, 70)
        min_len = rng.randint(1, 12)
        max_len = rng.randint(min_len, 70)
        alpha = rng.choice([0.0, 0.5, 1.0, 2.0, 5.0])
        min_score = rng.choice([-1e9, -1.0, 0.0, 0.1, 1e9])
        band = torch.rand(total, band_width, generator=gen)
        if rng.random() < 0.5:
            band = band / band.sum(dim=1, keepdim=True)  # probability-like rows
        spans = segment_triangle(band, num_rows, alpha=alpha, min_len=min_len, max_len=max_len,
                                 min_score=min_score, first_row_pos=rng.choice([0, 3, 500]))
        assert_partition(spans, num_rows, max_len)
        assert torch.isfinite(spans.rank).all()


def test_segment_triangle_accepts_half_precision_band():
    gen = torch.Generator().manual_seed(9)
    band = torch.rand(40, 16, generator=gen).to(torch.bfloat16)
    spans = segment_triangle(band, 33, alpha=1.0, min_len=2, max_len=16, min_score=-1.0)
    assert_partition(spans, 33, 16)


@pytest.mark.parametrize("num_rows", [0, -1, 11])
def test_segment_triangle_bad_num_rows(num_rows):
    band = torch.rand(10, 4)
    with pytest.raises(ValueError, match=str(num_rows)):
        segment_triangle(band, num_rows, alpha=1.0, min_len=2, max_len=4, min_score=0.0)


@pytest.mark.parametrize("num_rows,block_size", [(1, 1), (1, 128), (3, 2), (17, 4), (128, 128), (129, 128), (1000, 7)])
def test_segment_fixed(num_rows, block_size):
    spans = segment_fixed(num_rows, block_size)
    assert_partition(spans, num_rows, block_size)
    assert len(spans) == math.ceil(num_rows / block_size)
    # all full blocks except possibly the last
    assert (spans.lengths[:-1] == block_size).all()
    assert spans.lengths[-1].item() == num_rows - block_size * (len(spans) - 1)
    assert torch.equal(spans.rank, torch.zeros(len(spans)))


def test_segment_fixed_random_partitions():
    rng = random.Random(7)
    for _ in range(200):
        num_rows, block_size = rng.randint(1, 500), rng.randint(1, 64)
        assert_partition(segment_fixed(num_rows, block_size), num_rows, block_size)


# ---------------------------------------------------------------------------------------------------------------
# span_rank_band (the engine's path) vs span_rank on the dense map
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "total,width,num_rows,min_len,max_len",
    [(1, 1, 1, 1, 1), (9, 4, 9, 1, 4), (30, 8, 25, 2, 8), (40, 32, 40, 8, 32), (70, 16, 60, 4, 16),
     (70, 8, 60, 3, 20), (300, 64, 237, 8, 64)],
)
def test_span_rank_band_equals_the_dense_reference(total, width, num_rows, min_len, max_len):
    gen = torch.Generator().manual_seed(total * 7 + width)
    band = torch.rand(total, width, generator=gen) ** 4  # peaky rows, like attention
    band = band / band.sum(1, keepdim=True)
    theta = row_thresholds(band[:num_rows], 1.5, 0)
    lo, hi = min(min_len, num_rows), min(max_len, num_rows)
    expected = span_rank(band_to_dense(band), theta, num_rows, lo, hi)
    got = span_rank_band(band, theta, num_rows, lo, hi)
    assert got.shape == expected.shape and got.dtype == torch.float64
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], expected[finite], rtol=0, atol=1e-12)
    assert nms_spans(got, lo, 0.0) == nms_spans(expected, lo, 0.0)


def test_segment_triangle_cuts_where_the_dense_reference_cuts():
    gen = torch.Generator().manual_seed(11)
    num_rows, width = 200, 32
    band = torch.rand(num_rows + width - 1, width, generator=gen) ** 6
    band = band / band.sum(1, keepdim=True)
    spans = segment_triangle(band, num_rows, alpha=1.0, min_len=4, max_len=width, min_score=0.0)
    rank = span_rank(band_to_dense(band), row_thresholds(band[:num_rows], 1.0, 0), num_rows, 4, width)
    expected = fill_gaps(nms_spans(rank, 4, 0.0), num_rows, width)
    assert list(zip(spans.starts.tolist(), spans.ends.tolist())) == expected
