"""The host (NumPy) path of ``select_spans`` selects exactly what the torch path does.

``select_spans`` takes the host path for contiguous float32 CPU scores; ``_select_spans_torch`` is the torch path
(the reference, also what CUDA scores take). Both must give the same bool selection for every option, ties and
spans without vectors (-inf scores) included; the host ranking keys are even the torch keys bit for bit.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ltri_rag import retrieval
from ltri_rag.retrieval import (
    _fill_budget_device,
    _fill_rows,
    _rank_keys,
    _rank_keys_host,
    _select_spans_host,
    _select_spans_torch,
    select_spans,
)

OPTIONS = list(itertools.product(("shared", "per_kv_head"), (False, True), (False, True), (False, True), (False, True)))


def _scores(kind: str, num_heads: int, num_spans: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":  # distinct scores; some spans without vectors, a few stray non-finite entries
        scores = torch.randn(num_heads, num_spans, generator=gen)
        scores[:, torch.rand(num_spans, generator=gen) < 0.1] = float("-inf")
        scores[torch.rand(num_heads, num_spans, generator=gen) < 0.002] = float("-inf")
    elif kind == "ties":  # few distinct values: ties in the mean scores, the keys and at the vote's top-k cut
        scores = torch.randint(0, 3, (num_heads, num_spans), generator=gen).float() / 4
        scores[:, torch.rand(num_spans, generator=gen) < 0.1] = float("-inf")
    elif kind == "probabilities":  # softmax scoring: many exact zeros (spans without vectors, underflow)
        scores = torch.softmax(torch.randn(num_heads, num_spans, generator=gen) * 30, dim=-1)
    else:  # no span has vectors
        scores = torch.full((num_heads, num_spans), float("-inf"))
    return scores.contiguous()


def _inputs(num_spans: int, gen: torch.Generator) -> dict:
    lengths = torch.randint(8, 65, (num_spans,), generator=gen)
    lengths[torch.rand(num_spans, generator=gen) < 0.2] = 1  # short gap pieces
    recency = torch.randint(0, 4, (num_spans,), generator=gen).float() / 4  # decayed 0/1 steps: ties
    prior = torch.randint(0, 9, (num_spans,), generator=gen).float() / 8  # vote fractions: ties
    pinned = torch.rand(num_spans, generator=gen) < 0.05
    return {"lengths": lengths, "recency": recency, "prior": prior, "pinned": pinned}


def _torch_reference(scores, lengths, budget, **kwargs):
    """The torch path twice: as it is (host keys filled by the NumPy fill) and with the device fill (torch only)."""
    plain = _select_spans_torch(scores, lengths, budget, **kwargs)
    saved = retrieval._fill_budget
    retrieval._fill_budget = _fill_budget_device
    try:
        torch_only = _select_spans_torch(scores, lengths, budget, **kwargs)
    finally:
        retrieval._fill_budget = saved
    assert torch.equal(plain, torch_only)
    return plain


@pytest.mark.parametrize("num_heads,num_kv_heads", [(32, 8), (4, 4)])
@pytest.mark.parametrize("num_spans", [0, 1, 5, 300, 2500])
def test_host_path_selects_what_the_torch_path_does(num_heads, num_kv_heads, num_spans):
    gen = torch.Generator().manual_seed(1000 * num_heads + num_spans)
    kinds = ("normal", "ties", "probabilities", "none")
    for trial, (kind, (scope, voting, use_recency, use_prior, use_pinned)) in enumerate(
            itertools.product(kinds, OPTIONS)):
        scores = _scores(kind, num_heads, num_spans, gen)
        inp = _inputs(num_spans, gen)
        lengths = inp["lengths"]
        total = int(lengths.sum())
        # budgets: nothing, a few spans, about a quarter, everything; rotated with the score kind, so that every
        # option combination meets each budget once over the four kinds (trial % 4 alone tied the budget to the
        # last two options: no prior and no pins only ever at budget 0)
        budget = (0, 100, 2048, total + 1)[(trial + trial // len(OPTIONS)) % 4] if num_spans else 2048
        kwargs = {"num_kv_heads": num_kv_heads, "scope": scope, "voting": voting,
                  "recency": inp["recency"] if use_recency else None, "bonus": 0.5 if use_recency else 0.0,
                  "prior": inp["prior"] if use_prior else None, "prior_weight": 0.5 if use_prior else 0.0,
                  "pinned": inp["pinned"] if use_pinned else None}
        expected = _torch_reference(scores, lengths, budget, **kwargs)
        got = select_spans(scores, lengths, budget, **kwargs)
        assert got.dtype == torch.bool and got.device.type == "cpu"
        assert got.shape == (1 if scope == "shared" else num_kv_heads, num_spans)
        assert torch.equal(got, expected), (kind, scope, voting, use_recency, use_prior, use_pinned, budget)
        if num_spans:
            rows = got.shape[0]
            top_k = max(1, int(budget / max(float(lengths.float().mean()), 1.0)))
            args = (rows, kwargs["recency"], kwargs["bonus"], voting, top_k, kwargs["prior"], kwargs["prior_weight"])
            keys = _rank_keys(scores, *args).numpy()
            host_keys = _rank_keys_host(scores, *args)
            assert host_keys.dtype == np.float32 and host_keys.shape == keys.shape
            assert np.array_equal(host_keys.view(np.int32), keys.view(np.int32)), (kind, scope, voting)


def test_host_path_is_taken_for_float32_host_scores(monkeypatch):
    calls = []
    monkeypatch.setattr(retrieval, "_select_spans_host",
                        lambda *a, **k: calls.append("host") or _select_spans_host(*a, **k))
    monkeypatch.setattr(retrieval, "_select_spans_torch",
                        lambda *a, **k: calls.append("torch") or _select_spans_torch(*a, **k))
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 40, generator=gen)
    lengths = torch.randint(1, 9, (40,), generator=gen)
    select_spans(scores, lengths, 50, num_kv_heads=2)
    select_spans(scores.double(), lengths, 50, num_kv_heads=2)
    select_spans(scores.t().contiguous().t(), lengths, 50, num_kv_heads=2)  # not contiguous
    select_spans(scores, lengths, 50, num_kv_heads=2, recency=torch.ones(40, dtype=torch.float64), bonus=0.5)
    select_spans(scores, lengths, 50, num_kv_heads=2, recency=torch.ones(40, dtype=torch.float64), bonus=0.0)
    assert calls == ["host", "torch", "torch", "torch", "host"]


def test_recency_prior_and_pinned_as_other_tensors():
    """Recency, prior and pinned tensors of other dtypes or layouts (strided views, float64, int pins, tensors that
    require grad) give the torch path's selection."""
    gen = torch.Generator().manual_seed(7)
    num_spans = 700
    scores = torch.randn(32, num_spans, generator=gen)
    scores[:, ::50] = float("-inf")
    lengths = torch.randint(1, 65, (num_spans,), generator=gen)
    base = torch.rand(2 * num_spans, generator=gen)
    recency, prior = torch.rand(num_spans, generator=gen), torch.rand(num_spans, generator=gen)
    variants = [
        {"recency": recency, "prior": prior},
        {"recency": base[::2], "prior": base[1::2]},  # strided views
        {"recency": recency.double(), "prior": prior.double()},  # float64 (the recency takes the torch path)
        {"recency": recency, "prior": prior.clone().requires_grad_(True)},
        {"recency": recency, "prior": prior, "pinned": (torch.rand(num_spans, generator=gen) < 0.1).int()},
    ]
    for scope, voting in itertools.product(("shared", "per_kv_head"), (False, True)):
        for extra in variants:
            kwargs = {"num_kv_heads": 8, "scope": scope, "voting": voting, "bonus": 0.5, "prior_weight": 0.5, **extra}
            expected = _torch_reference(scores, lengths, 1500, **kwargs)
            assert torch.equal(select_spans(scores, lengths, 1500, **kwargs), expected), (scope, voting, extra)
            if extra["recency"].dtype == torch.float32:
                assert torch.equal(_select_spans_host(scores, lengths, 1500, **kwargs), expected)
    # scores that require grad take the host path too
    leaf = scores.clone().requires_grad_(True)
    kwargs = {"num_kv_heads": 8, "recency": recency, "bonus": 0.5, "prior": prior, "prior_weight": 0.5}
    assert torch.equal(select_spans(leaf, lengths, 1500, **kwargs), _select_spans_torch(scores, lengths, 1500, **kwargs))


def test_fill_rows_when_the_guess_falls_short():
    """The fill ranks first a guessed number of candidates (from the mean length); when the best spans are short,
    the prefix runs past them and the row is ranked again with the safe bound: the same spans as the walk over a
    full sort (the device fill)."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        num_spans = int(torch.randint(200, 3000, (1,), generator=gen))
        lengths = torch.randint(40, 65, (num_spans,), generator=gen)
        keys = torch.randn(2, num_spans, generator=gen)
        short = torch.rand(num_spans, generator=gen) < 0.3
        lengths[short] = torch.randint(1, 3, (int(short.sum()),), generator=gen)
        keys[:, short] += 10.0  # the short spans rank first
        if trial % 2:
            keys = keys.round()  # ties
        budget = int(torch.randint(100, 4000, (1,), generator=gen))
        got = torch.from_numpy(_fill_rows(keys.numpy(), lengths.numpy(), budget))
        assert torch.equal(got, _fill_budget_device(keys, lengths, budget)), (trial, num_spans, budget)
