"""With every evicted span retrieved at its true position, ``infllm`` and ``ltri`` equal the unmodified model.

The local window is tiny (16 tokens) so most of the context really goes through eviction, span segmentation, the
paged pool and retrieval; lengths are not multiples of the chunk or page size.
"""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from ltri_rag.layer import GlobalLayerState
from tests.unit.tiny_models import FAMILIES, exact_config, reference_greedy, reference_logits, tiny_model
from tests.unit.tiny_models import random_ids as _ids

ATOL = 1e-4



@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["infllm", "ltri"])
@pytest.mark.parametrize("chunk_size,length,batch,kv_heads", [(7, 83, 1, 2), (16, 130, 2, 1), (5, 61, 2, 4)])
def test_prefill_logits_equal_full_attention(family: str, mode: str, chunk_size: int, length: int, batch: int,
                                             kv_heads: int) -> None:
    model = tiny_model(family, num_kv_heads=kv_heads)
    ids = _ids(batch, length)
    ref = reference_logits(model, ids)
    session = LtriSession(model, exact_config(mode, chunk_size), batch_size=batch)
    out = session.feed(ids, return_all_logits=True)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    # the context really went through the span memory
    assert session.usage()["memory_tokens"] >= length - 16 - 3 - chunk_size - 12
    states = [s for s in session.cache.states if isinstance(s, GlobalLayerState)]
    assert states and all(len(t) > 1 for s in states for t in s.tables)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["infllm", "ltri"])
def test_greedy_generation_token_for_token(family: str, mode: str) -> None:
    model = tiny_model(family, num_kv_heads=2)
    ids = _ids(2, 45, seed=3)
    expected = reference_greedy(model, ids, 24)
    session = LtriSession(model, exact_config(mode, 6), batch_size=2)
    logits = session.feed(ids)
    tokens = []
    for _ in range(24):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        logits = session.step(nxt)
    assert torch.equal(torch.stack(tokens, dim=1), expected)


@pytest.mark.parametrize("mode", ["streaming", "infllm", "ltri"])
def test_small_budget_differs_and_stays_bounded(mode: str) -> None:
    """A budget below the context must change the output (the test above is not vacuous) and bound the set."""
    model = tiny_model("llama")
    ids = _ids(1, 150)
    ref = reference_logits(model, ids)
    cfg = exact_config(mode, 8, budget=12)
    session = LtriSession(model, cfg)
    out = session.feed(ids, return_all_logits=True)
    assert (out - ref).abs().max() > 1e-2
    assert session.cache.retrieved_tokens() <= cfg.budget
    for state in session.cache.states:
        if isinstance(state, GlobalLayerState):
            assert state.win_k.shape[2] <= cfg.local_window + cfg.evict_stride + cfg.block_size


def test_full_mode_is_the_unmodified_model() -> None:
    model = tiny_model("qwen2")
    ids = _ids(1, 70)
    out = LtriSession(model, LtriConfig(mode="full")).feed(ids, return_all_logits=True)
    torch.testing.assert_close(out, reference_logits(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("scheme", ["contiguous", "absolute", "fixed"])
def test_position_schemes_while_nothing_is_evicted(scheme: str) -> None:
    """Before any eviction the memory part is the sinks alone. ``contiguous`` places them right before the window,
    where they were read, and ``absolute`` leaves them there: both exact. ``fixed`` moves the memory to position 0
    and the queries with it, which changes the logits (so the scheme's placement really runs here)."""
    model = tiny_model("llama")
    ids = _ids(1, 40)
    cfg = LtriConfig(mode="ltri", num_sink_tokens=3, local_window=64, chunk_size=9, position_scheme=scheme)
    out = LtriSession(model, cfg).feed(ids, return_all_logits=True)
    ref = reference_logits(model, ids)
    if scheme == "fixed":
        assert (out - ref).abs().max() > 1e-3
    else:
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_sliding_window_mistral_is_exact() -> None:
    model = tiny_model("mistral", sliding_window=10)
    ids = _ids(2, 57)
    out = LtriSession(model, exact_config("ltri", 6), batch_size=2).feed(ids, return_all_logits=True)
    torch.testing.assert_close(out, reference_logits(model, ids), atol=ATOL, rtol=0)


def test_bfloat16_close_to_reference() -> None:
    model = tiny_model("qwen2").to(torch.bfloat16)
    ids = _ids(1, 90)
    ref = reference_logits(model, ids).float()
    out = LtriSession(model, exact_config("ltri", 8)).feed(ids, return_all_logits=True).float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_per_kv_head_scope_and_voting_are_exact_with_full_budget() -> None:
    model = tiny_model("llama", num_kv_heads=2)
    ids = _ids(1, 100)
    cfg = exact_config("ltri", 7, retrieval_scope="per_kv_head", voting=True, persistence=True)
    out = LtriSession(model, cfg).feed(ids, return_all_logits=True)
    torch.testing.assert_close(out, reference_logits(model, ids), atol=ATOL, rtol=0)


def test_session_rejects_bad_input() -> None:
    model = tiny_model("llama")
    session = LtriSession(model, exact_config("ltri", 4), batch_size=2)
    with pytest.raises(ValueError, match="batch=2"):
        session.feed(_ids(3, 10))
    with pytest.raises(TypeError, match="integer tensor"):
        session.feed(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="empty"):
        session.feed(torch.zeros(2, 0, dtype=torch.int64))
