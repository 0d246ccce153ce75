"""LlamaIndex retrieval over a :class:`~ltri_rag.memory.KVMemory`: the retriever (span hits as nodes), the query
engine that answers with in-model KV retrieval (and a text-RAG one to compare), and the chat memory block.
The LLM adapter is in :mod:`ltri_rag.integrations.llama_index.llm`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.types import (
    ChatMessage,
    CompletionResponse,
)
from llama_index.core.base.response.schema import Response
from llama_index.core.bridge.pydantic import Field
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.llms.llm import LLM as LLMType
from llama_index.core.memory.memory import BaseMemoryBlock
from llama_index.core.query_engine import CustomQueryEngine, RetrieverQueryEngine
from llama_index.core.schema import NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters
from ltri_rag.integrations.llama_index.llm import _answer_raw, _check_positive, _role

from ltri_rag.memory import KVMemory
from ltri_rag.store import SpanHit

_LTRI_KEYS = ("doc_id", "collection", "start_char", "end_char", "score")


def filters_to_memory_filter(filters: MetadataFilters | Mapping[str, Any] | None
                             ) -> tuple[dict[str, Any] | None, str | None]:
    """Turn LlamaIndex ``MetadataFilters`` (or a plain dict) into a :class:`KVMemory` equality filter.

    Only ``==`` filters joined with AND are supported (the memory filters by metadata equality). A filter on the key
    ``collection`` selects the collection instead.

    Returns:
        ``(metadata filter or None, collection or None)``.

    Raises:
        ValueError: another operator or condition, nested filters, or a list value (each named).
        TypeError: ``filters`` is neither ``MetadataFilters`` nor a dict.
    """
    if filters is None:
        return None, None
    if isinstance(filters, Mapping):
        pairs = list(filters.items())
    elif isinstance(filters, MetadataFilters):
        if filters.condition not in (None, FilterCondition.AND) and len(filters.filters) > 1:
            raise ValueError(f"only AND filters are supported by KVMemory, got condition {filters.condition.value!r}")
        if filters.condition == FilterCondition.NOT:
            raise ValueError("the NOT filter condition is not supported by KVMemory (metadata equality only)")
        pairs = []
        for f in filters.filters:
            if not isinstance(f, MetadataFilter):
                raise ValueError(f"nested filters are not supported by KVMemory, got {f!r}")  # noqa: TRY004
            if f.operator != FilterOperator.EQ:
                raise ValueError(f"filter on {f.key!r}: operator {f.operator.value!r} is not supported by KVMemory "
                                 "(metadata equality '==' only)")
            pairs.append((f.key, f.value))
    else:
        raise TypeError(f"filters must be MetadataFilters or a dict, got {type(filters).__name__}")
    out: dict[str, Any] = {}
    collection = None
    for key, value in pairs:
        if isinstance(value, list):
            raise ValueError(f"filter on {key!r}: a list value {value!r} needs operator 'in', which KVMemory does "  # noqa: TRY004
                             "not support (metadata equality only)")
        if key == "collection":
            if not isinstance(value, str):
                raise ValueError(f"filter on 'collection' must be a string, got {value!r}")
            collection = value
        elif key in out and out[key] != value:
            raise ValueError(f"filter on {key!r} asks for two values, {out[key]!r} and {value!r}")
        else:
            out[key] = value
    return (out or None), collection


def spans_to_nodes(memory: KVMemory, hits: Sequence[SpanHit]) -> list[NodeWithScore]:
    """LlamaIndex nodes for recalled spans: text = the span's text, id ``"collection/doc_id:start-end"`` (stable),
    metadata = the document's metadata plus ``doc_id``, ``collection``, ``start_char``, ``end_char``, ``score``,
    ``relationships[SOURCE]`` = the document, score = the span's score in ``[0, 1]``."""
    metadata: dict[tuple[str, str], Mapping[str, Any]] = {}
    by_collection: dict[str, list[str]] = {}
    for hit in hits:
        ids = by_collection.setdefault(hit.collection, [])
        if hit.doc_id not in ids:
            ids.append(hit.doc_id)
    for collection, ids in by_collection.items():
        for info in memory.get(ids, collection=collection):
            metadata[(collection, info.doc_id)] = info.metadata
    nodes = []
    for hit in hits:
        doc_meta = dict(metadata.get((hit.collection, hit.doc_id), {}))
        meta = {**doc_meta, "doc_id": hit.doc_id, "collection": hit.collection, "start_char": hit.char_start,
                "end_char": hit.char_end, "score": hit.score}
        node = TextNode(
            id_=f"{hit.collection}/{hit.doc_id}:{hit.char_start}-{hit.char_end}", text=hit.text, metadata=meta,
            start_char_idx=hit.char_start, end_char_idx=hit.char_end,
            excluded_llm_metadata_keys=[k for k in _LTRI_KEYS if k != "doc_id"],
            excluded_embed_metadata_keys=list(_LTRI_KEYS),
            relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=hit.doc_id, metadata=doc_meta)})
        nodes.append(NodeWithScore(node=node, score=hit.score))
    return nodes


class LtriRetriever(BaseRetriever):
    """A LlamaIndex retriever over a :class:`KVMemory`: the spans the model attends to when it reads the query
    after the stored documents (:meth:`KVMemory.retrieve`), as nodes (see :func:`spans_to_nodes`).

    Args:
        memory: The memory.
        similarity_top_k: Most spans (document regions) returned.
        collection: Only this collection (``None``: every collection, unless a filter on ``collection``).
        filters: ``MetadataFilters`` of ``==`` filters joined by AND, or a dict (metadata equality).
        max_memory_tokens: Overrides the memory's cap on imported tokens.
        callback_manager: LlamaIndex callbacks.

    Raises:
        ValueError / TypeError: a bad ``similarity_top_k``, collection or filter (naming it).
    """

    def __init__(self, memory: KVMemory, similarity_top_k: int = 4, *, collection: str | None = None,
                 filters: MetadataFilters | Mapping[str, Any] | None = None, max_memory_tokens: int | None = None,
                 callback_manager: CallbackManager | None = None, verbose: bool = False) -> None:
        if not isinstance(memory, KVMemory):
            raise TypeError(f"memory must be a KVMemory, got {type(memory).__name__}")
        _check_positive("similarity_top_k", similarity_top_k)
        if max_memory_tokens is not None:
            _check_positive("max_memory_tokens", max_memory_tokens)
        if collection is not None and (not isinstance(collection, str) or not collection.strip()):
            raise ValueError(f"collection must be a non-empty string, got {collection!r}")
        self._filter, filter_collection = filters_to_memory_filter(filters)
        if collection is not None and filter_collection is not None and collection != filter_collection:
            raise ValueError(f"collection={collection!r} contradicts the filter collection == {filter_collection!r}")
        self.memory = memory
        self.similarity_top_k = similarity_top_k
        self.collection = collection if collection is not None else filter_collection
        self.filters = filters
        self.max_memory_tokens = max_memory_tokens
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        query = query_bundle.query_str
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"the query must be a non-empty string, got {query!r:.60}")
        hits = self.memory.retrieve(query, self.similarity_top_k, filter=self._filter, collection=self.collection,
                                    max_memory_tokens=self.max_memory_tokens)
        return spans_to_nodes(self.memory, hits)

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)


# ------------------------------------------------------------------------------------------------ query engines
class LtriQueryEngine(CustomQueryEngine):
    """Answers with in-model KV retrieval: :meth:`KVMemory.generate` imports the stored span memory and reads only
    the question (the documents are never pasted into the prompt). ``source_nodes`` are the recalled spans
    (:func:`spans_to_nodes`); ``metadata`` holds the token counts, the documents used and the finish reason.

    For the plain text-RAG pipeline over the same memory (spans pasted into the prompt) see
    :func:`text_rag_query_engine`.
    """

    memory: Any = Field(description="The KVMemory to answer from.")
    max_new_tokens: int = Field(default=128, description="Most tokens to generate.")
    similarity_top_k: int = Field(default=4, description="Spans recalled as source nodes.")
    collection: str | None = Field(default=None, description="Only this collection.")
    filters: Any | None = Field(default=None, description="MetadataFilters (== and AND) or a dict.")
    system_prompt: str | None = Field(default=None, description="A system message before the question.")
    temperature: float = Field(default=0.0)
    stop: list[str] = Field(default_factory=list)

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        if not isinstance(self.memory, KVMemory):
            raise TypeError(f"memory must be a KVMemory, got {type(self.memory).__name__}")
        _check_positive("max_new_tokens", self.max_new_tokens)
        _check_positive("similarity_top_k", self.similarity_top_k)
        _, filter_collection = filters_to_memory_filter(self.filters)  # fail now on a bad filter
        if self.collection is not None and filter_collection is not None and filter_collection != self.collection:
            raise ValueError(f"collection={self.collection!r} contradicts the filter collection == "
                             f"{filter_collection!r}")

    def custom_query(self, query_str: str) -> Response:
        """Answer ``query_str`` from the memory; ``Response(response, source_nodes, metadata)``."""
        if not isinstance(query_str, str) or not query_str.strip():
            raise ValueError(f"the query must be a non-empty string, got {query_str!r:.60}")
        meta_filter, filter_collection = filters_to_memory_filter(self.filters)
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else [])
        messages.append({"role": "user", "content": query_str})
        with self.callback_manager.event(CBEventType.LLM, payload={EventPayload.PROMPT: query_str}) as event:
            answer = self.memory.generate(messages, self.max_new_tokens, collection=self.collection or
                                          filter_collection, filter=meta_filter, k=self.similarity_top_k,
                                          temperature=self.temperature, stop=self.stop)
            raw = _answer_raw(answer)
            event.on_end(payload={EventPayload.PROMPT: query_str,
                                  EventPayload.COMPLETION: CompletionResponse(text=answer.text, raw=raw)})
        metadata = {**raw["usage"], "finish_reason": answer.finish_reason, "documents": raw["documents"]}
        return Response(response=answer.text, source_nodes=spans_to_nodes(self.memory, answer.spans),
                        metadata=metadata)

    async def acustom_query(self, query_str: str) -> Response:
        """:meth:`custom_query` in a worker thread."""
        return await asyncio.to_thread(self.custom_query, query_str)


def text_rag_query_engine(memory: KVMemory, llm: LLMType, similarity_top_k: int = 4, *,
                          collection: str | None = None, filters: MetadataFilters | Mapping[str, Any] | None = None,
                          callback_manager: CallbackManager | None = None, **kwargs: Any) -> RetrieverQueryEngine:
    """The plain text-RAG pipeline, for comparison with :class:`LtriQueryEngine`: a ``RetrieverQueryEngine`` over
    :class:`LtriRetriever` (the spans the model recalls) whose synthesizer pastes the spans' text into LlamaIndex's
    QA prompt for ``llm`` (e.g. an :class:`LtriLLM`) to read.

    Token budgets use ``llm.tokenizer`` when it has one (an :class:`LtriLLM`), not ``Settings.tokenizer``; nothing
    reads ``Settings.llm``. ``callback_manager`` defaults to the LLM's (so its handlers, e.g. a
    ``TokenCountingHandler``, keep seeing the calls); ``kwargs`` go to ``get_response_synthesizer`` (e.g.
    ``response_mode="compact"``, ``streaming=True``, ``text_qa_template=...``).
    """
    from llama_index.core.indices.prompt_helper import PromptHelper
    from llama_index.core.response_synthesizers import get_response_synthesizer

    if not isinstance(llm, LLMType):
        raise TypeError(f"llm must be a LlamaIndex LLM, got {type(llm).__name__}")
    callback_manager = callback_manager or llm.callback_manager
    retriever = LtriRetriever(memory, similarity_top_k, collection=collection, filters=filters,
                              callback_manager=callback_manager)
    tokenizer = getattr(llm, "tokenizer", None)
    if tokenizer is not None and "prompt_helper" not in kwargs:
        kwargs["prompt_helper"] = PromptHelper.from_llm_metadata(
            llm.metadata, tokenizer=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    synthesizer = get_response_synthesizer(llm=llm, callback_manager=callback_manager, **kwargs)
    return RetrieverQueryEngine(retriever, synthesizer, callback_manager=callback_manager)


# ------------------------------------------------------------------------------------------------ chat memory
class LtriMemoryBlock(BaseMemoryBlock[str]):
    """A ``llama_index.core.memory.Memory`` block keeping old chat turns in a :class:`KVMemory`.

    Messages flushed from the short-term buffer are stored as one document per flush (``"role: content"`` lines)
    in ``collection``, tagged with the session id; for a new message the block recalls the spans the model attends
    to (:meth:`KVMemory.retrieve` with the last ``retrieval_context_window`` messages as the query, within the
    session) and returns the whole old messages they fall in, oldest first.

    Example::

        block = LtriMemoryBlock(memory=kv_memory, similarity_top_k=2)
        chat_memory = Memory.from_defaults(session_id="u1", token_limit=400, memory_blocks=[block],
                                           tokenizer_fn=lambda t: tokenizer(t)["input_ids"])
    """

    name: str = Field(default="LtriMemory", description="The memory block's name.")
    memory: Any = Field(description="The KVMemory holding the old turns.")
    collection: str = Field(default="chat_memory", description="The KVMemory collection of the turns.")
    similarity_top_k: int = Field(default=2, description="Spans recalled per new message.")
    retrieval_context_window: int = Field(default=1, description="Latest messages used as the query.")
    max_memory_tokens: int | None = Field(default=None, description="Cap on imported tokens per recall.")

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        if not isinstance(self.memory, KVMemory):
            raise TypeError(f"memory must be a KVMemory, got {type(self.memory).__name__}")
        if not isinstance(self.collection, str) or not self.collection.strip():
            raise ValueError(f"collection must be a non-empty string, got {self.collection!r}")
        for name in ("similarity_top_k", "retrieval_context_window"):
            _check_positive(name, getattr(self, name))

    @staticmethod
    def _text(message: ChatMessage) -> str:
        return (message.content or "").strip()

    def _store(self, messages: list[ChatMessage]) -> str | None:
        lines, turns, session_id, at = [], [], None, 0
        for message in messages:
            session_id = message.additional_kwargs.get("session_id", session_id)
            text = self._text(message)
            if not text:
                continue
            line = f"{_role(message)}: {text}\n"
            turns.append([at, at + len(line) - 1])
            lines.append(line)
            at += len(line)
        if not lines:
            return None
        metadata: dict[str, Any] = {"turns": turns}
        if session_id is not None:
            metadata["session_id"] = str(session_id)
        doc_id = f"turns-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # sorts in time order
        self.memory.add_documents(["".join(lines)], [metadata], [doc_id], collection=self.collection,
                                  progress=False)
        return doc_id

    def _recall(self, messages: list[ChatMessage], session_id: str | None) -> str:
        query = "\n".join(t for t in (self._text(m) for m in messages[-self.retrieval_context_window:]) if t)
        if not query:
            return ""
        if self.collection not in self.memory.collections():
            return ""
        meta_filter = {"session_id": str(session_id)} if session_id is not None else None
        hits = self.memory.retrieve(query, self.similarity_top_k, filter=meta_filter, collection=self.collection,
                                    max_memory_tokens=self.max_memory_tokens)
        if not hits:
            return ""
        docs = {info.doc_id: info for info in
                self.memory.get(sorted({h.doc_id for h in hits}), collection=self.collection)}
        chosen: set[tuple[str, int, int]] = set()
        for hit in hits:
            info = docs[hit.doc_id]
            for start, end in info.metadata.get("turns", [[0, len(info.text)]]):
                if start < hit.char_end and hit.char_start < end:
                    chosen.add((hit.doc_id, start, end))
        return "\n".join(docs[doc_id].text[start:end] for doc_id, start, end in sorted(chosen))

    async def _aget(self, messages: list[ChatMessage] | None = None, session_id: str | None = None,
                    **block_kwargs: Any) -> str:
        """The old messages relevant to the latest ones (``"role: content"`` lines, oldest first), or ``""``."""
        if not messages:
            return ""
        return await asyncio.to_thread(self._recall, list(messages), session_id)

    async def _aput(self, messages: list[ChatMessage]) -> None:
        """Store messages leaving the short-term memory as one document of the block's collection."""
        if messages:
            await asyncio.to_thread(self._store, list(messages))
