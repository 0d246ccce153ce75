"""A decode step on the torch path reuses the last step's placed memory part when it would build the same one
(``ltri_rag.layer_memory.REUSE_PLACED_MEMORY``): the logits must equal those of a session that builds it at every
step, bit for bit, through evictions, with every position scheme, a batch, and selections that change."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriSession
from ltri_rag import layer_memory
from ltri_rag.layer import GlobalLayerState
from tests.unit.tiny_models import exact_config, reference_logits, tiny_model
from tests.unit.tiny_models import random_ids as _ids

TOKENS = [5, 9, 200, 3, 17, 17, 44, 90, 1, 250, 7, 7, 64, 128, 11, 2, 99, 31]


def _reuses(session: LtriSession) -> int:
    return sum(s.placed_reuses for s in session.cache.states if isinstance(s, GlobalLayerState))


def _decode(model, config, ids: torch.Tensor, reuse: bool, monkeypatch) -> tuple[list[torch.Tensor], int]:
    """The prompt's logits and each decode step's, and the layer-steps that reused their placed memory."""
    monkeypatch.setattr(layer_memory, "REUSE_PLACED_MEMORY", reuse)
    session = LtriSession(model, config, batch_size=ids.shape[0])
    out = [session.feed(ids)]
    for token in TOKENS:
        out.append(session.step(torch.tensor([token] * ids.shape[0])))
    return out, _reuses(session)


@pytest.mark.parametrize("scheme", ["contiguous", "fixed", "absolute"])
@pytest.mark.parametrize("budget", [100_000, 12])
def test_reused_placed_memory_changes_nothing(scheme: str, budget: int, monkeypatch) -> None:
    """Budget over the whole memory (every step selects every span: the placed memory is reused between
    evictions) and a small one (selections change from step to step): the same logits bit for bit as building the
    memory part at every step."""
    model = tiny_model("llama")
    ids = _ids(2, 70, seed=11)
    cfg = exact_config("ltri", 9, evict_stride=8, budget=budget, position_scheme=scheme)
    built, none = _decode(model, cfg, ids, False, monkeypatch)
    reused, count = _decode(model, cfg, ids, True, monkeypatch)
    assert none == 0
    for a, b in zip(built, reused):
        assert torch.equal(a, b)
    layers = sum(isinstance(s, GlobalLayerState) for s in LtriSession(model, cfg).cache.states)
    if budget == 100_000:
        # 18 steps, an eviction every 8: the anchor moves at 2 of them, so most layer-steps reuse
        assert count >= 10 * layers
    assert count < len(TOKENS) * layers  # the first step, and each step after an eviction, builds it


def test_reuse_keeps_the_model_exact(monkeypatch) -> None:
    """With absolute positions and every span retrieved, a session that reuses its placed memory still equals the
    unmodified model at every decoded token."""
    model = tiny_model("qwen2")
    ids = _ids(1, 50, seed=12)
    cfg = exact_config("ltri", 7, evict_stride=8)
    logits, count = _decode(model, cfg, ids, True, monkeypatch)
    assert count > 0
    seq = torch.cat([ids, torch.tensor([TOKENS])], dim=1)
    expected = reference_logits(model, seq)
    for i, step in enumerate(logits[1:]):
        torch.testing.assert_close(step, expected[:, ids.shape[1] + i], atol=2e-5, rtol=0)


def test_a_pool_write_or_new_sinks_stop_the_reuse(monkeypatch) -> None:
    """The reuse key holds the pool's write count and the sink tensor: after a write to the pool (or new sinks) the
    next step builds its memory part again even where its slot lists are the same."""
    model = tiny_model("llama")
    ids = _ids(1, 50, seed=13)
    cfg = exact_config("ltri", 7, evict_stride=8)
    monkeypatch.setattr(layer_memory, "REUSE_PLACED_MEMORY", True)
    session = LtriSession(model, cfg)
    session.feed(ids)
    session.step(torch.tensor([3]))
    session.step(torch.tensor([4]))
    reused = _reuses(session)
    assert reused > 0
    session.cache.pool.writes += 1  # what any write does (pool.write_layers, set_positions, unreserve)
    session.step(torch.tensor([5]))
    assert _reuses(session) == reused
    session.step(torch.tensor([6]))
    assert _reuses(session) > reused
    reused = _reuses(session)
    for state in session.cache.states:
        if isinstance(state, GlobalLayerState) and state.sink_k is not None:
            state.sink_k = state.sink_k.clone()  # same values, a new tensor: treated as new sinks
    session.step(torch.tensor([7]))
    assert _reuses(session) == reused
