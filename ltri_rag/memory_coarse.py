"""The coarse stage of a :class:`~ltri_rag.memory.KVMemory` query: which documents to read when they do not all fit.

When the candidate documents hold more than ``max_memory_tokens`` tokens, only some are imported into the session
that reads the question. Choosing them used to be a FAISS search with the question's *mean* query per layer (each KV
head's query group averaged, the question's tokens averaged) against every span's best index vector. Measured on 40
documents (16 SQuAD articles, 12 essays, 12 Austen chapters, 55K tokens) with Qwen2.5-Coder-0.5B, that ranking was
at chance: the answer's article came first for 1 of 48 questions, mean reciprocal rank 0.11 / 0.13 on the
development / held-out questions (chance: 0.11) (``benchmarks/results/coarse_stage_cpu_qwen``). Averaging queries
before the softmax throws away what makes attention selective.

:class:`CoarseScorer` scores documents the way the in-model stage scores spans, only without importing K/V: every
query head and token of the question (read alone after the sink prefix, positions removed) against every stored
index vector of the candidate documents, per layer, with :func:`~ltri_rag.kernels.scoring.span_probabilities` (a
softmax over spans, each span scored by its best vector, averaged over the question's tokens), then the heads'
mean. A document's score in a layer is its spans' share of that distribution beyond the neutral question's share
(``max(p_q(doc) - p_0(doc), 0)``, plus :data:`~ltri_rag.memory_query.EXCESS_TIE_WEIGHT` of ``p_q(doc)`` to order
documents without excess), summed over layers. On the same 48 questions: answer's article first for 18 / 13 of 24,
in the first 3 for 22 / 22, MRR 0.83 / 0.73 (development / held-out), the scoring chosen among five on the
development questions.

The index vectors are read from the store once per document and kept (on the model's device) up to a byte budget;
when the store's vectors exceed it, the FAISS search is used instead.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ltri_rag.kernels.scoring import span_probabilities
from ltri_rag.memory_query import EXCESS_TIE_WEIGHT
from ltri_rag.store import DocumentInfo, SpanStore

__all__ = ["CoarseScorer"]

DocKey = tuple[str, str, object]  # (collection, doc_id, created): a replaced document is another key


@dataclass(frozen=True)
class _DocVectors:
    """One document's index vectors per layer: ``vectors [n, Hkv, D]`` float32, ``owner [n]`` span of each vector
    (document-local), span count."""

    vectors: dict[int, torch.Tensor]
    owner: dict[int, torch.Tensor]
    num_spans: dict[int, int]
    nbytes: int


def document_key(doc: DocumentInfo) -> DocKey:
    return doc.collection, doc.doc_id, doc.created


class CoarseScorer:
    """Ranks stored documents by the attention a question pays their index vectors beyond a neutral question's.

    Args:
        store: The memory's store.
        layers: The model's global layers.
        scaling: The attention's score multiplier.
        device: Where the vectors are kept and scored (the model's device).
        max_bytes: Budget of the kept vectors; :meth:`usable` says whether a store fits it.
    """

    def __init__(self, store: SpanStore, layers: Sequence[int], scaling: float, device: torch.device,
                 max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"coarse_bytes must be an int >= 0, got {max_bytes!r}")
        self.store, self.layers, self.scaling, self.device, self.max_bytes = store, list(layers), scaling, device, \
            max_bytes
        self._docs: OrderedDict[DocKey, _DocVectors] = OrderedDict()
        self._bytes = 0
        # the neutral question's shares per layer for the last candidate set: (its keys, the queries, shares)
        self._neutral_shares: tuple[tuple, dict | None, dict[int, torch.Tensor]] = ((), None, {})

    def usable(self, num_kv_heads: int, head_dim: int) -> bool:
        """Whether every stored index vector fits the byte budget (else the caller searches FAISS)."""
        return self.store.stats().vectors * num_kv_heads * head_dim * 4 <= self.max_bytes

    def _vectors(self, doc: DocumentInfo) -> _DocVectors:
        key = document_key(doc)
        entry = self._docs.get(key)
        if entry is not None:
            self._docs.move_to_end(key)
            return entry
        vectors, owner, num_spans, nbytes = {}, {}, {}, 0
        for layer in self.layers:
            spans = self.store.load_spans(doc.doc_id, layer, collection=doc.collection)
            vectors[layer] = spans.vectors.to(self.device, torch.float32)
            owner[layer] = spans.owner.to(self.device, torch.int64)
            num_spans[layer] = len(spans.spans)
            nbytes += vectors[layer].numel() * 4 + owner[layer].numel() * 8
        entry = _DocVectors(vectors, owner, num_spans, nbytes)
        self._docs[key] = entry
        self._bytes += nbytes
        while self._bytes > self.max_bytes and len(self._docs) > 1:  # least recently used first
            _, old = self._docs.popitem(last=False)
            self._bytes -= old.nbytes
        return entry

    def _layer_table(self, entries: list[_DocVectors], layer: int) -> tuple[torch.Tensor, ...]:
        """The candidates' spans of one layer as one table: ``(vectors [n, Hkv, D], owner [n], span_doc [S])``."""
        counts = [e.num_spans[layer] for e in entries]
        offsets = torch.tensor([0] + counts[:-1], device=self.device).cumsum(0)
        vectors = torch.cat([e.vectors[layer] for e in entries])
        owner = torch.cat([e.owner[layer] + offsets[i] for i, e in enumerate(entries)])
        span_doc = torch.repeat_interleave(torch.arange(len(entries), device=self.device),
                                           torch.tensor(counts, device=self.device))
        return vectors, owner, span_doc

    def _shares(self, table: tuple[torch.Tensor, ...], num_docs: int, queries: torch.Tensor) -> torch.Tensor:
        """``[num_docs]`` float64: each document's share of the heads' mean attention of ``queries`` ``[H, Q, D]``
        over the table's spans."""
        vectors, owner, span_doc = table
        shares = torch.zeros(num_docs, device=self.device, dtype=torch.float64)
        if span_doc.numel() == 0:
            return shares
        probs = span_probabilities(queries.to(self.device, torch.float32), vectors, owner, span_doc.numel(),
                                   self.scaling)
        return _segment_sums(probs.mean(0).to(torch.float64), span_doc, num_docs)

    @torch.inference_mode()
    def rank(self, docs: Sequence[DocumentInfo], question: dict[int, torch.Tensor],
             neutral: dict[int, torch.Tensor]) -> list[tuple[DocumentInfo, float]]:
        """``docs`` best first with their scores (ties: collection, then id).

        Args:
            docs: The candidate documents.
            question: ``{layer: [H, Q, D]}`` the question's position-free queries.
            neutral: ``{layer: [H, N, D]}`` the neutral question's.
        """
        if not docs:
            return []
        entries = [self._vectors(doc) for doc in docs]
        keys = tuple(document_key(doc) for doc in docs)
        held_keys, held_neutral, _ = self._neutral_shares
        if held_keys != keys or held_neutral is not neutral:  # the neutral question's shares: once per candidate set
            self._neutral_shares = (keys, neutral, {})
        neutral_shares = self._neutral_shares[2]
        score = torch.zeros(len(docs), dtype=torch.float64, device=self.device)
        for layer in self.layers:
            if layer not in question or layer not in neutral:
                continue
            table = self._layer_table(entries, layer)
            p_q = self._shares(table, len(docs), question[layer])
            if layer not in neutral_shares:
                neutral_shares[layer] = self._shares(table, len(docs), neutral[layer])
            p_0 = neutral_shares[layer]
            score += (1.0 - EXCESS_TIE_WEIGHT) * (p_q - p_0).clamp(min=0) + EXCESS_TIE_WEIGHT * p_q
        values = score.cpu().tolist()
        order = sorted(range(len(docs)), key=lambda i: (-values[i], docs[i].collection, docs[i].doc_id))
        return [(docs[i], values[i]) for i in order]


def _segment_sums(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """``[num_segments]`` sums of ``values [S]`` per ``segment [S]`` (non-decreasing ids), each added in a fixed
    order (a padded ``[num_segments, longest]`` table summed along its rows): an ``index_add_`` on CUDA adds in an
    order that varies from run to run, so its rounding, and a near-tie between two documents, would too."""
    counts = torch.bincount(segment, minlength=num_segments)  # [N]
    starts = torch.cumsum(counts, 0) - counts
    longest = int(counts.max()) if counts.numel() else 0
    step = torch.arange(longest, device=values.device)[None, :]
    index = (starts[:, None] + step).clamp(max=max(values.numel() - 1, 0))
    return torch.where(step < counts[:, None], values[index], 0.0).sum(1)
