"""On CUDA: greedy decoding one step ahead (:func:`ltri_rag.generation.decoded_tokens`, what ``generate`` runs
there) chooses the tokens one step at a time chooses, with decode steps replayed as CUDA graphs, and leaves the
same state. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from ltri_rag.generation import decoded_tokens
from tests.unit.tiny_models import random_ids, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("config", [
    LtriConfig(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=20, page_size=5,
               evict_stride=24, span_max_len=8, attention_backend="triton"),
    LtriConfig(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=20, page_size=5,
               evict_stride=6, span_max_len=8, decode_retrieval_stride=4, attention_backend="triton"),
    LtriConfig(mode="full")], ids=["ltri-retrieving-replays", "ltri-stride4", "full"])
def test_decoding_ahead_equals_one_step_at_a_time_on_cuda(config) -> None:
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, seed=3).cuda()
    ids = random_ids(1, 45, seed=11).cuda()
    runs = {}
    for ahead in (False, True):
        session = LtriSession(model, config)
        logits = session.feed(ids)[0]
        runs[ahead] = (list(decoded_tokens(session, logits, 60, ahead=ahead)), session)
    (want, plain), (got, ahead) = runs[False], runs[True]
    assert got == want and len(got) == 60
    assert ahead.num_tokens == plain.num_tokens == 45 + 59
    if config.mode == "full":
        return
    graph = ahead.decode_graph
    assert graph is not None and graph.replays >= 30 and graph.replays == plain.decode_graph.replays
    for a, b in zip(plain.cache.global_states, ahead.cache.global_states):
        torch.testing.assert_close(b.win_k, a.win_k, atol=0, rtol=0)
        for ta, tb in zip(a.tables, b.tables):
            assert len(ta) == len(tb)
