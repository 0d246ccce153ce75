"""``LtriConfig.evict_stride``: how far a decoded sequence's window may grow past ``local_window`` before its oldest
tokens go to the span memory (a prompt pass evicts whatever is over at once)."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from tests.unit.tiny_models import random_ids as _ids
from tests.unit.tiny_models import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("stride", [1, 4])
def test_evict_stride_changes_nothing_before_the_first_decode_eviction(llama, stride: int) -> None:
    """``evict_stride`` only matters once a decoded sequence's window has grown that far past ``local_window``: two
    sessions that differ in it alone give the same logits, bit for bit, for the first ``evict_stride - 1`` decoded
    tokens (a prompt pass evicts whatever is over at once, whatever the setting), and the same memory; the next
    token evicts in one session only."""
    cfg = LtriConfig(mode="ltri", num_sink_tokens=4, local_window=24, chunk_size=16, budget=12, page_size=4,
                     span_min_len=2, span_max_len=8, evict_stride=8, decode_retrieval_stride=stride,
                     attention_backend="torch")
    sessions = [LtriSession(llama, cfg), LtriSession(llama, cfg.replace(evict_stride=32))]
    ids = _ids(1, 70, seed=21)
    logits = [s.feed(ids) for s in sessions]
    torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)
    assert sessions[0].cache.memory_tokens() == sessions[1].cache.memory_tokens() > 0
    for _ in range(cfg.evict_stride - 1):
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in sessions]
        torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)
    assert sessions[0].cache.memory_tokens() == sessions[1].cache.memory_tokens()
    token = logits[0].argmax(-1)
    for s in sessions:
        s.step(token)
    assert sessions[0].cache.memory_tokens() == sessions[1].cache.memory_tokens() + cfg.evict_stride
