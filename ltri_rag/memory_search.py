"""The search half of :class:`~ltri_rag.memory.KVMemory`: which stored spans the model attends to for a question.

:class:`MemorySearch` holds :meth:`~MemorySearch.retrieve`, :meth:`~MemorySearch.retrieve_by_layer` and the steps
they share with answering (choosing the candidate documents, importing their span memory into a session after the
sink prefix). ``KVMemory`` inherits it; the attributes it reads are set by ``KVMemory.__init__``.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, nullcontext
from typing import Any

import torch
from torch import nn

from ltri_rag.cache import LtriCache, MemoryExport
from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession
from ltri_rag.layer import GlobalLayerState
from ltri_rag.memory_cache import CacheInfo, DocumentCache
from ltri_rag.memory_coarse import CoarseScorer
from ltri_rag.memory_ingest import check_collection, load_document_memory
from ltri_rag.memory_query import (
    NEUTRAL_QUESTION,
    Placement,
    QueryRecorder,
    aggregate_hits,
    choose_ranked,
    documents_of_hits,
    query_vectors,
    question_queries,
    read_neutral,
    recording_session,
    session_hits,
)
from ltri_rag.store import DocumentInfo, SpanHit, SpanRecord, SpanStore

__all__ = ["MemorySearch", "hits_per_layer"]

_Loaded = tuple[MemoryExport, dict[int, tuple[SpanRecord, ...]]]  # a document's span memory and spans per layer


def hits_per_layer(k: int) -> int:
    """How many of each layer's best spans :meth:`MemorySearch.retrieve` merges into its ``k`` regions."""
    return max(4 * k, 16)


class MemorySearch:
    """Question -> stored spans, over the store, model and configuration of a ``KVMemory``."""

    store: SpanStore
    model: nn.Module
    tokenizer: Any
    config: LtriConfig
    sink_ids: torch.Tensor
    num_kv_heads: int
    head_dim: int
    scaling: float
    max_memory_tokens: int
    ranking: str
    global_layers: list[int]
    kv_dtype: torch.dtype
    document_cache: DocumentCache
    prefetch: int
    _prefetch_pool: ThreadPoolExecutor | None
    _lock: threading.RLock
    _coarse: CoarseScorer | None
    _neutral_queries: dict[int, torch.Tensor] | None

    def _question_ids(self, text: str) -> torch.Tensor:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the question must be a non-empty string, got {text!r:.60}")
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        if ids.numel() == 0:
            raise ValueError(f"the question encodes to no tokens: {text!r:.60}")
        return ids

    def retrieve(self, query: str, k: int = 4, *, filter: Mapping[str, Any] | None = None,
                 collection: str | None = None, max_memory_tokens: int | None = None) -> list[SpanHit]:
        """The stored spans the model attends to when it reads ``query`` after the documents, best first, merged
        across layers into distinct regions of documents (see :mod:`ltri_rag.memory_query` for the scoring).

        The candidate documents (``collection`` and ``filter``) are imported into a session after the sink prefix, all
        of them when they hold at most ``max_memory_tokens`` tokens, else those the store's FAISS search ranks first.

        Args:
            query: The question text (read as plain text).
            k: Most regions to return.
            filter: Metadata equality (every key present and equal).
            collection: Only this collection; ``None`` searches every collection.
            max_memory_tokens: Overrides the memory's ``max_memory_tokens`` for this call.

        Returns:
            :class:`SpanHit` s with document id, collection, token and character offsets, text and a score in
            ``[0, 1]`` (the share of the layers' attention over the memory that points at the region; with ranking
            ``excess``, the share the question pays it beyond what a neutral question pays it); deterministic.
        """
        return self._retrieve(self._question_ids(query), k, filter, collection, max_memory_tokens)[0]

    def retrieve_by_layer(self, query: str, fetch: int | None = None, *, filter: Mapping[str, Any] | None = None,
                          collection: str | None = None, max_memory_tokens: int | None = None
                          ) -> dict[int, list[SpanHit]]:
        """What :meth:`retrieve` merges: per global layer, the stored spans that layer attends to when it reads
        ``query`` after the documents, best first, each with that layer's score (same ranking and candidate
        documents as :meth:`retrieve`; used by ``ltri-rag inspect`` to draw which spans each layer recalls).

        Args:
            query: The question text (read as plain text).
            fetch: Most spans per layer; ``None``: every span of the candidate documents.
            filter, collection, max_memory_tokens: As for :meth:`retrieve`.

        Returns:
            ``{layer: [SpanHit, ...]}`` (``SpanHit.layer`` is the layer; ``score`` its share of the layer's attention
            over the memory, or with ranking ``excess`` / ``pmi`` that ranking's score).
        """
        if fetch is not None and (not isinstance(fetch, int) or isinstance(fetch, bool) or fetch < 1):
            raise ValueError(f"fetch must be a positive int or None, got {fetch!r}")
        return self._layer_hits(self._question_ids(query), fetch, filter, collection, max_memory_tokens)[0]

    def _retrieve(self, ids: torch.Tensor, k: int, filter: Mapping[str, Any] | None, collection: str | None,
                  max_memory_tokens: int | None) -> tuple[list[SpanHit], list[DocumentInfo], list[_Loaded]]:
        """``(hits, the documents looked at, their loaded span memory)`` for question ids ``[Q]``."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        per_layer, docs, loaded = self._layer_hits(ids, hits_per_layer(k), filter, collection, max_memory_tokens)
        return aggregate_hits(per_layer, k), docs, loaded

    def _layer_hits(self, ids: torch.Tensor, fetch: int | None, filter: Mapping[str, Any] | None,
                    collection: str | None, max_memory_tokens: int | None
                    ) -> tuple[dict[int, list[SpanHit]], list[DocumentInfo], list[_Loaded]]:
        """``(per-layer hits (at most fetch each, None: all), the documents looked at, their loaded span memory)``
        for question ids ``[Q]``."""
        if collection is not None:
            check_collection(collection)
        if filter is not None and not isinstance(filter, Mapping):
            raise TypeError(f"filter must be a dict of metadata values, got {type(filter).__name__}")
        cap = self.max_memory_tokens if max_memory_tokens is None else max_memory_tokens
        with self._lock:
            docs = self._documents(collection, filter)
            if sum(d.num_tokens for d in docs) > cap:
                docs = choose_ranked(self._coarse_order(ids, docs, collection, filter), cap)
            if not docs:
                return {}, [], []
            session, recorder, placements, loaded = self._load_session(docs, record=True)
            assert recorder is not None
            neutral = None
            if self.ranking != "attention":
                neutral = read_neutral(session, recorder, self._question_ids(NEUTRAL_QUESTION))
            recorder.recording = True
            session.feed(ids)
            if fetch is None:  # every span of the candidate documents
                fetch = max((sum(len(p.spans) for p in places) for places in placements.values()), default=1)
            per_layer = session_hits(recorder, placements, self.scaling, fetch,
                                     backend=self.config.attention_backend, neutral=neutral, ranking=self.ranking)
        return per_layer, docs, loaded

    def _coarse_order(self, ids: torch.Tensor, docs: list[DocumentInfo], collection: str | None,
                      filter: Mapping[str, Any] | None) -> list[DocumentInfo]:
        """The candidate documents ``docs`` in the order the coarse stage ranks them for question ids ``[Q]``: by
        the question's attention over their index vectors beyond the neutral question's
        (:class:`~ltri_rag.memory_coarse.CoarseScorer`) while the store's vectors fit ``coarse_bytes``, else by the
        FAISS search (documents without a hit left out). The caller holds the lock."""
        coarse = self._coarse
        if coarse is None or not coarse.usable(self.num_kv_heads, self.head_dim):
            return documents_of_hits(docs, self._coarse_hits(ids, collection, filter))
        if self._neutral_queries is None:
            self._neutral_queries = question_queries(self.model, self.config, self.sink_ids,
                                                     self._question_ids(NEUTRAL_QUESTION))
        question = question_queries(self.model, self.config, self.sink_ids, ids)
        return [doc for doc, _ in coarse.rank(docs, question, self._neutral_queries)]

    def _coarse_hits(self, ids: torch.Tensor, collection: str | None, filter: Mapping[str, Any] | None
                     ) -> list[SpanHit]:
        """Regions ranked by the store's FAISS search with the question's mean query per layer (the coarse stage)."""
        queries = query_vectors(self.model, self.config, self.sink_ids, ids, self.num_kv_heads)
        per_layer = {layer: self.store.search(layer, q, 64, collection=collection, filter=filter)
                     for layer, q in queries.items()}
        return aggregate_hits(per_layer, 1 << 30, self.scaling / self.num_kv_heads)

    def _load_session(self, docs: Sequence[DocumentInfo], *, record: bool, loaded: Sequence[_Loaded] | None = None
                      ) -> tuple[LtriSession, QueryRecorder | None, dict[int, list[Placement]], list[_Loaded]]:
        """A session that read the sink prefix and imported ``docs``' span memory (read from the store, or
        ``loaded`` when given), with where each document's spans sit in every layer's span table, and the memory
        read (the caller holds the lock)."""
        session, recorder = (recording_session(self.model, self.config) if record
                             else (LtriSession(self.model, self.config), None))
        if self.sink_ids.numel():
            session.feed(self.sink_ids)
        placements: dict[int, list[Placement]] = {}
        cache = session.cache
        assert isinstance(cache, LtriCache)
        kept: list[_Loaded] = []
        with closing(self._documents_memory(docs)) if loaded is None else nullcontext(iter(loaded)) as reads:
            for doc, (memory, records) in zip(docs, reads):
                kept.append((memory, records))
                for layer, spans in records.items():
                    state = cache.states[layer]
                    first = len(state.tables[0]) if isinstance(state, GlobalLayerState) and state.tables else 0
                    placements.setdefault(layer, []).append(Placement(
                        first_span=first, spans=spans, doc_id=doc.doc_id, collection=doc.collection, text=doc.text))
                session.import_memory(memory)
        return session, recorder, placements, kept

    def _document_memory(self, doc: DocumentInfo) -> _Loaded:
        """A stored document's span memory and spans per layer, from the document cache or the store."""
        return self.document_cache.get_or_load(
            (doc.collection, doc.doc_id, doc.created),
            lambda: load_document_memory(self.store, doc.doc_id, doc.collection, self.global_layers,
                                         int(self.sink_ids.numel()), self.kv_dtype))

    def _documents_memory(self, docs: Sequence[DocumentInfo]) -> Iterator[_Loaded]:
        """:meth:`_document_memory` of each of ``docs`` in order, with up to ``prefetch`` of the next ones read by
        background threads meanwhile. An error is raised where its document is reached; the reads not yet started
        are then cancelled."""
        if self.prefetch == 0 or len(docs) < 2:
            yield from (self._document_memory(doc) for doc in docs)
            return
        if self._prefetch_pool is None:
            self._prefetch_pool = ThreadPoolExecutor(self.prefetch, thread_name_prefix="ltri-prefetch")
        pool = self._prefetch_pool
        ahead: deque[Future[_Loaded]] = deque()
        queued = iter(docs)
        try:
            for doc in itertools.islice(queued, self.prefetch + 1):
                ahead.append(pool.submit(self._document_memory, doc))
            while ahead:
                loaded = ahead.popleft().result()
                for doc in itertools.islice(queued, 1):
                    ahead.append(pool.submit(self._document_memory, doc))
                yield loaded
        finally:
            for future in ahead:
                future.cancel()

    def cache_info(self) -> CacheInfo:
        """Hits, misses, entries and bytes of the document cache (see :mod:`ltri_rag.memory_cache`)."""
        return self.document_cache.info()

    def matching_documents(self, collection: str | None = None,
                           filter: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
        """``(collection, doc_id)`` of the stored documents a question with this ``collection`` / ``filter`` reads
        from (empty: it would be answered without any memory)."""
        return [(d.collection, d.doc_id) for d in self._documents(collection, filter)]

    def _documents(self, collection: str | None, filter: Mapping[str, Any] | None) -> list[DocumentInfo]:
        """Stored documents of ``collection`` (all when None) matching ``filter``, in (collection, id) order."""
        by_collection: dict[str, list[str]] = {}
        for coll, doc_id in self.store.list_documents(collection):
            by_collection.setdefault(coll, []).append(doc_id)
        docs = [info for coll, doc_ids in sorted(by_collection.items())
                for info in self.store.get(doc_ids, collection=coll)]
        if filter:
            missing = object()
            docs = [d for d in docs if all(d.metadata.get(key, missing) == value for key, value in filter.items())]
        return docs

