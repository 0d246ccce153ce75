"""``LtriSession``: chunking, the look-ahead pass, accounting, batches, and recovery from a failed forward."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from ltri_rag.layer import GlobalLayerState
from ltri_rag.sliding import SlidingLayerState
from tests.unit.tiny_models import VOCAB, exact_config, reference_logits, tiny_model
from tests.unit.tiny_models import random_ids as _ids

ATOL = 1e-4



@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _record_forwards(session: LtriSession) -> list[tuple[int, bool]]:
    """Wrap ``session._forward`` to record ``(tokens, dry)`` of each pass."""
    calls: list[tuple[int, bool]] = []
    inner = session._forward

    def forward(input_ids, keep_all, dry=False, decode=False):
        calls.append((input_ids.shape[1], dry))
        return inner(input_ids, keep_all, dry=dry, decode=decode)

    session._forward = forward  # type: ignore[method-assign]
    return calls


# ---------------------------------------------------------------------------------------------- chunk bounds
@pytest.mark.parametrize("chunk_size,final_chunk_size", [(5, 16), (7, 3), (4, 4), (1, 1), (16, 1), (3, 10)])
def test_chunk_bounds_cover_the_input(llama, chunk_size: int, final_chunk_size: int) -> None:
    session = LtriSession(llama, exact_config("ltri", chunk_size, final_chunk_size=final_chunk_size))
    for length in list(range(1, 60)) + [127, 128, 129, 1000]:
        bounds = session._chunk_bounds(length)
        assert bounds[0][0] == 0 and bounds[-1][1] == length, (length, bounds)
        assert all(b[1] == a[0] for b, a in zip(bounds, bounds[1:])), (length, bounds)  # contiguous
        assert all(end > start for start, end in bounds), (length, bounds)  # no empty piece
        assert all(end - start <= chunk_size for start, end in bounds[:-1]), (length, bounds)
        last = bounds[-1][1] - bounds[-1][0]
        assert last == min(final_chunk_size, length), (length, bounds)
        body = length - last
        assert len(bounds) == -(-body // chunk_size) + 1


def test_chunk_bounds_short_inputs(llama) -> None:
    session = LtriSession(llama, exact_config("ltri", 5, final_chunk_size=16))
    assert session._chunk_bounds(1) == [(0, 1)]
    assert session._chunk_bounds(15) == [(0, 15)]
    assert session._chunk_bounds(16) == [(0, 16)]
    assert session._chunk_bounds(17) == [(0, 1), (1, 17)]
    assert session._chunk_bounds(27) == [(0, 5), (5, 10), (10, 11), (11, 27)]


def test_full_mode_is_one_chunk(llama) -> None:
    session = LtriSession(llama, LtriConfig(mode="full", chunk_size=4, final_chunk_size=2))
    for length in (1, 5, 17, 300):
        assert session._chunk_bounds(length) == [(0, length)]
    calls = _record_forwards(session)
    session.feed(_ids(1, 37))
    assert calls == [(37, False)]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_full_mode_in_pieces_equals_one_pass(family) -> None:
    """``full_chunk_size`` reads the prompt in pieces through transformers' cache: same logits, then same decode."""
    model = tiny_model(family, sliding_window=8 if family == "gemma3" else None)
    ids = _ids(1, 45)
    whole = LtriSession(model, LtriConfig(mode="full"))
    pieces = LtriSession(model, LtriConfig(mode="full", full_chunk_size=16))
    assert pieces._chunk_bounds(45) == [(0, 16), (16, 32), (32, 45)]
    torch.testing.assert_close(pieces.feed(ids, return_all_logits=True), whole.feed(ids, return_all_logits=True),
                               rtol=1e-4, atol=1e-4)
    token = torch.tensor([3])
    torch.testing.assert_close(pieces.step(token), whole.step(token), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pieces.feed(ids[:, :5], return_all_logits=True)[0, -1],
                               reference_logits(model, torch.cat([ids, token[None], ids[:, :5]], 1))[0, -1],
                               rtol=1e-4, atol=1e-4)


def test_feed_runs_the_planned_chunks(llama) -> None:
    cfg = exact_config("ltri", 5, final_chunk_size=6, lookahead=False)
    session = LtriSession(llama, cfg)
    calls = _record_forwards(session)
    session.feed(_ids(1, 23))
    assert calls == [(5, False), (5, False), (5, False), (2, False), (6, False)]
    assert session.num_tokens == 23


# ------------------------------------------------------------------------------------------------ look-ahead
def _snapshot(session: LtriSession) -> dict[str, object]:
    """Everything a session keeps between passes (not what it last retrieved)."""
    cache = session.cache
    snap: dict[str, object] = dict(num_tokens=session.num_tokens, seen=cache.seen_tokens, sinks=cache.num_sinks,
                                   window=cache.window_len, memory=cache.memory_tokens(), plan=cache.plan)
    if cache.pool is not None:
        snap["slots"] = list(cache.pool.num_slots)
        used = [-(-n // cache.pool.page_size) for n in cache.pool.num_slots]  # spare reserved pages don't count
        snap["pages"] = [list(t[:u]) for t, u in zip(cache.pool.page_tables, used)]
    for i, state in enumerate(cache.states):
        if isinstance(state, SlidingLayerState):
            snap[f"{i}.k"], snap[f"{i}.v"] = state.k, state.v
            continue
        for name in ("sink_k", "sink_v", "win_k", "win_v", "win_mass", "win_band", "win_start"):
            value = getattr(state, name)
            snap[f"{i}.{name}"] = value.clone() if isinstance(value, torch.Tensor) else value
        for seq, table in enumerate(state.tables):
            for name in ("starts", "ends", "vectors", "owner", "recency"):
                snap[f"{i}.{seq}.{name}"] = getattr(table, name).clone()
            if cache.pool is not None and len(table):
                slots = torch.arange(cache.pool.num_slots[seq])[None].expand(state.win_k.shape[1], -1)
                snap[f"{i}.{seq}.pool"] = cache.pool.gather(i, seq, slots, torch.device("cpu"))
    return snap


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, tuple) and x and isinstance(x[0], torch.Tensor):
            for u, v in zip(x, y):
                assert torch.equal(u, v), key
        elif isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and torch.equal(x, y), key
        else:
            assert x == y, key


@pytest.mark.parametrize("budget", [100_000, 10])
def test_dry_pass_changes_no_state(llama, budget: int) -> None:
    """A look-ahead pass attends (and votes) but leaves every window, span table, recency and the pool alone."""
    cfg = exact_config("ltri", 5, budget=budget, persistence=True, consensus_weight=0.5)
    session = LtriSession(llama, cfg)
    ids = _ids(1, 70)
    session.feed(ids[:, :60])
    assert session.usage()["memory_tokens"] > 0
    before = _snapshot(session)
    recency_before = [t.recency.clone() for s in session.cache.states if isinstance(s, GlobalLayerState)
                      for t in s.tables]
    with torch.inference_mode():
        dry = session._forward(ids[:, 60:], keep_all=True, dry=True)
    _assert_same(before, _snapshot(session))
    assert session.cache.plan is None
    # the dry pass computed the same logits the real pass then computes
    real = session.feed(ids[:, 60:], return_all_logits=True)
    assert dry.shape == real.shape
    if budget == 100_000:
        torch.testing.assert_close(dry, real, atol=ATOL, rtol=0)
    recency_after = [t.recency for s in session.cache.states if isinstance(s, GlobalLayerState) for t in s.tables]
    if budget == 10:  # the real pass does update persistence (the check above is not vacuous)
        assert any(not torch.equal(a, b[: a.numel()]) for a, b in zip(recency_before, recency_after))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_lookahead_leaves_state_as_without_it(family: str) -> None:
    model = tiny_model(family)
    ids = _ids(1, 83, seed=5)
    with_la = LtriSession(model, exact_config("ltri", 5, lookahead=True, consensus_weight=0.5))
    without = LtriSession(model, exact_config("ltri", 5, lookahead=False, consensus_weight=0.5))
    calls = _record_forwards(with_la)
    ref = reference_logits(model, ids)
    outs = []
    for session in (with_la, without):
        first = session.feed(ids[:, :60], return_all_logits=True)
        second = session.feed(ids[:, 60:80], return_all_logits=True)
        logits = second[:, -1]
        for t in range(80, 83):  # a few decode steps
            logits = session.step(ids[:, t])
        outs.append(torch.cat([first, second], dim=1))
        torch.testing.assert_close(outs[-1], ref[:, :80], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits, ref[:, 82], atol=ATOL, rtol=0)
    # the look-ahead really ran: once per feed (on its final chunk), never on decode steps
    assert [c for c in calls if c[1]] == [(16, True), (16, True)]
    assert sum(n for n, dry in calls if not dry) == 83
    assert with_la.cache.consensus.prior[0] is not None
    assert with_la.num_tokens == without.num_tokens == with_la.cache.seen_tokens == without.cache.seen_tokens == 83
    assert with_la.usage()["memory_tokens"] == without.usage()["memory_tokens"] > 0
    _assert_same(_snapshot(with_la), _snapshot(without))


def test_lookahead_with_small_budget_keeps_the_accounting(llama) -> None:
    """Retrieval choices may differ with a small budget, but not what was read, kept or evicted."""
    ids = _ids(1, 90, seed=2)
    sessions = [LtriSession(llama, exact_config("ltri", 5, budget=12, lookahead=la, consensus_weight=0.5))
                for la in (True, False)]
    for s in sessions:
        s.feed(ids[:, :70])
        s.feed(ids[:, 70:88])
        s.step(ids[:, 88])
    a, b = sessions
    assert a.num_tokens == b.num_tokens == 89
    assert a.cache.seen_tokens == b.cache.seen_tokens == 89
    assert a.cache.num_sinks == b.cache.num_sinks and a.cache.window_len == b.cache.window_len
    assert a.usage()["memory_tokens"] == b.usage()["memory_tokens"] > 0
    assert a.cache.pool.num_slots == b.cache.pool.num_slots
    for sa, sb in zip(a.cache.states, b.cache.states):
        if isinstance(sa, GlobalLayerState):
            assert sa.win_k.shape == sb.win_k.shape and sa.sink_k.shape == sb.sink_k.shape


def test_no_lookahead_without_memory_or_weight(llama) -> None:
    # nothing evicted yet: no spans to vote on
    session = LtriSession(llama, exact_config("ltri", 5, local_window=64))
    calls = _record_forwards(session)
    session.feed(_ids(1, 30))
    assert session.usage()["memory_tokens"] == 0 and not any(dry for _, dry in calls)
    # consensus weight 0: the votes would not be used
    session = LtriSession(llama, exact_config("ltri", 5, lookahead=True, consensus_weight=0.0))
    calls = _record_forwards(session)
    session.feed(_ids(1, 60))
    assert session.usage()["memory_tokens"] > 0 and not any(dry for _, dry in calls)


# --------------------------------------------------------------------------------------------------- usage
def test_usage(llama) -> None:
    ids = _ids(1, 50)
    full = LtriSession(llama, LtriConfig(mode="full"))
    full.feed(ids)
    assert full.usage() == {"tokens": 50, "memory_tokens": 0, "retrieved_tokens": 0}
    cfg = exact_config("ltri", 5, budget=9)
    ltri = LtriSession(llama, cfg)
    ltri.feed(ids)
    usage = ltri.usage()
    assert set(usage) == {"tokens", "memory_tokens", "retrieved_tokens"}
    assert usage["tokens"] == 50
    assert usage["memory_tokens"] == ltri.cache.pool.num_slots[0] == 50 - ltri.cache.num_sinks - ltri.cache.window_len
    assert 0 < usage["retrieved_tokens"] <= cfg.budget
    ltri.step(torch.tensor([7]))
    assert ltri.usage()["tokens"] == 51
    streaming = LtriSession(llama, exact_config("streaming", 5))
    streaming.feed(ids)
    assert streaming.usage() == {"tokens": 50, "memory_tokens": 0, "retrieved_tokens": 0}


# --------------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("mode", ["full", "ltri"])
def test_batch_of_two_with_steps(llama, mode: str) -> None:
    ids = _ids(2, 40, seed=4)
    cfg = LtriConfig(mode="full") if mode == "full" else exact_config("ltri", 6)
    session = LtriSession(llama, cfg, batch_size=2)
    logits = session.feed(ids)
    assert logits.shape == (2, VOCAB)
    seq = ids
    for token in ([5, 9], [200, 3], [17, 17]):
        nxt = torch.tensor(token)
        logits = session.step(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        assert logits.shape == (2, VOCAB)
    torch.testing.assert_close(logits, reference_logits(llama, seq)[:, -1], atol=ATOL, rtol=0)
    assert session.num_tokens == 43
    with pytest.raises(ValueError, match="batch=2"):
        session.step(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="batch=2"):
        session.feed(torch.tensor([1, 2, 3]))  # 1-D means batch 1


def test_session_rejects_bad_config(llama) -> None:
    with pytest.raises(TypeError, match="LtriConfig"):
        LtriSession(llama, {"mode": "ltri"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        LtriSession(llama, exact_config("ltri", 5), batch_size=0)


def test_progress_bar_does_not_change_results(llama) -> None:
    ids = _ids(1, 40)
    a = LtriSession(llama, exact_config("ltri", 5), progress=True).feed(ids)
    b = LtriSession(llama, exact_config("ltri", 5)).feed(ids)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ failed forwards
def _bad(ids: torch.Tensor, at: int) -> torch.Tensor:
    bad = ids.clone()
    bad[:, at] = VOCAB + 44  # out of the embedding table: IndexError inside the model's forward
    return bad


@pytest.mark.parametrize("lookahead", [True, False])
def test_exception_in_forward_clears_the_plan(llama, lookahead: bool) -> None:
    ids = _ids(1, 70, seed=6)
    session = LtriSession(llama, exact_config("ltri", 5, lookahead=lookahead))
    session.feed(ids[:, :30])
    before = (session.num_tokens, session.cache.seen_tokens, session.cache.num_sinks, session.cache.window_len)
    # a single chunk (the look-ahead's dry pass fails first when enabled), and the first of several chunks
    for bad in (_bad(ids[:, 30:40], 7), _bad(ids[:, 30:60], 2)):
        with pytest.raises(IndexError):
            session.feed(bad)
        assert session.cache.plan is None
        assert (session.num_tokens, session.cache.seen_tokens, session.cache.num_sinks,
                session.cache.window_len) == before
    with pytest.raises(IndexError):
        session.step(torch.tensor([VOCAB]))
    assert session.cache.plan is None
    # later valid input still runs (no "begin_step called twice")
    logits = session.feed(ids[:, 30:60])
    assert logits.shape == (1, VOCAB) and torch.isfinite(logits).all()
    logits = session.step(ids[:, 60])
    assert logits.shape == (1, VOCAB) and torch.isfinite(logits).all()
    assert session.num_tokens == session.cache.seen_tokens == 61


def test_exception_in_full_mode_keeps_the_cache(llama) -> None:
    ids = _ids(1, 40, seed=7)
    session = LtriSession(llama, LtriConfig(mode="full"))
    session.feed(ids[:, :20])
    with pytest.raises(IndexError):
        session.feed(_bad(ids[:, 20:30], 4))
    out = session.feed(ids[:, 20:], return_all_logits=True)
    torch.testing.assert_close(out, reference_logits(llama, ids)[:, 20:], atol=ATOL, rtol=0)


def test_failed_forward_leaves_no_trace(llama) -> None:
    ids = _ids(1, 60, seed=0)
    cfg = LtriConfig(mode="infllm", num_sink_tokens=3, local_window=16, chunk_size=5, page_size=5, evict_stride=4,
                     block_size=4, budget=100_000)

    def run(fail: bool) -> tuple[torch.Tensor, dict[str, int]]:
        session = LtriSession(llama, cfg)
        session.feed(ids[:, :30])
        if fail:
            with pytest.raises(IndexError):
                session.feed(_bad(ids[:, 30:40], 3))
        return session.feed(ids[:, 30:], return_all_logits=True), session.usage()

    clean, clean_usage = run(False)
    failed, failed_usage = run(True)
    assert failed_usage == clean_usage
    torch.testing.assert_close(failed, clean, atol=ATOL, rtol=0)


def _fail_on_call(model: torch.nn.Module, layer: int, call: int):
    """Make decoder layer ``layer``'s MLP raise on its ``call``-th forward (1-based), after attention ran."""
    mlp = model.model.layers[layer].mlp
    original = mlp.forward
    count = [0]

    def maybe_boom(*args, **kwargs):
        count[0] += 1
        if count[0] == call:
            raise KeyboardInterrupt("interrupted")
        return original(*args, **kwargs)

    mlp.forward = maybe_boom
    return mlp


@pytest.mark.parametrize("family,lookahead,budget,call", [("llama", False, 100_000, 1), ("llama", True, 10, 1),
                                                          ("llama", True, 10, 2), ("gemma3", True, 100_000, 2)])
def test_exception_mid_forward_leaves_no_trace(family: str, lookahead: bool, budget: int, call: int) -> None:
    """An interrupt after some layers attended (staged changes) leaves the session as if the feed never ran.

    With look-ahead, ``call`` 1 fails the look-ahead pass and 2 the real pass after it (whose evidence is dropped).
    """
    model = tiny_model(family)
    ids = _ids(1, 60, seed=0)
    cfg = exact_config("ltri", 5, lookahead=lookahead, budget=budget, consensus_weight=0.5, final_chunk_size=5)
    clean, failed = LtriSession(model, cfg), LtriSession(model, cfg)
    clean.feed(ids[:, :30])
    failed.feed(ids[:, :30])
    mlp = _fail_on_call(model, 1, call)
    try:
        with pytest.raises(KeyboardInterrupt):
            failed.feed(ids[:, 30:35])
    finally:
        del mlp.forward
    _assert_same(_snapshot(clean), _snapshot(failed))
    assert [None if p is None else p.tolist() for p in clean.cache.consensus.prior] == \
        [None if p is None else p.tolist() for p in failed.cache.consensus.prior]
    out_clean = clean.feed(ids[:, 30:], return_all_logits=True)
    out_failed = failed.feed(ids[:, 30:], return_all_logits=True)
    torch.testing.assert_close(out_failed, out_clean, atol=0, rtol=0)
    if budget == 100_000:
        torch.testing.assert_close(out_failed, reference_logits(model, ids)[:, 30:], atol=ATOL, rtol=0)


def test_interrupted_feed_keeps_the_chunks_before_and_resumes(llama) -> None:
    """A feed that fails in its second chunk has read the first one (``num_tokens`` says so); resuming is exact."""
    ids = _ids(1, 60, seed=3)
    session = LtriSession(llama, exact_config("ltri", 5, lookahead=False, final_chunk_size=5))
    session.feed(ids[:, :30])
    mlp = _fail_on_call(llama, 0, 2)
    try:
        with pytest.raises(KeyboardInterrupt):
            session.feed(ids[:, 30:45])
    finally:
        del mlp.forward
    assert session.num_tokens == session.cache.seen_tokens == 35
    out = session.feed(ids[:, 35:], return_all_logits=True)
    torch.testing.assert_close(out, reference_logits(llama, ids)[:, 35:], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------ decode_retrieval_stride
@pytest.mark.parametrize("scheme", ["absolute", "contiguous", "fixed"])
def test_decode_retrieval_stride_reuse_is_exact_for_the_spans_it_holds(llama, scheme: str) -> None:
    """With every span retrieved (budget over the whole memory) a reused memory part is what a fresh retrieval
    would give, for each position scheme: decoding with stride 3 equals stride 1 token for token (and, with
    absolute positions, the unmodified model), while retrieving for fewer tokens."""
    ids = _ids(1, 60, seed=8)
    cfg = exact_config("ltri", 7, evict_stride=8, position_scheme=scheme)
    sessions = [LtriSession(llama, cfg), LtriSession(llama, cfg.replace(decode_retrieval_stride=3))]
    retrievals = [0, 0]
    for i, session in enumerate(sessions):
        for state in session.cache.states:
            if isinstance(state, GlobalLayerState):
                inner = state._slot_lists

                def counted(*args, _inner=inner, _i=i, **kwargs):
                    retrievals[_i] += 1
                    return _inner(*args, **kwargs)

                state._slot_lists = counted  # type: ignore[method-assign]
    logits = [s.feed(ids) for s in sessions]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    before = list(retrievals)
    seq = ids
    for token in [5, 9, 200, 3, 17, 17, 44, 90, 1, 250, 7, 7, 64, 128]:
        nxt = torch.tensor([token])
        logits = [s.step(nxt) for s in sessions]
        seq = torch.cat([seq, nxt[None]], dim=1)
        torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
    if scheme == "absolute":
        torch.testing.assert_close(logits[1], reference_logits(llama, seq)[:, -1], atol=ATOL, rtol=0)
    decode = [r - b for r, b in zip(retrievals, before)]
    layers = sum(isinstance(s, GlobalLayerState) for s in sessions[0].cache.states)
    assert decode[0] == 14 * layers  # stride 1: every token retrieves
    assert 14 / 3 * layers <= decode[1] < decode[0]  # stride 3: at most one in 3 between evictions


def test_decode_retrieval_stride_with_a_small_budget_and_a_failed_step(llama) -> None:
    """With a small budget the strided session still decodes (its own selection), a failed step changes nothing
    (the reuse counter included), and the config refuses a stride below 1."""
    ids = _ids(1, 80, seed=9)
    cfg = exact_config("ltri", 7, evict_stride=16, budget=12, position_scheme="contiguous",
                       decode_retrieval_stride=4)
    session = LtriSession(llama, cfg)
    session.feed(ids)
    session.step(torch.tensor([3]))
    state = next(s for s in session.cache.states if isinstance(s, GlobalLayerState))
    kept = state._decode_memory
    assert kept is not None and kept[1] == 1
    original = state.attend

    def failing(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("boom")

    state.attend = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        session.step(torch.tensor([4]))
    state.attend = original  # type: ignore[method-assign]
    assert state._decode_memory is kept  # the failed step neither used nor replaced it
    session.step(torch.tensor([4]))
    assert state._decode_memory[1] == 2 and state._decode_memory[2] is kept[2]
    with pytest.raises(ValueError, match="decode_retrieval_stride"):
        LtriConfig(decode_retrieval_stride=0)


def test_a_prompt_sizes_the_span_pool_once_and_changes_no_logit(monkeypatch) -> None:
    """Feeding a prompt sizes the span pool for it up front (the evicted tokens plus room for decoding, no doubling
    while reading), and the logits equal a session whose pool grows by doubling."""
    from ltri_rag.cache import LtriCache

    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, seed=3)
    cfg = LtriConfig(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=20, page_size=5,
                     evict_stride=6, span_min_len=2, span_max_len=8, attention_backend="torch")
    ids = _ids(1, 300, seed=5)
    sized = LtriSession(model, cfg)
    logits = sized.feed(ids)
    evicted = 300 - 16 - 3
    pages = -(-(evicted + max(4 * 6, evicted // 16)) // 5)
    assert sized.cache.pool._fast.capacity == pages
    monkeypatch.setattr(LtriCache, "expect_tokens", lambda self, n: None)
    doubling = LtriSession(model, cfg)
    torch.testing.assert_close(doubling.feed(ids), logits, atol=0, rtol=0)
    assert doubling.cache.pool._fast.capacity != pages
    for _ in range(5):
        token = logits.argmax(-1)
        logits = sized.step(token)
        torch.testing.assert_close(doubling.step(token), logits, atol=0, rtol=0)
