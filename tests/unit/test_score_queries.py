"""``LtriConfig.score_queries``: span scoring reads an evenly spaced subsample of a long chunk's queries."""

from __future__ import annotations

import pytest
import torch

import ltri_rag.layer as layer_module
from ltri_rag import LtriConfig, LtriSession
from ltri_rag.memory_fingerprint import config_from_fingerprint, memory_fingerprint
from ltri_rag.memory_ingest import sink_prefix_ids
from ltri_rag.retrieval import scored_queries
from tests.unit.tiny_models import random_ids, tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("q_len,limit", [(5, 4), (8, 4), (9, 4), (2048, 256), (2049, 256), (300, 256), (7, 1)])
def test_subsample_is_evenly_spaced_and_ends_at_the_last_query(q_len: int, limit: int) -> None:
    picks = scored_queries(q_len, LtriConfig(score_queries=limit))
    assert picks is not None and picks.dtype == torch.int64
    assert picks.numel() == limit
    assert int(picks[-1]) == q_len - 1 and int(picks[0]) >= 0
    gaps = picks.diff()
    assert bool((gaps >= 1).all())  # increasing, no query twice
    if limit > 1:
        assert int(gaps.max()) - int(gaps.min()) <= 1  # as even as whole numbers allow
    assert int(picks[0]) <= q_len // limit  # spread over the whole chunk, not bunched at its end


@pytest.mark.parametrize("config", [LtriConfig(score_queries=256), LtriConfig(score_queries=None),
                                    LtriConfig(mode="infllm", score_queries=4)])
def test_short_passes_unlimited_and_dot_scoring_read_every_query(config: LtriConfig) -> None:
    assert scored_queries(256 if config.score_queries else 5000, config) is None
    if config.mode == "infllm":  # dot scoring reads the chunk's mean query: nothing to save
        assert scored_queries(5000, config) is None


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_values_are_refused_by_name(bad, error) -> None:
    with pytest.raises(error, match="score_queries"):
        LtriConfig(score_queries=bad)


def _config(**changes) -> LtriConfig:
    base = {"num_sink_tokens": 3, "local_window": 16, "chunk_size": 12, "final_chunk_size": 4, "budget": 10,
            "page_size": 5, "evict_stride": 4, "span_min_len": 2, "span_max_len": 8, "lookahead": False}
    return LtriConfig(**{**base, **changes})


def test_the_engine_scores_exactly_the_subsampled_queries(llama, monkeypatch) -> None:
    """A session limited to 5 scored queries gives the same logits as an unlimited session whose scorer is handed
    the same 5 queries of each pass (so the subsample is the right queries, rotated from their own positions), and
    the small budget makes the selection matter: scoring every query gives other logits."""
    ids = random_ids(1, 70, seed=4)
    real = layer_module.span_probabilities
    seen: list[int] = []
    explicit_limit = _config(score_queries=5)

    def recorded(queries, *args, **kwargs):
        seen.append(queries.shape[1])
        return real(queries, *args, **kwargs)

    def subsampling(queries, *args, **kwargs):
        picks = scored_queries(queries.shape[1], explicit_limit)
        seen.append(queries.shape[1])
        return real(queries if picks is None else queries[:, picks], *args, **kwargs)

    monkeypatch.setattr(layer_module, "span_probabilities", recorded)
    limited = LtriSession(llama, _config(score_queries=5)).feed(ids)
    limited_seen, seen[:] = list(seen), []
    monkeypatch.setattr(layer_module, "span_probabilities", subsampling)
    explicit = LtriSession(llama, _config(score_queries=None)).feed(ids)
    explicit_seen, seen[:] = list(seen), []
    monkeypatch.setattr(layer_module, "span_probabilities", recorded)
    every = LtriSession(llama, _config(score_queries=None)).feed(ids)

    assert set(limited_seen) == {5, 4}  # 12-token chunks read 5 queries; the 4-token final chunk all of its own
    assert 12 in explicit_seen and 12 in seen
    torch.testing.assert_close(limited, explicit, atol=0, rtol=0)
    assert not torch.equal(limited, every)


def test_stores_written_before_the_field_existed_open_with_every_query_scored(llama) -> None:
    """A store's fingerprint written without ``config.score_queries`` reads back as ``score_queries=None`` (what
    ingest then did), and the fingerprint of that config matches the old one; the new default is named as a
    difference."""
    tok = tiny_tokenizer()
    config = _config(score_queries=None)
    sinks = sink_prefix_ids(tok, config.num_sink_tokens)
    old = memory_fingerprint(llama, tok, config, sinks)  # at the legacy value the key is left out, as before
    assert "config.score_queries" not in old and "config.span_max_len" in old
    assert config_from_fingerprint(old).score_queries is None
    assert old.diff(memory_fingerprint(llama, tok, config_from_fingerprint(old), sinks)) == {}
    new = memory_fingerprint(llama, tok, _config(), sinks)
    assert old.diff(new) == {"config.score_queries": (None, 256)}


def test_scored_rows_made_once_per_pass_and_equal_to_a_fresh_computation() -> None:
    """Every layer of a pass gets the same device tensors (``StepPlan.shared``); a new pass computes its own; a
    graph-form step (positions on the device) keeps nothing."""
    from ltri_rag.layer import StepPlan
    from ltri_rag.pass_rows import scored_rows

    cfg = LtriConfig(score_queries=4)
    plan = StepPlan(pos0=100, q_len=10, num_to_sinks=0, num_evict=0, first_slot=0)
    picks, back = scored_rows(torch.device("cpu"), plan, cfg)
    again = scored_rows(torch.device("cpu"), plan, cfg)
    assert again[0] is picks and again[1] is back
    want = scored_queries(10, cfg)
    assert torch.equal(picks, want) and torch.equal(back, -(100 + want))
    other = StepPlan(pos0=110, q_len=10, num_to_sinks=0, num_evict=0, first_slot=0)
    assert torch.equal(scored_rows(torch.device("cpu"), other, cfg)[1], -(110 + want))
    fresh = StepPlan(pos0=100, q_len=10, num_to_sinks=0, num_evict=0, first_slot=0)
    none, back_all = scored_rows(torch.device("cpu"), fresh, LtriConfig(score_queries=None))  # every query
    assert none is None and torch.equal(back_all, -torch.arange(100, 110))
    step = StepPlan(pos0=7, q_len=1, num_to_sinks=0, num_evict=0, first_slot=0, decode=True, graph=True)
    picks1, back1 = scored_rows(torch.device("cpu"), step, cfg, position=torch.tensor([7]))
    assert picks1 is None and torch.equal(back1, torch.tensor([-7])) and not step.shared
