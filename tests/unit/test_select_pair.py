"""A layer's two selections under consensus made together (``retrieval.select_spans_pair``: one ranking tensor of
``2 * rows`` rows, one sort, one fill) equal the two ``select_spans`` calls they replace, bit for bit: every scope,
votes, persistence, pinned spans, tied keys, spans without vectors, no prior. On the CPU the torch path runs (scores
that are not contiguous float32, or float64); on a GPU also the Triton ranking and fill. The engine's logits do not
change with the pairing switched off."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from ltri_rag import retrieval
from ltri_rag.retrieval import select_spans, select_spans_pair
from tests.unit.tiny_models import greedy_logits, tiny_model
from tests.unit.tiny_models import random_ids as _ids

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int, num_heads: int, num_spans: int, ties: bool, holes: bool, layout: str):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_heads, num_spans, generator=gen)
    if ties:  # few distinct values: the stable order of tied keys decides
        scores = (scores * 2).round() / 2
    if holes:  # spans without vectors score -inf
        scores[:, torch.rand(num_spans, generator=gen) < 0.1] = float("-inf")
    lengths = torch.randint(1, 9, (num_spans,), generator=gen)
    prior = (torch.randint(0, 5, (num_spans,), generator=gen).float() / 4)
    recency = torch.rand(num_spans, generator=gen) * (torch.rand(num_spans, generator=gen) < 0.3)
    pinned = torch.rand(num_spans, generator=gen) < 0.05
    if layout == "strided":  # float32, not contiguous: the torch path on a CPU
        scores = torch.cat([scores, scores], dim=1)[:, ::2]
    elif layout == "float64":
        scores = scores.double()
    device = DEVICE if layout == "device" else "cpu"
    return scores.to(device), lengths, prior.to(device), recency.to(device), pinned


@pytest.mark.parametrize("layout", ["strided", "float64", "contiguous"] + (["device"] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("seed,num_spans,ties,holes", [(0, 1, False, False), (1, 37, True, False),
                                                        (2, 300, False, True), (3, 1500, True, True)])
@pytest.mark.parametrize("options", [dict(), dict(scope="per_kv_head"), dict(voting=True),
                                     dict(persistence=True), dict(pinned=True), dict(no_prior=True)])
def test_pair_equals_two_selections(layout: str, seed: int, num_spans: int, ties: bool, holes: bool,
                                    options: dict, monkeypatch) -> None:
    scores, lengths, prior, recency, pinned = _case(seed, 8, num_spans, ties, holes, layout)
    kwargs = dict(num_kv_heads=2, scope=options.get("scope", "shared"), voting=options.get("voting", False),
                  recency=recency if options.get("persistence") else None,
                  bonus=0.7 if options.get("persistence") else 0.0,
                  pinned=pinned.to(scores.device) if options.get("pinned") else None)
    if scores.is_cuda:
        kwargs["device_lengths"] = lengths.to(scores.device)
    weight = 0.0 if options.get("no_prior") else 0.5
    budget = int(lengths.sum()) // 3 + 1
    fills = []
    fill = retrieval._fill_budget
    monkeypatch.setattr(retrieval, "_fill_budget", lambda keys, *a, **k: fills.append(keys.shape[0]) or
                        fill(keys, *a, **k))
    own, mixed = select_spans_pair(scores, lengths, budget, prior=prior, prior_weight=weight, **kwargs)
    paired_fills = list(fills)
    want_own = select_spans(scores, lengths, budget, **kwargs)
    want_mixed = select_spans(scores, lengths, budget, prior=prior, prior_weight=weight, **kwargs)
    assert torch.equal(own.cpu(), want_own.cpu())
    assert torch.equal(mixed.cpu(), want_mixed.cpu())
    rows = 1 if kwargs["scope"] == "shared" else 2
    assert own.shape == mixed.shape == (rows, num_spans)
    assert own.dtype == mixed.dtype == torch.bool
    if weight > 0 and layout != "contiguous":  # the torch path ranks both together: one fill of 2 * rows rows
        assert paired_fills == [2 * rows]
    if weight > 0 and layout != "contiguous" and seed == 3:
        assert not torch.equal(own, mixed)  # the prior moved something: the test compares two different rows


def test_pair_switch_off_and_empty_memory(monkeypatch) -> None:
    scores, lengths, prior, _, _ = _case(5, 4, 60, True, False, "strided")
    monkeypatch.setattr(retrieval, "PAIRED_SORT", False)
    own, mixed = select_spans_pair(scores, lengths, 40, prior=prior, prior_weight=0.5, num_kv_heads=2)
    monkeypatch.setattr(retrieval, "PAIRED_SORT", True)
    own2, mixed2 = select_spans_pair(scores, lengths, 40, prior=prior, prior_weight=0.5, num_kv_heads=2)
    assert torch.equal(own, own2) and torch.equal(mixed, mixed2)
    empty = torch.zeros(4, 0).t().contiguous().t()  # [4, 0], not a contiguous float32 host tensor path case
    own, mixed = select_spans_pair(empty.double(), torch.zeros(0, dtype=torch.int64), 40,
                                   prior=torch.zeros(0), prior_weight=0.5, num_kv_heads=2, scope="per_kv_head")
    assert own.shape == mixed.shape == (2, 0)


def test_engine_logits_do_not_change_with_the_pairing(monkeypatch) -> None:
    """Consensus on (the ltri preset), selection on the compute device through the torch path (on a CPU the host
    path would take the scores: it is switched off here): prompt passes and decode steps give the same logits with
    the two selections ranked together or apart."""
    model = tiny_model("llama")
    ids = _ids(1, 300)
    cfg = LtriConfig(num_sink_tokens=4, local_window=32, chunk_size=16, budget=24, page_size=8, evict_stride=8,
                     span_min_len=2, span_max_len=12, selection_on_device=True)
    assert cfg.consensus_weight > 0
    runs, fills = [], []
    monkeypatch.setattr(retrieval, "_host_path", lambda *args: False)
    fill = retrieval._fill_budget
    monkeypatch.setattr(retrieval, "_fill_budget", lambda keys, *a, **k: fills.append(keys.shape[0]) or
                        fill(keys, *a, **k))
    for paired in (True, False):
        monkeypatch.setattr(retrieval, "PAIRED_SORT", paired)
        runs.append(greedy_logits(LtriSession(model, cfg), ids, 4))
        if paired:
            assert 2 in fills, "no pair was ranked together"
    for step, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"step {step}"


@pytest.mark.parametrize("rows,num_spans", [(1, 5000), (2, 100), (2, 4096), (3, 5000)])
def test_row_sums_equal_the_scan_along_rows(rows: int, num_spans: int, monkeypatch) -> None:
    """Several long rows scanned flat (``retrieval._row_sums``): the integers of ``cumsum`` along each row."""
    monkeypatch.setattr(retrieval, "_FLAT_FROM", 64)  # the flat path at test sizes too
    ranked = torch.randint(1, 2**40, (rows, num_spans), generator=torch.Generator().manual_seed(rows))
    assert torch.equal(retrieval._row_sums(ranked), torch.cumsum(ranked, dim=1))
    assert torch.equal(retrieval._row_sums(ranked.int()), torch.cumsum(ranked.int(), dim=1, dtype=torch.int64))
