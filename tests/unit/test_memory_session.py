"""What the span memory keeps across a text's end: pinning the question's spans while decoding (within or on
top of the budget), and flushing a text into the memory, exporting it and importing it into another session."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from ltri_rag.layer import GlobalLayerState
from tests.unit.tiny_models import random_ids as _ids
from tests.unit.tiny_models import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_pin_prompt_spans_keeps_the_question_selection_while_decoding(llama, monkeypatch) -> None:
    """With ``pin_prompt_spans`` every decode step of every layer still holds the spans that layer retrieved for
    the prompt's last pass; without it the decode steps choose afresh."""
    kept: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    original = GlobalLayerState._select

    def recording(self, seq, table, q_free, scaling, plan, *rest):
        selected = original(self, seq, table, q_free, scaling, plan, *rest)
        if plan.decode:
            kept.append((self.layer_idx, selected.any(dim=0).cpu(), self.prompt_selection[seq].cpu()))
        return selected

    monkeypatch.setattr(GlobalLayerState, "_select", recording)
    results = {}
    for pin in (False, True):
        kept.clear()
        cfg = LtriConfig(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=12, page_size=5,
                         evict_stride=64, span_min_len=2, span_max_len=6, pin_prompt_spans=pin)
        session = LtriSession(llama, cfg)
        logits = session.feed(_ids(1, 90))
        for _ in range(6):
            logits = session.step(logits.argmax(-1))
        assert kept, "decode steps should retrieve"
        results[pin] = [bool((prompt & ~now[: prompt.numel()]).any()) for _, now, prompt in kept]
    assert not any(results[True])  # nothing the question retrieved was dropped
    assert any(results[False])  # (and without pinning some of it was: the test can tell them apart)


def test_pin_extra_budget_keeps_the_question_selection_on_top_of_the_budget(llama, monkeypatch) -> None:
    """With ``pin_extra_budget`` the decode steps keep every span of the prompt's last pass and still fill the
    whole budget by their own retrieval: the working set exceeds the budget by at most the pinned tokens, and does
    exceed it (pinned spans within the budget, the default, never do)."""
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    original = GlobalLayerState._select

    def recording(self, seq, table, q_free, scaling, plan, *rest):
        selected = original(self, seq, table, q_free, scaling, plan, *rest)
        if plan.decode:
            steps.append((selected.any(dim=0).cpu(), self.prompt_selection[seq].cpu(), table.lengths.cpu()))
        return selected

    monkeypatch.setattr(GlobalLayerState, "_select", recording)
    budget = 12
    over = {}
    for extra in (False, True):
        steps.clear()
        cfg = LtriConfig(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=budget, page_size=5,
                         evict_stride=64, span_min_len=2, span_max_len=6, pin_prompt_spans=True,
                         pin_extra_budget=extra)
        session = LtriSession(llama, cfg)
        logits = session.feed(_ids(1, 90))
        for _ in range(6):
            logits = session.step(logits.argmax(-1))
        assert steps, "decode steps should retrieve"
        over[extra] = []
        for now, prompt, lengths in steps:
            prompt = torch.cat([prompt, torch.zeros(now.numel() - prompt.numel(), dtype=torch.bool)])
            assert not (prompt & ~now).any()  # nothing the question retrieved was dropped
            tokens, pinned_tokens = int(lengths[now].sum()), int(lengths[prompt].sum())
            assert tokens <= budget + (pinned_tokens if extra else 0)
            over[extra].append(tokens > budget)
    assert not any(over[False]) and any(over[True])
    with pytest.raises(TypeError, match="pin_extra_budget"):
        LtriConfig(mode="ltri", pin_extra_budget=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["ltri", "infllm"])
def test_flush_export_import_equals_reading_on(llama, mode) -> None:
    """A document read after a sink prefix and flushed into the span memory, exported and imported into a session
    that read only the sink prefix, answers a question exactly as the session that read the document: the span
    memory, its tokens' positions and the position counter travel whole."""
    sinks, doc, question = _ids(1, 4), _ids(1, 70)[:, 4:], _ids(1, 90)[:, 70:]
    cfg = LtriConfig(mode=mode, num_sink_tokens=4, local_window=16, chunk_size=8, budget=12, page_size=5,
                     evict_stride=4, span_min_len=2, span_max_len=6)
    reader = LtriSession(llama, cfg)
    reader.feed(sinks)  # read apart, as an ingest does (the same chunk shapes give the same sink K/V bits)
    reader.feed(doc)
    window = reader.cache.window_len
    assert reader.flush() == window > 0 and reader.cache.window_len == 0
    assert reader.cache.memory_tokens() == doc.shape[1]  # every document token is in the span memory
    memory = reader.export_memory()
    assert memory.positions.tolist() == list(range(4, 4 + doc.shape[1]))
    fresh = LtriSession(llama, cfg)
    fresh.feed(sinks)
    assert fresh.import_memory(memory) == 0 and fresh.num_tokens == reader.num_tokens
    torch.testing.assert_close(fresh.feed(question), reader.feed(question), rtol=0, atol=0)
    for _ in range(3):
        token = reader.step(torch.tensor([7]))
        torch.testing.assert_close(fresh.step(torch.tensor([7])), token, rtol=0, atol=0)
    # a second document after the first: export from its first slot only
    second = LtriSession(llama, cfg)
    second.feed(sinks)
    second.import_memory(memory)
    first_slot = second.cache.memory_tokens()
    second.feed(question)
    second.flush()
    part = second.export_memory(first_slot)
    assert part.positions.tolist() == list(range(4 + doc.shape[1], 4 + doc.shape[1] + question.shape[1]))
    with pytest.raises(ValueError, match="flush first"):
        reader.import_memory(part)


def test_flush_needs_a_span_memory(llama) -> None:
    session = LtriSession(llama, LtriConfig(mode="streaming", num_sink_tokens=4, local_window=16, chunk_size=8))
    session.feed(_ids(1, 30))
    with pytest.raises(ValueError, match="span memory"):
        session.flush()
