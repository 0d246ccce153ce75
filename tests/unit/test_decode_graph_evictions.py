"""Decode-time evictions in graph form: a graph-form step reserves its evicted tokens' pool slots after its forward
(``LtriCache.end_step``), so that the last step of an eviction cycle can replay the graph of its span set
(``decode_graph.REPLAY_EVICTING_STEPS``), and a failed reservation drops the step whole. Helpers and the tiny model
as in ``test_decode_graph.py``."""

from __future__ import annotations

import pytest
import torch

from ltri_rag.decode_graph import DecodeGraph
from tests.unit.test_decode_graph import _assert_same_state, _config, _pair
from tests.unit.tiny_models import random_ids, tiny_model


@pytest.fixture(scope="module")
def qwen2():
    return tiny_model("qwen2", num_heads=4, num_kv_heads=2, seed=3)


def test_a_graph_form_step_reserves_its_evicted_slots_after_the_forward(qwen2) -> None:
    """A graph-form step that evicts reserves its tokens' pool slots at ``end_step``: during its forward the pool
    (page tables, slot count) is as before the step, so a graph captured for the span set still describes it.
    The slots it then takes are the planned ones, and an aborted step reserves nothing."""
    cfg = _config(decode_retrieval_stride=1)
    eager, graphed = _pair(qwen2, cfg, retrieve=True)
    pool = graphed.cache.pool
    state = graphed.cache.global_states[0]
    original = state.attend
    seen: list[tuple[int, int]] = []  # (slots during the forward, the plan's evicted tokens)

    def recording(*args, **kwargs):
        seen.append((pool.num_slots[0], graphed.cache.plan.num_evict))
        return original(*args, **kwargs)

    state.attend = recording  # type: ignore[method-assign]
    logits = [s.feed(random_ids(1, 45, seed=8)) for s in (eager, graphed)]
    seen.clear()
    for _ in range(16):
        before = pool.num_slots[0]
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in (eager, graphed)]
        torch.testing.assert_close(logits[1], logits[0], atol=2e-5, rtol=1e-5)
        during, evicted = seen[-1]
        assert during == before and pool.num_slots[0] == before + evicted
    assert any(evicted for _, evicted in seen)  # the run crossed evictions
    _assert_same_state(eager, graphed)

    # an evicting plan in graph form reserves nothing until end_step; aborting it leaves the pool as it was
    cache = graphed.cache
    cache.window_len = cfg.local_window + cfg.evict_stride - 1  # the next token makes the step evict
    slots, pages = list(pool.num_slots), [len(t) for t in pool.page_tables]
    plan = cache.begin_step(1, decode=True, graph=True)
    assert plan.num_evict == cfg.evict_stride and plan.first_slot == slots[0]
    assert pool.num_slots == slots and [len(t) for t in pool.page_tables] == pages
    cache.abort_step()
    assert pool.num_slots == slots and cache.plan is None


def test_evicting_steps_replay_the_graph_of_their_span_set(qwen2, monkeypatch) -> None:
    """``REPLAY_EVICTING_STEPS``: the last step of an eviction cycle finds the graph key of the cycle's captured
    graph (its reservation waits for ``end_step``) and replays it; off, it runs eagerly. The control flow is
    checked here with a stand-in graph (a replay on the CPU recomputes nothing); the replays' values are checked
    on CUDA (``tests/gpu/test_decode_graph_gpu.py``)."""
    from ltri_rag import decode_graph as graph_mod

    class StandIn:
        def __init__(self) -> None:
            self.replays = 0

        def replay(self) -> None:
            self.replays += 1

    def capture(self):
        return StandIn(), self._forward()

    monkeypatch.setattr(DecodeGraph, "_capture_graph", capture)
    counts = {}
    for replay in (False, True):
        monkeypatch.setattr(graph_mod, "REPLAY_EVICTING_STEPS", replay)
        _, graphed = _pair(qwen2, _config(decode_retrieval_stride=1), retrieve=True)
        graph = graphed.decode_graph
        graph.capture = True
        graphed.feed(random_ids(1, 45, seed=8))
        evicting = 0
        for _ in range(30):
            assert graph.ready()
            plan_evicts = graphed.cache.window_len + 1 - graphed.config.local_window >= graphed.config.evict_stride
            evicting += plan_evicts
            graphed.step(torch.tensor([3]))
        counts[replay] = (evicting, graph.evicting_replays, graph.retrieving_replays)
    evicting, replays, _ = counts[True]
    assert evicting >= 4 and counts[False][1] == 0
    # every cycle after the first has a captured graph by its last step (captured at its first or second step)
    assert replays >= evicting - 1
    assert counts[True][2] == counts[False][2] + replays


def test_a_failed_reservation_at_end_step_leaves_no_trace(qwen2, monkeypatch) -> None:
    """The pool slots of an evicting graph-form step are reserved at ``end_step``: if that fails (e.g. the pool
    cannot grow), the step is dropped whole and raises; the next step gives the eager session's logits."""
    eager, graphed = _pair(qwen2, _config(decode_retrieval_stride=1), retrieve=True)
    logits = [s.feed(random_ids(1, 45, seed=8)) for s in (eager, graphed)]
    cache, pool = graphed.cache, graphed.cache.pool
    while cache.window_len + 1 - cache.config.local_window < cache.config.evict_stride:  # up to an evicting step
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in (eager, graphed)]
    before = (graphed.num_tokens, cache.window_len, list(pool.num_slots), cache.memory_tokens())
    original = pool.reserve

    def failing(num_new: int) -> int:
        raise MemoryError("the pool cannot grow")

    monkeypatch.setattr(pool, "reserve", failing)
    token = logits[0].argmax(-1)
    with pytest.raises(MemoryError, match="cannot grow"):
        graphed.step(token)
    assert cache.plan is None and cache.graph_window is None
    assert (graphed.num_tokens, cache.window_len, list(pool.num_slots), cache.memory_tokens()) == before
    monkeypatch.setattr(pool, "reserve", original)
    for _ in range(3):  # the evicting step again, then two more
        logits = [s.step(token) for s in (eager, graphed)]
        torch.testing.assert_close(logits[1], logits[0], atol=2e-5, rtol=1e-5)
        token = logits[0].argmax(-1)
    _assert_same_state(eager, graphed)
