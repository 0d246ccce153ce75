"""Unit tests for ``ltri_rag.retrieval`` and ``ltri_rag.kernels.scoring`` (span scoring and selection)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from ltri_rag.kernels.scoring import span_probabilities, span_scores
from ltri_rag.retrieval import query_summary, select_spans, update_recency

# ---------------------------------------------------------------------------------------------------------------
# span_scores
# ---------------------------------------------------------------------------------------------------------------


def brute_span_scores(query, vectors, owner, num_spans):
    num_heads = query.shape[0]
    group = num_heads // vectors.shape[1]
    out = torch.full((num_heads, num_spans), -math.inf, dtype=torch.float64)
    for h in range(num_heads):
        for n in range(vectors.shape[0]):
            dot = float(query[h].double() @ vectors[n, h // group].double())
            s = int(owner[n])
            out[h, s] = max(out[h, s].item(), dot)
    return out


@pytest.mark.parametrize("num_heads,num_kv_heads", [(1, 1), (2, 1), (4, 2), (7, 1), (14, 2), (8, 8)])
def test_span_scores_match_brute_force(num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    head_dim, num_spans, num_vectors = 16, 9, 23
    query = torch.randn(num_heads, head_dim, generator=gen)
    vectors = torch.randn(num_vectors, num_kv_heads, head_dim, generator=gen)
    owner = torch.randint(0, num_spans - 1, (num_vectors,), generator=gen)  # span num_spans-1 has no vectors
    scores = span_scores(query, vectors, owner, num_spans)
    assert scores.shape == (num_heads, num_spans)
    assert scores.dtype == torch.float32
    expected = brute_span_scores(query, vectors, owner, num_spans)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(scores[:, num_spans - 1]).all()


@pytest.mark.parametrize("num_heads,num_kv_heads,query_block", [(4, 2, 3), (14, 2, 128), (7, 1, 2)])
def test_span_probabilities_match_brute_force(num_heads, num_kv_heads, query_block):
    gen = torch.Generator().manual_seed(num_heads + query_block)
    head_dim, num_spans, num_vectors, q_len, scaling = 16, 9, 23, 7, 0.3
    queries = torch.randn(num_heads, q_len, head_dim, generator=gen)
    vectors = torch.randn(num_vectors, num_kv_heads, head_dim, generator=gen)
    owner = torch.randint(0, num_spans - 1, (num_vectors,), generator=gen)  # unsorted; the last span is empty
    got = span_probabilities(queries, vectors, owner, num_spans, scaling, query_block=query_block)
    expected = torch.zeros(num_heads, num_spans, dtype=torch.float64)
    for c in range(q_len):
        scores = brute_span_scores(queries[:, c], vectors, owner, num_spans) * scaling
        expected += torch.softmax(scores, dim=-1) / q_len
    assert got.shape == (num_heads, num_spans) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert (got[:, num_spans - 1] == 0).all()
    torch.testing.assert_close(got.sum(dim=1), torch.ones(num_heads))
    assert span_probabilities(queries, vectors[:0], owner[:0], 0, scaling).shape == (num_heads, 0)


def test_span_scores_half_precision_inputs_and_no_vectors():
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(4, 8, generator=gen).to(torch.bfloat16)
    vectors = torch.randn(5, 2, 8, generator=gen).to(torch.bfloat16)
    owner = torch.tensor([0, 0, 2, 2, 2])
    scores = span_scores(query, vectors, owner, 3)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), brute_span_scores(query.float(), vectors.float(), owner, 3),
                               rtol=1e-5, atol=1e-5)
    empty = span_scores(query, vectors[:0], owner[:0], 4)
    assert empty.shape == (4, 4) and torch.isneginf(empty).all()


def test_span_table_keeps_its_layout_as_spans_arrive():
    """The layout a span table keeps (its only copy of the vectors: extended at each append, widened when a wider
    span comes) is the one built from scratch from every vector appended, its compact vectors are those vectors, and
    scoring with it gives the same numbers as without."""
    from ltri_rag.kernels.scoring import span_layout

    from ltri_rag.span_memory import SpanTable

    gen = torch.Generator().manual_seed(3)
    table = SpanTable(2, 8, torch.bfloat16, torch.device("cpu"))
    queries = torch.randn(4, 5, 8, generator=gen)
    slot = 0
    appended, owners = [], []
    # vectors per new span, per append: equal widths extend the layout, a wider span widens it
    for counts in ([2, 1], [2, 2, 0], [4], [1, 3], [0]):
        n = len(counts)
        lengths = torch.randint(1, 6, (n,), generator=gen)
        starts = slot + torch.cumsum(lengths, 0) - lengths
        slot += int(lengths.sum())
        owner = torch.repeat_interleave(torch.arange(n), torch.tensor(counts))
        vectors = torch.randn(owner.numel(), 2, 8, generator=gen)
        owners.append(owner + len(table))
        table.append(starts, starts + lengths, vectors, owner)
        appended.append(vectors.to(torch.bfloat16))
        assert table.num_tokens == int(table.lengths.sum()) and table.num_vectors == sum(map(len, owners))
        every, every_owner = torch.cat(appended), torch.cat(owners)
        assert torch.equal(table.vectors, every) and torch.equal(table.owner, every_owner)
        kept = table.layout()
        fresh = span_layout(every, every_owner, len(table), dtype=torch.bfloat16)
        assert kept[2] == fresh[2]
        assert torch.equal(kept[0], fresh[0]) and torch.equal(kept[1], fresh[1])
        scale = 8 ** -0.5
        torch.testing.assert_close(
            span_probabilities(queries, None, None, len(table), scale, layout=kept),
            span_probabilities(queries, every, every_owner, len(table), scale), rtol=0, atol=0)
        torch.testing.assert_close(table.scores(queries[:, 0]),
                                   span_scores(queries[:, 0], every, every_owner, len(table)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layout"):
        span_probabilities(queries, table.vectors, table.owner, len(table) - 1, 1.0, layout=table.layout())


def test_span_scores_shape_errors():
    q = torch.randn(4, 8)
    v = torch.randn(5, 2, 8)
    owner = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError):
        span_scores(q[None], v, owner, 1)  # query not 2-D
    with pytest.raises(ValueError):
        span_scores(q, v[0], owner, 1)  # vectors not 3-D
    with pytest.raises(ValueError):
        span_scores(q, v, owner[:, None], 1)  # owner not 1-D
    with pytest.raises(ValueError, match="4"):
        span_scores(q, v, owner[:4], 1)  # num_vectors disagree
    with pytest.raises(ValueError):
        span_scores(torch.randn(3, 8), v, owner, 1)  # heads not a multiple of kv heads
    with pytest.raises(ValueError):
        span_scores(torch.randn(4, 6), v, owner, 1)  # head_dim mismatch


# ---------------------------------------------------------------------------------------------------------------
# query_summary
# ---------------------------------------------------------------------------------------------------------------


def test_query_summary_is_float32_mean_over_chunk():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 8, generator=gen).to(torch.bfloat16)
    s = query_summary(q)
    assert s.shape == (3, 8) and s.dtype == torch.float32
    torch.testing.assert_close(s, q.float().sum(dim=1) / 5)
    q1 = torch.randn(2, 1, 4, generator=gen)
    torch.testing.assert_close(query_summary(q1), q1[:, 0])


# ---------------------------------------------------------------------------------------------------------------
# select_spans: a planted key is retrieved
# ---------------------------------------------------------------------------------------------------------------

NUM_SPANS = 50
HEAD_DIM = 32


def build_index(gen: torch.Generator, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random index vectors for NUM_SPANS spans (1-4 each) and random span lengths in [8, 40]."""
    counts = torch.randint(1, 5, (NUM_SPANS,), generator=gen)
    owner = torch.repeat_interleave(torch.arange(NUM_SPANS), counts)
    vectors = torch.randn(owner.numel(), num_kv_heads, HEAD_DIM, generator=gen)
    lengths = torch.randint(8, 41, (NUM_SPANS,), generator=gen)
    return vectors, owner, lengths


def build_query(gen: torch.Generator, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Chunk queries ``[num_heads, q_len, head_dim]``: each KV group shares a direction, plus per-token noise."""
    group = num_heads // num_kv_heads
    directions = torch.randn(num_kv_heads, HEAD_DIM, generator=gen)
    base = directions.repeat_interleave(group, dim=0)  # [H, D]
    return base[:, None, :] + 0.5 * torch.randn(num_heads, 7, HEAD_DIM, generator=gen)


def plant(vectors, owner, summary, span, num_kv_heads, kv_heads=None, gen=None):
    """Append to ``span`` a vector along each KV group's mean query-summary direction."""
    group = summary.shape[0] // num_kv_heads
    direction = summary.view(num_kv_heads, group, -1).mean(dim=1)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    planted = 3.0 * math.sqrt(HEAD_DIM) * direction  # [Hkv, D]
    if kv_heads is not None:  # plant only for these KV heads (others get a random vector)
        keep = torch.zeros(num_kv_heads, 1, dtype=torch.bool)
        keep[list(kv_heads)] = True
        planted = torch.where(keep, planted, torch.randn(num_kv_heads, HEAD_DIM, generator=gen))
    return torch.cat([vectors, planted[None]]), torch.cat([owner, torch.tensor([span])])


@pytest.mark.parametrize("scope,voting", list(itertools.product(["shared", "per_kv_head"], [False, True])))
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 1), (8, 2), (14, 2)])
def test_planted_key_is_retrieved(scope, voting, num_heads, num_kv_heads):
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        vectors, owner, lengths = build_index(gen, num_kv_heads)
        summary = query_summary(build_query(gen, num_heads, num_kv_heads))
        target = int(torch.randint(0, NUM_SPANS, (1,), generator=gen))
        vectors, owner = plant(vectors, owner, summary, target, num_kv_heads)
        scores = span_scores(summary, vectors, owner, NUM_SPANS)
        # the planted span is every head's best match
        assert (scores.argmax(dim=1) == target).all()
        rows = 1 if scope == "shared" else num_kv_heads
        for budget in (int(lengths[target]), int(lengths[target]) + 30, 100):
            sel = select_spans(scores, lengths, budget, num_kv_heads=num_kv_heads, scope=scope, voting=voting)
            assert sel.shape == (rows, NUM_SPANS) and sel.dtype == torch.bool
            assert sel[:, target].all(), (seed, budget)
            assert ((sel.long() * lengths).sum(dim=1) <= budget).all()
        # with a budget of exactly the planted span, nothing else is loaded
        sel = select_spans(scores, lengths, int(lengths[target]), num_kv_heads=num_kv_heads, scope=scope,
                           voting=voting)
        assert sel.sum().item() == rows


@pytest.mark.parametrize("voting", [False, True])
def test_per_kv_head_scope_retrieves_each_heads_own_key(voting):
    num_heads, num_kv_heads = 8, 2
    for seed in range(4):
        gen = torch.Generator().manual_seed(100 + seed)
        vectors, owner, lengths = build_index(gen, num_kv_heads)
        summary = query_summary(build_query(gen, num_heads, num_kv_heads))
        t0, t1 = 3, 41
        vectors, owner = plant(vectors, owner, summary, t0, num_kv_heads, kv_heads=[0], gen=gen)
        vectors, owner = plant(vectors, owner, summary, t1, num_kv_heads, kv_heads=[1], gen=gen)
        scores = span_scores(summary, vectors, owner, NUM_SPANS)
        assert (scores[:4].argmax(dim=1) == t0).all() and (scores[4:].argmax(dim=1) == t1).all()
        budget = int(max(lengths[t0], lengths[t1]))
        sel = select_spans(scores, lengths, budget, num_kv_heads=num_kv_heads, scope="per_kv_head", voting=voting)
        assert sel.shape == (2, NUM_SPANS)
        assert sel[0, t0] and sel[1, t1]
        assert ((sel.long() * lengths).sum(dim=1) <= budget).all()
        # shared scope: one selection for all heads, containing at least one of the two planted spans
        shared = select_spans(scores, lengths, int(lengths[t0] + lengths[t1]), num_kv_heads=num_kv_heads,
                              scope="shared", voting=voting)
        assert shared.shape == (1, NUM_SPANS)
        assert shared[0, t0] or shared[0, t1]


def test_select_spans_budget_respected_and_greedy_fill_of_ranking():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        num_kv_heads = rng.choice([1, 2, 4])
        num_heads = num_kv_heads * rng.choice([1, 2, 3])
        num_spans = rng.randint(1, 60)
        scores = torch.randn(num_heads, num_spans, generator=gen)
        lengths = torch.randint(1, 50, (num_spans,), generator=gen)
        budget = rng.randint(0, int(lengths.sum()) + 20)
        scope = rng.choice(["shared", "per_kv_head"])
        voting = rng.random() < 0.5
        recency = torch.rand(num_spans, generator=gen) if rng.random() < 0.5 else None
        bonus = rng.choice([0.0, 0.5, 2.0])
        sel = select_spans(scores, lengths, budget, num_kv_heads=num_kv_heads, scope=scope, voting=voting,
                           recency=recency, bonus=bonus)
        rows = 1 if scope == "shared" else num_kv_heads
        assert sel.shape == (rows, num_spans)
        assert ((sel.long() * lengths).sum(dim=1) <= budget).all()
        if not voting and (recency is None or bonus == 0.0):
            # selection = walk the mean-score ranking, taking every span that still fits the budget
            mean = scores.view(rows, num_heads // rows, num_spans).mean(dim=1)
            for r in range(rows):
                order = torch.argsort(mean[r], descending=True, stable=True)
                expected = torch.zeros(num_spans, dtype=torch.bool)
                left = budget
                for idx in order.tolist():
                    if int(lengths[idx]) <= left:
                        expected[idx] = True
                        left -= int(lengths[idx])
                assert torch.equal(sel[r], expected)


@pytest.mark.parametrize("scope", ["shared", "per_kv_head"])
@pytest.mark.parametrize("voting", [False, True])
def test_select_spans_budget_covering_everything_selects_all(scope, voting):
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(8, 30, generator=gen)
    scores[:, 4] = -math.inf  # a span without index vectors is still selected if the budget covers everything
    lengths = torch.randint(1, 50, (30,), generator=gen)
    total = int(lengths.sum())
    for budget in (total, total + 1000):
        sel = select_spans(scores, lengths, budget, num_kv_heads=2, scope=scope, voting=voting)
        assert sel.all()
    assert not select_spans(scores, lengths, 0, num_kv_heads=2, scope=scope, voting=voting).any()


def test_select_spans_zero_spans_and_bad_scope():
    out = select_spans(torch.zeros(4, 0), torch.zeros(0, dtype=torch.int64), 100, num_kv_heads=2,
                       scope="per_kv_head")
    assert out.shape == (2, 0) and out.dtype == torch.bool
    assert select_spans(torch.zeros(4, 0), torch.zeros(0, dtype=torch.int64), 100, num_kv_heads=2).shape == (1, 0)
    with pytest.raises(ValueError, match="per_head"):
        select_spans(torch.zeros(4, 3), torch.ones(3, dtype=torch.int64), 10, num_kv_heads=2, scope="per_head")


@pytest.mark.parametrize("scope,voting", list(itertools.product(["shared", "per_kv_head"], [False, True])))
def test_select_spans_tolerates_span_without_vectors(scope, voting):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 10, generator=gen)
    scores[:, 3] = 10.0  # clearly the best span for every head
    scores[:, 7] = -math.inf  # span_scores' value for a span without index vectors
    lengths = torch.full((10,), 10)
    sel = select_spans(scores, lengths, 10, num_kv_heads=2, scope=scope, voting=voting)
    assert sel[:, 3].all() and sel.sum().item() == sel.shape[0]


def test_select_spans_voting_prefers_consensus_over_one_outlier_head():
    # Head 0 loves span 0 (huge score), the other three heads all rank span 1 first. Mean score favours span 0;
    # with voting span 1 (three votes) beats span 0 (one vote).
    scores = torch.zeros(4, 6)
    scores[0, 0] = 100.0
    scores[1:, 1] = 1.0
    scores[1:, 0] = -1.0
    lengths = torch.full((6,), 10)
    no_vote = select_spans(scores, lengths, 10, num_kv_heads=1, voting=False)
    vote = select_spans(scores, lengths, 10, num_kv_heads=1, voting=True)
    assert no_vote[0].nonzero().flatten().tolist() == [0]
    assert vote[0].nonzero().flatten().tolist() == [1]


def test_select_spans_recency_bonus_keeps_recent_span():
    scores = torch.zeros(2, 10)
    scores[:, 0] = 1.0
    scores[:, 1] = 0.95
    lengths = torch.full((10,), 10)
    recency = torch.zeros(10)
    recency[1] = 1.0
    plain = select_spans(scores, lengths, 10, num_kv_heads=1)
    assert plain[0].nonzero().flatten().tolist() == [0]
    bonus = select_spans(scores, lengths, 10, num_kv_heads=1, recency=recency, bonus=0.5)
    assert bonus[0].nonzero().flatten().tolist() == [1]
    # bonus 0 ignores the recency state
    zero = select_spans(scores, lengths, 10, num_kv_heads=1, recency=recency, bonus=0.0)
    assert zero[0].nonzero().flatten().tolist() == [0]


def test_update_recency():
    recency = torch.tensor([0.0, 1.0, 0.5, 0.25])
    selected = torch.tensor([[True, False, False, False], [False, False, True, False]])
    out = update_recency(recency, selected, 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, 1.25, 0.125]))
    # repeated selection converges to 1 / (1 - decay); unselected decays geometrically
    state = torch.zeros(2)
    sel = torch.tensor([[True, False]])
    state = update_recency(state, sel, 0.5)
    state[1] = 1.0
    for _ in range(40):
        state = update_recency(state, sel, 0.5)
    torch.testing.assert_close(state, torch.tensor([2.0, 0.5**40]))
    assert torch.equal(update_recency(recency, selected, 0.0), selected.any(dim=0).float())


@pytest.mark.parametrize("voting", [False, True])
def test_select_spans_pinned_spans_come_first_within_the_budget(voting):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 12, generator=gen)
    scores[:, 5] = -10.0  # the worst span, pinned below
    scores[:, 9] = -9.0
    lengths = torch.full((12,), 10)
    pinned = torch.zeros(12, dtype=torch.bool)
    pinned[[5, 9]] = True
    free = select_spans(scores, lengths, 40, num_kv_heads=2, voting=voting)
    kept = select_spans(scores, lengths, 40, num_kv_heads=2, voting=voting, pinned=pinned)
    assert not free[0, 5] and not free[0, 9]
    assert kept[0, 5] and kept[0, 9] and int(kept.sum()) == 4  # still 4 spans of 10 tokens
    # the other two are the unpinned spans the free selection ranked first
    ranked = [int(i) for i in torch.nonzero(free[0]).flatten()]
    assert set(torch.nonzero(kept[0]).flatten().tolist()) - {5, 9} <= set(ranked)
    tight = select_spans(scores, lengths, 10, num_kv_heads=2, voting=voting, pinned=pinned)
    assert int(tight.sum()) == 1 and bool(tight[0, 5] or tight[0, 9])  # the budget still binds


def _host_fill(keys, lengths, budget):
    """The budget fill walked on the host: the prefix of ranked spans that fits, then up to 64 more spans that
    still fit, stopping once nothing could."""
    order = torch.argsort(keys, dim=1, descending=True, stable=True)
    selected = torch.zeros(keys.shape, dtype=torch.bool)
    for row in range(keys.shape[0]):
        ranked = lengths[order[row]]
        n = int((torch.cumsum(ranked, 0) <= budget).sum())
        selected[row, order[row, :n]] = True
        left = budget - int(ranked[:n].sum())
        for pos in range(n, min(ranked.numel(), n + 64)):
            if left < int(lengths.min()):
                break
            if int(ranked[pos]) <= left:
                selected[row, order[row, pos]] = True
                left -= int(ranked[pos])
    return selected


@pytest.mark.parametrize("path", ["host", "device"])
def test_fill_budget_matches_the_host_walk(path):
    """Both fills (NumPy over candidate spans; the device scan without a read-back, run here on CPU tensors) select
    exactly what the plain walk does, with ties in the keys, spans longer than the budget, a prefix covering
    everything, and more spans than the bounded tail."""
    from ltri_rag.retrieval import _fill_budget_device, _fill_budget_host

    fill = _fill_budget_host if path == "host" else _fill_budget_device

    gen = torch.Generator().manual_seed(5)
    for trial in range(200):
        rows = 1 + trial % 3
        num_spans = int(torch.randint(1, 300, (1,), generator=gen))
        lengths = torch.randint(1, 40, (num_spans,), generator=gen)
        keys = torch.randint(0, 8, (rows, num_spans), generator=gen).float()  # many ties
        budget = int(torch.randint(0, 3 * int(lengths.sum()) // 2 + 1, (1,), generator=gen))
        got = fill(keys, lengths, budget)
        assert torch.equal(got, _host_fill(keys, lengths, budget)), (trial, num_spans, budget)
    # many spans, a budget far smaller than their total: the host fill ranks only the candidates that can be
    # reached (partition), which must not change the choice, ties at the cut included
    for trial in range(60):
        num_spans = int(torch.randint(500, 3000, (1,), generator=gen))
        lengths = torch.randint(8, 65, (num_spans,), generator=gen)
        keys = torch.randint(0, 20 if trial % 2 else 10_000, (2, num_spans), generator=gen).float()
        budget = int(torch.randint(0, 2048, (1,), generator=gen))
        assert torch.equal(fill(keys, lengths, budget), _host_fill(keys, lengths, budget)), (trial, budget)


def test_slot_matrix_matches_per_row_walk():
    """The slot matrix (vectorised over rows) lists each row's selected spans' slots in text order, -1 padded;
    one shared row serves every KV head."""
    from ltri_rag.span_memory import SpanTable

    gen = torch.Generator().manual_seed(11)
    for trial in range(40):
        table = SpanTable(4, 8, torch.float32, torch.device("cpu"))
        num_spans = int(torch.randint(1, 30, (1,), generator=gen))
        lengths = torch.randint(1, 9, (num_spans,), generator=gen)
        gaps = torch.randint(0, 3, (num_spans,), generator=gen)  # imported documents may leave gaps in slots
        starts = torch.cumsum(lengths + gaps, 0) - lengths
        owner = torch.arange(num_spans)
        table.append(starts, starts + lengths, torch.randn(num_spans, 4, 8, generator=gen), owner)
        rows = 1 if trial % 2 else 4
        selected = torch.rand(rows, num_spans, generator=gen) < 0.4
        got = table.slot_matrix(selected, 4)
        expected = [torch.cat([torch.arange(int(starts[i]), int(starts[i] + lengths[i]))
                               for i in torch.nonzero(row).flatten().tolist()] or [torch.zeros(0, dtype=torch.int64)])
                    for row in selected]
        width = max(e.numel() for e in expected)
        assert got.shape == (4, width)
        for head in range(4):
            e = expected[0 if rows == 1 else head]
            assert torch.equal(got[head, : e.numel()], e)
            assert (got[head, e.numel():] == -1).all()
    with pytest.raises(ValueError, match="rows"):
        table.slot_matrix(torch.zeros(3, num_spans, dtype=torch.bool), 4)


def test_span_table_groups_vectors_given_out_of_order_and_names_bad_owners():
    """Vectors whose owners come unsorted are grouped by span (each span's in the order given); an owner outside
    the new spans is refused, naming the range; scoring without vectors needs a layout."""
    from ltri_rag.span_memory import SpanTable

    gen = torch.Generator().manual_seed(4)
    table = SpanTable(1, 4, torch.float32, torch.device("cpu"))
    vectors = torch.randn(4, 1, 4, generator=gen)
    table.append(torch.tensor([0, 3]), torch.tensor([3, 5]), vectors, torch.tensor([1, 0, 1, 0]))
    assert torch.equal(table.owner, torch.tensor([0, 0, 1, 1]))
    assert torch.equal(table.vectors, vectors[[1, 3, 0, 2]])
    assert torch.equal(table.vectors_from(1), vectors[[0, 2]])
    assert torch.equal(table.owner_from(1), torch.tensor([0, 0]))
    assert table.vectors_from(2).shape == (0, 1, 4) and table.owner_from(2).numel() == 0
    assert table.num_tokens == 5
    with pytest.raises(ValueError, match=r"owner must lie in \[0, 1\).*\[0, 1\]"):
        table.append(torch.tensor([5]), torch.tensor([7]), torch.randn(2, 1, 4), torch.tensor([0, 1]))
    assert len(table) == 2 and table.num_vectors == 4  # nothing appended
    with pytest.raises(ValueError, match="without a layout"):
        span_probabilities(torch.randn(2, 1, 4), None, None, 2, 1.0)
