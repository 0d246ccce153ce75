"""The coarse stage (``ltri_rag.memory_coarse``): documents ranked by the question's attention over their index
vectors beyond the neutral question's, checked against an independent computation; its vector cache; and the FAISS
fall-back past ``coarse_bytes``. (Its accuracy on real text: ``benchmarks/results/coarse_stage_cpu_qwen``.)"""

from __future__ import annotations

import pytest
import torch

from ltri_rag.memory_coarse import CoarseScorer
from ltri_rag.memory_query import EXCESS_TIE_WEIGHT, NEUTRAL_QUESTION, documents_of_hits, question_queries
from tests.unit.test_kvmemory import DOCS, _add_all, _create, llama, tok  # noqa: F401  (fixtures)


def _reference_scores(mem, docs, question: str) -> dict[str, float]:
    """The coarse score of each document, spelled out: per layer and query head and token, a softmax over every
    span of the candidates (a span's logit: its best vector's), averaged; heads averaged; a document's share minus
    the neutral question's share, clamped, plus the tie weight of its share; summed over layers."""
    q_ids = mem._question_ids(question)
    queries = {"q": question_queries(mem.model, mem.config, mem.sink_ids, q_ids),
               "0": question_queries(mem.model, mem.config, mem.sink_ids, mem._question_ids(NEUTRAL_QUESTION))}
    scores = {d.doc_id: 0.0 for d in docs}
    for layer in mem.global_layers:
        shares = {}
        for name, qs in queries.items():
            q = qs[layer].float()  # [H, Q, D]
            heads = q.shape[0]
            group = heads // mem.num_kv_heads
            logits, owners = [], []
            for doc in docs:
                spans = mem.store.load_spans(doc.doc_id, layer, collection=doc.collection)
                for span in range(len(spans.spans)):
                    vecs = spans.vectors[spans.owner == span].float()  # [n, Hkv, D]
                    per_head = torch.stack([q[h] @ vecs[:, h // group].T for h in range(heads)])  # [H, Q, n]
                    logits.append(per_head.max(dim=-1).values * mem.scaling)  # [H, Q]
                    owners.append(doc.doc_id)
            probs = torch.softmax(torch.stack(logits, dim=-1).double(), dim=-1).mean(dim=1).mean(dim=0)  # [S]
            share = {d.doc_id: 0.0 for d in docs}
            for p, owner in zip(probs.tolist(), owners):
                share[owner] += p
            shares[name] = share
        for doc_id in scores:
            p_q, p_0 = shares["q"][doc_id], shares["0"][doc_id]
            scores[doc_id] += (1 - EXCESS_TIE_WEIGHT) * max(p_q - p_0, 0.0) + EXCESS_TIE_WEIGHT * p_q
    return scores


def test_ranking_equals_the_spelled_out_scores(tmp_path, llama, tok) -> None:
    with _create(tmp_path / "m", llama, tok) as mem:
        _add_all(mem)
        docs = mem._documents(None, None)
        for question in ("Where does the Seine flow?", "What does the fox jump over?"):
            expected = _reference_scores(mem, docs, question)
            question_q = question_queries(mem.model, mem.config, mem.sink_ids, mem._question_ids(question))
            neutral_q = question_queries(mem.model, mem.config, mem.sink_ids, mem._question_ids(NEUTRAL_QUESTION))
            ranked = mem._coarse.rank(docs, question_q, neutral_q)
            assert [d.doc_id for d, _ in ranked] == sorted(expected, key=lambda d: (-expected[d], d))
            for doc, score in ranked:
                assert score == pytest.approx(expected[doc.doc_id], rel=2e-4, abs=1e-7)  # float32 scoring
            with mem._lock:
                order = mem._coarse_order(mem._question_ids(question), docs, None, None)
            assert [d.doc_id for d in order] == [d.doc_id for d, _ in ranked]


def test_vectors_are_read_once_and_a_replaced_document_again(tmp_path, llama, tok, monkeypatch) -> None:
    with _create(tmp_path / "m", llama, tok) as mem:
        _add_all(mem)
        reads = []
        original = mem.store.load_spans

        def counted(doc_id, layer, **kwargs):
            reads.append(doc_id)
            return original(doc_id, layer, **kwargs)

        monkeypatch.setattr(mem.store, "load_spans", counted)
        ids = mem._question_ids("Where does the Seine flow?")
        with mem._lock:
            mem._coarse_order(ids, mem._documents(None, None), None, None)
            first = len(reads)
            assert first == len(DOCS) * len(mem.global_layers)
            mem._coarse_order(ids, mem._documents(None, None), None, None)
            assert len(reads) == first  # kept
        mem.add_documents(["The Rhone flows south to the Mediterranean."], ids=["paris"], progress=False)  # replace
        with mem._lock:
            mem._coarse_order(ids, mem._documents(None, None), None, None)
        assert reads[first:] == ["paris"] * len(mem.global_layers)


def test_a_small_budget_evicts_and_past_the_store_falls_back_to_faiss(tmp_path, llama, tok) -> None:
    with _create(tmp_path / "m", llama, tok, max_memory_tokens=100) as mem:
        _add_all(mem)
        docs = mem._documents(None, None)
        one_doc = mem._coarse._vectors(docs[0]).nbytes
        scorer = CoarseScorer(mem.store, mem.global_layers, mem.scaling, torch.device("cpu"), one_doc)
        for doc in docs:
            scorer._vectors(doc)
        # the most recent kept (even when it alone is over the budget: the query being ranked needs it)
        assert list(scorer._docs) == [(docs[-1].collection, docs[-1].doc_id, docs[-1].created)]
        assert not scorer.usable(mem.num_kv_heads, mem.head_dim)
    with _create(tmp_path / "f", llama, tok, max_memory_tokens=100, coarse_bytes=1) as mem:
        _add_all(mem)
        ids = mem._question_ids("Where does the Seine flow?")
        with mem._lock:
            order = mem._coarse_order(ids, mem._documents(None, None), None, None)
        faiss = documents_of_hits(mem._documents(None, None), mem._coarse_hits(ids, None, None))
        assert [d.doc_id for d in order] == [d.doc_id for d in faiss]
        assert len(mem.generate("Where does the Seine flow?", max_new_tokens=1).documents) == 1
    with pytest.raises(ValueError, match="coarse_bytes must be an int >= 0"):
        _create(tmp_path / "bad", llama, tok, coarse_bytes=-1)


def test_segment_sums_equal_the_scattered_sums() -> None:
    """Per-document sums in a fixed order equal index_add_'s, with empty documents between and after."""
    from ltri_rag.memory_coarse import _segment_sums

    gen = torch.Generator().manual_seed(3)
    segment = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 5])
    values = torch.rand(segment.numel(), generator=gen, dtype=torch.float64)
    want = torch.zeros(7, dtype=torch.float64).index_add_(0, segment, values)
    torch.testing.assert_close(_segment_sums(values, segment, 7), want, rtol=1e-12, atol=1e-12)
    assert _segment_sums(values[:0], segment[:0], 2).tolist() == [0.0, 0.0]
