"""Graph-form decode steps (``ltri_rag.decode_graph``) compute what the eager reuse steps compute.

On CPU nothing is captured: :class:`DecodeGraph` with ``capture=False`` runs the graph form eagerly (fixed input
tensors, memory parts copied into fixed-width buffers, the new token written into the window's allocation at a
device index, the window length read by the decode attention from a tensor). These tests check that form against
the ordinary eager step, token for token and state for state; ``tests/gpu/test_decode_graph_gpu.py`` checks the
captured replays on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from ltri_rag.decode_graph import DecodeGraph, graph_unsupported
from tests.unit.tiny_models import greedy_logits, random_ids, tiny_model


@pytest.fixture(scope="module")
def qwen2():
    return tiny_model("qwen2", num_heads=4, num_kv_heads=2, seed=3)


def _config(**overrides) -> LtriConfig:
    base = dict(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=20, page_size=5,
                evict_stride=6, span_min_len=2, span_max_len=8, decode_retrieval_stride=4, attention_backend="torch")
    base.update(overrides)
    return LtriConfig(**base)


def _pair(model, cfg: LtriConfig, batch: int = 1, retrieve: bool = False) -> tuple[LtriSession, LtriSession]:
    """(eager session, session running its reuse steps, and with ``retrieve`` its retrieving steps, in graph
    form, eagerly). With ``retrieve`` the eager session selects spans on the device too (the CPU here), as the
    graph form does."""
    eager = LtriSession(model, cfg.replace(decode_graph=False, selection_on_device=retrieve), batch_size=batch)
    graphed = LtriSession(model, cfg, batch_size=batch)
    assert eager.decode_graph is None and graphed.decode_graph is None  # CPU: nothing is captured
    graphed.decode_graph = DecodeGraph(model, graphed.cache, graphed.cache_kwarg, capture=False, retrieve=retrieve)
    return eager, graphed


def _assert_same_state(a: LtriSession, b: LtriSession) -> None:
    # on the torch backend the eager step composes its attention differently (one local pass over the memory and
    # the window, against the decode composition): equal up to float rounding, carried into the next layers' K/V
    for sa, sb in zip(a.cache.global_states, b.cache.global_states):
        torch.testing.assert_close(sb.win_k, sa.win_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sb.win_v, sa.win_v, atol=1e-5, rtol=1e-5)
        if sa.win_mass is not None:
            torch.testing.assert_close(sb.win_mass, sa.win_mass, atol=1e-6, rtol=1e-5)
        if sa.win_band is not None:
            torch.testing.assert_close(sb.win_band, sa.win_band, atol=1e-6, rtol=1e-5)
        assert [len(t) for t in sb.tables] == [len(t) for t in sa.tables]
        for ta, tb in zip(sa.tables, sb.tables):
            torch.testing.assert_close(tb.starts, ta.starts, atol=0, rtol=0)
            torch.testing.assert_close(tb.ends, ta.ends, atol=0, rtol=0)
        assert (sb._decode_memory is None) == (sa._decode_memory is None)
        if sa._decode_memory is not None:
            assert sb._decode_memory[:2] == sa._decode_memory[:2]  # same key, same use count
    assert b.cache.window_len == a.cache.window_len and b.cache.memory_tokens() == a.cache.memory_tokens()


def _decode_side_by_side(eager: LtriSession, graphed: LtriSession, logits: list[torch.Tensor], steps: int,
                         recency: bool = False) -> list[bool]:
    """Decode ``steps`` greedy tokens (the eager session's choice) in both sessions from ``logits``, checking
    logits and state after each (with ``recency``, every table's persistence state too); returns per step
    whether the graph-form session was ready for a graph-form step."""
    forms = []
    for _ in range(steps):
        token = logits[0].argmax(-1)
        forms.append(graphed.decode_graph.ready())
        logits = [s.step(token) for s in (eager, graphed)]
        torch.testing.assert_close(logits[1], logits[0], atol=2e-5, rtol=1e-5)
        _assert_same_state(eager, graphed)
        if recency:
            for sa, sb in zip(eager.cache.global_states, graphed.cache.global_states):
                for ta, tb in zip(sa.tables, sb.tables):
                    torch.testing.assert_close(tb.recency, ta.recency, atol=1e-6, rtol=0)
    return forms


@pytest.mark.parametrize("case", [
    dict(),  # ltri: contiguous positions, triangle spans, persistence
    dict(position_scheme="absolute", decode_retrieval_stride=3),
    dict(mode="infllm", position_scheme="contiguous", segmentation="fixed", block_size=4),
    dict(mode="streaming", decode_retrieval_stride=5),
    dict(batch=2, evict_stride=5, budget=9),
], ids=["ltri", "absolute", "infllm-contiguous", "streaming", "batch2"])
def test_graph_form_steps_equal_eager_steps(qwen2, case: dict) -> None:
    """40 decoded tokens (several eviction cycles): the logits and the whole engine state (window K/V, key mass,
    band, spans, reuse counters) of the graph-form session equal the eager session's after every token, and most
    steps ran in graph form."""
    case = dict(case)
    batch = case.pop("batch", 1)
    cfg = _config(**case)
    eager, graphed = _pair(qwen2, cfg, batch)
    ids = random_ids(batch, 45, seed=11)
    logits = [s.feed(ids) for s in (eager, graphed)]
    torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)
    forms = _decode_side_by_side(eager, graphed, logits, 40)
    assert graphed.num_tokens == eager.num_tokens == 85
    stride = cfg.decode_retrieval_stride
    assert graphed.decode_graph.steps == sum(forms) >= 40 * (stride - 2) // stride  # evictions end some cycles
    assert not all(forms)  # the retrieving steps stayed eager
    assert graphed.decode_graph.retrieving_steps == 0


@pytest.mark.parametrize("case", [
    dict(),  # ltri: contiguous positions, triangle spans, persistence, cross-layer votes
    dict(position_scheme="absolute", decode_retrieval_stride=3, retrieval_scope="per_kv_head"),
    dict(mode="infllm", position_scheme="contiguous", segmentation="fixed", block_size=4),
    dict(voting=True, consensus_weight=0.0, decode_retrieval_stride=2),
    dict(batch=2, evict_stride=5, budget=9),
], ids=["ltri", "absolute-per-kv-head", "infllm-contiguous", "voting", "batch2"])
def test_retrieving_steps_in_graph_form_equal_eager_device_selection(qwen2, case: dict) -> None:
    """With ``retrieve``, the retrieving steps run in graph form too (spans selected, gathered and placed with
    the position read from a device tensor, the memory part written into the fixed buffers): over 40 tokens every
    decode step once the sinks are full runs in graph form, and logits and state equal the eager session that
    selects on the device."""
    case = dict(case)
    batch = case.pop("batch", 1)
    cfg = _config(**case)
    eager, graphed = _pair(qwen2, cfg, batch, retrieve=True)
    ids = random_ids(batch, 45, seed=11)
    logits = [s.feed(ids) for s in (eager, graphed)]
    forms = _decode_side_by_side(eager, graphed, logits, 40, recency=True)
    if eager.cache.consensus is not None:
        for pa, pb in zip(eager.cache.consensus.prior, graphed.cache.consensus.prior):
            assert (pa is None) == (pb is None)
            if pa is not None:
                torch.testing.assert_close(pb, pa, atol=1e-6, rtol=0)
    graph = graphed.decode_graph
    assert all(forms) and graph.steps == 40
    assert graph.retrieving_steps >= 40 // cfg.decode_retrieval_stride


def test_retrieving_steps_stay_eager_where_selection_cannot_run_on_the_device(qwen2) -> None:
    """Named reasons: pinned prompt spans (a host selection), a layer without spans yet; such steps run eagerly."""
    _, graphed = _pair(qwen2, _config(pin_prompt_spans=True), retrieve=True)
    logits = graphed.feed(random_ids(1, 45, seed=3))
    state = graphed.cache.global_states[0]
    assert "pin_prompt_spans" in state.graph_retrievable(graphed.device)
    for _ in range(12):
        logits = graphed.step(logits.argmax(-1))
    assert graphed.decode_graph.retrieving_steps == 0 and graphed.decode_graph.steps > 0
    _, fresh = _pair(qwen2, _config(), retrieve=True)
    fresh.feed(random_ids(1, 10, seed=3))  # nothing evicted yet
    assert "no spans" in fresh.cache.global_states[0].graph_retrievable(fresh.device)
    assert not fresh.decode_graph.ready()


@pytest.mark.parametrize("case", [dict(evict_stride=4, decode_retrieval_stride=3),
                                  dict(mode="streaming", decode_retrieval_stride=5, block_size=90),
                                  dict(mode="infllm", position_scheme="contiguous", segmentation="fixed",
                                       block_size=10, evict_stride=3)], ids=["ltri", "streaming", "infllm"])
def test_buffers_keep_their_address_and_reload_per_retrieval(qwen2, case: dict) -> None:
    """The window allocations and memory buffers a graph holds keep their address through evictions and new
    retrievals (only their contents change; fixed segmentation evicts whole blocks, so its window waits longer),
    and each retrieval's memory part is copied in once."""
    cfg = _config(**case)
    _, graphed = _pair(qwen2, cfg)
    logits = graphed.feed(random_ids(1, 40, seed=2))
    addresses, sources = set(), set()
    for _ in range(120):
        logits = graphed.step(logits.argmax(-1))
        for state in graphed.cache.global_states:
            if state._graph_memory is not None:
                addresses.add(tuple(t.data_ptr() for t in (*state.window_storage(), *state._graph_memory)))
                sources.add(id(state._graph_memory_source))
    layers = len(graphed.cache.global_states)
    assert len(addresses) == layers  # one set of addresses per layer for the whole run
    assert len(sources) > layers  # several retrievals, each loaded
    assert graphed.decode_graph.steps >= 10


def test_ready_needs_full_sinks_and_reuse_in_every_layer(qwen2) -> None:
    cfg = _config(num_sink_tokens=8)
    _, graphed = _pair(qwen2, cfg)
    graph = graphed.decode_graph
    graphed.feed(random_ids(1, 5, seed=4))  # sinks not full yet
    assert not graph.ready()
    graphed.step(torch.tensor([7]))
    assert not graph.ready()
    graphed.feed(random_ids(1, 30, seed=5))
    assert not graph.ready()  # a prompt pass ended any reuse
    graphed.step(torch.tensor([7]))  # a retrieving step
    assert graph.ready()
    state = graphed.cache.global_states[-1]
    kept = state._decode_memory
    state._decode_memory = None  # one layer without a memory part to reuse: the step must stay eager
    assert not graph.ready()
    state._decode_memory = kept
    assert graph.ready()


def test_a_failed_graph_form_step_leaves_no_trace(qwen2) -> None:
    """A graph-form step that fails part-way changes nothing: the next step gives the eager session's logits."""
    eager, graphed = _pair(qwen2, _config())
    ids = random_ids(1, 40, seed=6)
    logits = [s.feed(ids) for s in (eager, graphed)]
    token = logits[0].argmax(-1)
    logits = [s.step(token) for s in (eager, graphed)]  # retrieves
    assert graphed.decode_graph.ready()
    state = graphed.cache.global_states[-1]
    original = state.attend

    def failing(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("boom")

    state.attend = failing  # type: ignore[method-assign]
    before = (graphed.num_tokens, graphed.cache.window_len, state._decode_memory[1])
    token = logits[0].argmax(-1)
    with pytest.raises(RuntimeError, match="boom"):
        graphed.step(token)
    state.attend = original  # type: ignore[method-assign]
    assert (graphed.num_tokens, graphed.cache.window_len, state._decode_memory[1]) == before
    assert graphed.cache.plan is None and graphed.cache.graph_window is None
    logits = [s.step(token) for s in (eager, graphed)]
    torch.testing.assert_close(logits[1], logits[0], atol=2e-5, rtol=1e-5)
    _assert_same_state(eager, graphed)


def test_where_graph_form_is_unsupported() -> None:
    """The reasons are named; an unsupported config gets no graph (nor a DecodeGraph built by hand)."""
    model = tiny_model("qwen2")
    cases = {
        "decode_graph is False": _config(decode_graph=False),
        "decode_retrieval_stride is 1": _config(decode_retrieval_stride=1, decode_graph_retrieval=False),
        "'fixed' position scheme": _config(position_scheme="fixed"),
    }
    for reason, cfg in cases.items():
        session = LtriSession(model, cfg)
        assert reason in graph_unsupported(session.cache, session.device, capture=False)
        with pytest.raises(ValueError, match="cannot run in graph form"):
            DecodeGraph(model, session.cache, session.cache_kwarg, capture=False)
    gemma = tiny_model("gemma3", sliding_window=8)
    session = LtriSession(gemma, _config())
    assert "sliding-window layers" in graph_unsupported(session.cache, session.device, capture=False)
    session = LtriSession(model, _config())
    assert "CUDA" in graph_unsupported(session.cache, torch.device("cpu"))
    assert session.decode_graph is None
    with pytest.raises(TypeError, match="decode_graph must be a bool"):
        LtriConfig(decode_graph=1)


def test_graph_form_plan_is_checked(qwen2) -> None:
    session = LtriSession(qwen2, _config())
    with pytest.raises(ValueError, match="graph-form step decodes one token once the sinks are full"):
        session.cache.begin_step(2, decode=True, graph=True)
    assert session.cache.plan is None


def test_every_step_retrieving_runs_in_graph_form(qwen2) -> None:
    """``decode_retrieval_stride=1`` (every decoded token retrieves): with ``decode_graph_retrieval`` every step
    once the sinks are full runs in graph form and equals the eager session that selects on the device; without
    it the configuration is unsupported (nothing to reuse)."""
    cfg = _config(decode_retrieval_stride=1)
    session = LtriSession(qwen2, cfg)
    assert graph_unsupported(session.cache, session.device, capture=False) is None
    eager, graphed = _pair(qwen2, cfg, retrieve=True)
    logits = [s.feed(random_ids(1, 45, seed=8)) for s in (eager, graphed)]
    for _ in range(20):
        token = logits[0].argmax(-1)
        assert graphed.decode_graph.ready()
        logits = [s.step(token) for s in (eager, graphed)]
        torch.testing.assert_close(logits[1], logits[0], atol=2e-5, rtol=1e-5)
        _assert_same_state(eager, graphed)
    assert graphed.decode_graph.retrieving_steps == graphed.decode_graph.steps == 20


def test_a_failed_capture_at_a_span_sets_first_step_runs_that_step_eagerly(qwen2, monkeypatch) -> None:
    """A span set whose widths were seen before is captured at its first step. If that capture fails, whatever it
    staged is dropped and the step runs eagerly (same logits as the eager session); a capture that fails later
    (the usual second step) ends graph decoding with a warning, as before. The failing capture here first runs the
    step, so that it leaves staged changes behind."""
    cfg = _config(decode_retrieval_stride=1)
    eager, graphed = _pair(qwen2, cfg, retrieve=True)
    graph = graphed.decode_graph

    def failing_capture(self):
        self._forward()  # stages everything a real capture would, then fails
        raise RuntimeError("capture refused")

    class Everything(set):
        def __contains__(self, item) -> bool:
            return True

    monkeypatch.setattr(DecodeGraph, "_capture_graph", failing_capture)
    graph.capture, graph._compiled_widths = True, Everything()
    logits = [s.feed(random_ids(1, 45, seed=8)) for s in (eager, graphed)]
    token = logits[0].argmax(-1)
    logits = [s.step(token) for s in (eager, graphed)]  # first step of the span set: direct capture fails
    assert graph.direct_capture_failures == 1 and graph.replays == 0
    torch.testing.assert_close(logits[1], logits[0], atol=2e-5, rtol=1e-5)
    _assert_same_state(eager, graphed)
    token = logits[0].argmax(-1)
    with pytest.warns(RuntimeWarning, match="capture refused"):
        logits = [s.step(token) for s in (eager, graphed)]
    assert graphed.decode_graph is None
    torch.testing.assert_close(logits[1], logits[0], atol=2e-5, rtol=1e-5)
    for _ in range(4):
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in (eager, graphed)]
        torch.testing.assert_close(logits[1], logits[0], atol=2e-5, rtol=1e-5)
    _assert_same_state(eager, graphed)


def test_one_retrieving_graph_key_per_span_set(qwen2) -> None:
    """The retrieving steps between two evictions share one graph key (the prior is padded to the size of its next
    commit), and the evicting step itself runs eagerly without changing it: one capture per span set."""
    _, graphed = _pair(qwen2, _config(decode_retrieval_stride=1), retrieve=True)
    graph = graphed.decode_graph
    graphed.feed(random_ids(1, 45, seed=8))
    token, keys, span_sets = torch.tensor([3]), [], []
    for _ in range(24):
        assert graph.ready()
        graphed.step(token)
        keys.append(graph._retrieve_key)
        span_sets.append(tuple(len(t) for s in graphed.cache.global_states for t in s.tables))
    # the key changes exactly when the spans did (an eviction at the end of the step before)
    changes = [i for i in range(1, 24) if keys[i] != keys[i - 1]]
    evictions = [i + 1 for i in range(1, 23) if span_sets[i] != span_sets[i - 1]]
    assert changes and changes == [i for i in evictions if i < 24]


@pytest.mark.parametrize("device_pages", [0, 3])
def test_retrieving_steps_with_host_pages_read_in_place(qwen2, monkeypatch, device_pages: int) -> None:
    """``zero_copy_host_pages``: with span pages in the pool's host tier (a pool of ``device_pages`` first-tier pages,
    both tiers host memory on the CPU), retrieving steps still run in graph form, gathering host-tier rows in
    place, and equal an eager session whose pool is one tier (logits and state, 40 tokens). Without the flag the
    same pool keeps them eager, naming why."""
    from ltri_rag import cache as cache_module
    from ltri_rag.pool import PagedKVPool

    def split_pool(model, config, batch_size, device):
        return PagedKVPool(batch_size, config.page_size, device, device_pages=device_pages)

    cfg = _config(zero_copy_host_pages=True)
    eager = LtriSession(qwen2, cfg.replace(decode_graph=False, selection_on_device=True, zero_copy_host_pages=False))
    assert eager.cache.pool.host_tier_first_token is None  # one tier
    monkeypatch.setattr(cache_module, "_make_pool", split_pool)
    _, graphed = _pair(qwen2, cfg, retrieve=True)
    ids = random_ids(1, 45, seed=11)
    logits = [s.feed(ids) for s in (eager, graphed)]
    pool = graphed.cache.pool
    assert pool.host_tier_first_token == device_pages * cfg.page_size and pool.num_pages > device_pages
    assert not pool.on_device_tier(0, graphed.device) and pool.readable_on(0, graphed.device, host_pages=True)
    forms = _decode_side_by_side(eager, graphed, logits, 40, recency=True)
    assert all(forms) and graphed.decode_graph.retrieving_steps >= 40 // cfg.decode_retrieval_stride
    # the same split pool without the flag: retrieving steps stay eager, and say why
    _, plain = _pair(qwen2, cfg.replace(zero_copy_host_pages=False), retrieve=True)
    logits = plain.feed(ids)
    assert plain.cache.pool.host_tier_first_token == device_pages * cfg.page_size
    assert "host memory" in plain.cache.global_states[0].graph_retrievable(plain.device)
    for _ in range(8):
        logits = plain.step(logits.argmax(-1))
    assert plain.decode_graph.retrieving_steps == 0


def _interpreted_kernels(monkeypatch) -> None:
    """The engine's Triton kernel modules built for the interpreter (skips without triton): ``TRITON_INTERPRET`` set
    and each module imported earlier in this process without it rebuilt."""
    import importlib

    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name in ("triton_assemble", "triton_local", "triton_rope", "triton_scoring", "triton_select",
                 "triton_decode", "triton_gather"):
        module = importlib.import_module(f"ltri_rag.kernels.{name}")
        if not module.INTERPRETED:  # imported earlier in this process without the interpreter
            importlib.reload(module)


def test_retrieving_graph_form_with_the_fused_assembly(qwen2, monkeypatch) -> None:
    """``layer_assembly.FUSED_DEVICE_ASSEMBLY``: a retrieving graph-form step writes its memory part straight into the
    graph buffers with one Triton launch per sequence (here under the interpreter, Triton backend). Batch of two
    (the sequences' parts may differ in width: the shorter one's tail must read as empty): logits and state equal
    the same session with the torch assembly, every step in graph form."""
    import importlib

    from ltri_rag import layer_assembly as layer_mod

    _interpreted_kernels(monkeypatch)
    kernel = importlib.import_module("ltri_rag.kernels.triton_assemble").assemble_memory
    launches = []

    def counted(*args, **kwargs):
        launches.append(kwargs.get("out") is not None)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(layer_mod, "assemble_memory", counted)
    cfg = _config(attention_backend="triton", evict_stride=5, budget=9, decode_retrieval_stride=2)
    ids = random_ids(2, 40, seed=12)
    runs, per_run = [], []
    for fused in (False, True):
        monkeypatch.setattr(layer_mod, "FUSED_DEVICE_ASSEMBLY", fused)
        before = len(launches)
        session = LtriSession(qwen2, cfg, batch_size=2)
        session.decode_graph = DecodeGraph(qwen2, session.cache, session.cache_kwarg, capture=False, retrieve=True)
        runs.append((session, greedy_logits(session, ids, 12)))
        per_run.append(launches[before:])
    (plain, plain_logits), (fused_session, fused_logits) = runs
    for a, b in zip(plain_logits, fused_logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    _assert_same_state(plain, fused_session)
    assert fused_session.decode_graph.retrieving_steps >= 4 and fused_session.decode_graph.steps == 12
    assert not per_run[0] and any(per_run[1])  # the fused assembly ran, into the graph buffers, only with the flag on


@pytest.mark.parametrize("switch", ["slot_glue", "fused_finish"])
def test_retrieving_graph_form_with_session35_switches(qwen2, switch, monkeypatch) -> None:
    """The two switches of session 35, each on against off, in retrieving graph-form steps (Triton backend under
    the interpreter, the fused assembly, batch of two, decode-time evictions): ``triton_assemble.SLOT_GLUE_IN_KERNEL``
    (slots read in place, each head's count found in the kernel) and ``triton_decode.FUSED_FINISH`` (the decode
    attention in one launch) leave every logit bit for bit as it was; and each switch's own path ran only when on
    (the assembly kernel launched to derive its counts; the one-launch form's arrival counters made and left at
    0)."""
    import importlib

    from ltri_rag import layer_assembly as layer_mod
    from tests.unit.triton_modules import record_launch_flag

    _interpreted_kernels(monkeypatch)
    module, flag = {"slot_glue": ("triton_assemble", "SLOT_GLUE_IN_KERNEL"),
                    "fused_finish": ("triton_decode", "FUSED_FINISH")}[switch]
    module = importlib.import_module(f"ltri_rag.kernels.{module}")
    monkeypatch.setattr(layer_mod, "FUSED_DEVICE_ASSEMBLY", True)
    assembly = importlib.import_module("ltri_rag.kernels.triton_assemble")
    derived = record_launch_flag(monkeypatch, assembly, ("_assemble_halves_kernel", "_assemble_kernel"), "DERIVE")
    cfg = _config(attention_backend="triton", evict_stride=5, budget=9, decode_retrieval_stride=2)
    ids = random_ids(2, 40, seed=13)
    runs = []
    for on in (False, True):
        monkeypatch.setattr(module, flag, on)
        if switch == "fused_finish":
            monkeypatch.setattr(module, "_COUNTERS", {})
        derived.clear()
        session = LtriSession(qwen2, cfg, batch_size=2)
        session.decode_graph = DecodeGraph(qwen2, session.cache, session.cache_kwarg, capture=False, retrieve=True)
        runs.append((session, greedy_logits(session, ids, 12)))
        assert derived  # the one-launch assembly ran; it found its counts itself exactly when the switch says so
        assert all(derived) == (on or switch != "slot_glue") and any(derived) == all(derived)
        if switch == "fused_finish":
            counters = list(module._COUNTERS.values())
            assert bool(counters) == on and not any(bool(c.any()) for c in counters)
    (off, off_logits), (on_session, on_logits) = runs
    for a, b in zip(off_logits, on_logits):
        assert torch.equal(a, b)
    _assert_same_state(off, on_session)
    assert on_session.decode_graph.retrieving_steps >= 4
