"""LlamaIndex adapters for ltri-rag (``ltri_rag.integrations.llama_index``).

* :class:`LtriLLM`: a ``CustomLLM`` over a Hugging Face model read by the ltri engine (or, with ``memory=``, answering
  from a :class:`~ltri_rag.KVMemory` with in-model retrieval); real token counts in ``raw["usage"]``.
* :class:`LtriRetriever`: a ``BaseRetriever`` whose nodes are the spans :meth:`KVMemory.retrieve` recalls, with
  document id, character offsets, score and a ``SOURCE`` relationship to the stored document.
* :class:`LtriQueryEngine`: a ``CustomQueryEngine`` answering with :meth:`KVMemory.generate` (the documents are
  served from the model's memory, not pasted into the prompt); the recalled spans are the ``source_nodes``.
  :func:`text_rag_query_engine` builds the plain text-RAG ``RetrieverQueryEngine`` over the same retriever for
  comparison.
* :class:`LtriMemoryBlock`: a memory block for ``llama_index.core.memory.Memory`` that keeps chat turns leaving the
  short-term buffer in a ``KVMemory`` collection and recalls the relevant old turns for a new message.

Nothing here touches ``Settings.llm`` / ``Settings.embed_model`` (they default to OpenAI); pass the LLM explicitly::

    llm = LtriLLM(model=model, tokenizer=tokenizer)
    engine = LtriQueryEngine(memory=memory)                          # in-model KV retrieval
    rag = text_rag_query_engine(memory, llm, similarity_top_k=3)     # text RAG over the same spans
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.base.response.schema import Response
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.llm import LLM as LLMType
from llama_index.core.memory.memory import BaseMemoryBlock
from llama_index.core.query_engine import CustomQueryEngine, RetrieverQueryEngine
from llama_index.core.schema import NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import FilterCondition, FilterOperator, MetadataFilter, MetadataFilters
from torch import nn

from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession
from ltri_rag.memory import KVMemory, MemoryAnswer
from ltri_rag.memory_query import decode, stream_pieces
from ltri_rag.store import SpanHit

__all__ = ["LtriLLM", "LtriMemoryBlock", "LtriQueryEngine", "LtriRetriever", "filters_to_memory_filter",
           "spans_to_nodes", "text_rag_query_engine"]

_LTRI_KEYS = ("doc_id", "collection", "start_char", "end_char", "score")
_GEN_KWARGS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")


# ------------------------------------------------------------------------------------------------ helpers
def _role(message: ChatMessage) -> str:
    role = message.role
    return str(getattr(role, "value", role))


def _messages_to_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, ChatMessage):
            raise TypeError(f"messages[{i}] must be a ChatMessage, got {type(message).__name__}")
        out.append({"role": _role(message), "content": message.content or ""})
    return out


def chat_template_prompt(tokenizer: Any) -> Callable[[Sequence[ChatMessage]], str]:
    """A ``messages_to_prompt`` that applies ``tokenizer``'s chat template (with the generation prompt); for a
    tokenizer without one, ``"role: content"`` lines ending in ``"assistant: "``."""

    def messages_to_prompt(messages: Sequence[ChatMessage]) -> str:
        dicts = _messages_to_dicts(messages)
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in dicts) + "assistant: "

    return messages_to_prompt


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


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# ------------------------------------------------------------------------------------------------ the LLM
class LtriLLM(CustomLLM):
    """A LlamaIndex LLM running a Hugging Face model through the ltri engine (long prompts are read in chunks with
    in-model span retrieval), or answering from a :class:`KVMemory` (``memory=``).

    ``complete`` / ``stream_complete`` return the generated text; ``raw["usage"]`` holds the real token counts
    (``prompt_tokens``: tokens read, ``completion_tokens``: tokens generated, the end-of-sequence token not counted;
    with a memory also ``memory_tokens``, the stored tokens served from the KV memory), so ``TokenCountingHandler``
    counts right. Chat goes through ``messages_to_prompt`` (default: the tokenizer's chat template); an unformatted
    ``complete(prompt)`` wraps the prompt as one user message of that template (``completion_to_prompt``).

    Args:
        model: Hugging Face causal LM (default: the memory's).
        tokenizer: Its tokenizer (default: the memory's).
        config: Engine configuration for reading prompts (default ``LtriConfig()``; the memory's with a memory).
        memory: Answer with :meth:`KVMemory.generate` over this memory instead of reading the prompt alone.
        **kwargs: The pydantic fields below (``num_output``, ``context_window``, ``temperature``, ...).

    Generation arguments can be overridden per call: ``complete(prompt, max_new_tokens=..., temperature=...,
    top_p=..., seed=..., stop=[...])``. Calls of one ``LtriLLM`` run one at a time (async ones in a worker thread);
    do not run it from several threads at once with a :class:`KVMemory` of the same model.
    """

    model_name: str = Field(default="ltri", description="Name reported in the metadata.")
    context_window: int = Field(default=32768, description="Tokens the model reads (default: the model's "
                                "max_position_embeddings; ltri reads longer prompts too).")
    num_output: int = Field(default=256, description="Most tokens to generate (max_new_tokens).")
    temperature: float = Field(default=0.0, description="0: greedy; else the sampling temperature.")
    top_p: float = Field(default=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Seed of the sampler.")
    stop: list[str] = Field(default_factory=list, description="Strings that end the answer (not included).")
    similarity_top_k: int = Field(default=4, description="With a memory: spans recalled per answer.")
    collection: str | None = Field(default=None, description="With a memory: only this collection.")

    _model: nn.Module = PrivateAttr()
    _tokenizer: Any = PrivateAttr()
    _config: LtriConfig = PrivateAttr()
    _memory: KVMemory | None = PrivateAttr(default=None)
    _lock: Any = PrivateAttr()

    def __init__(self, model: nn.Module | None = None, tokenizer: Any = None, config: LtriConfig | None = None, *,
                 memory: KVMemory | None = None, **kwargs: Any) -> None:
        if memory is not None and not isinstance(memory, KVMemory):
            raise TypeError(f"memory must be a KVMemory, got {type(memory).__name__}")
        model = model if model is not None else (memory.model if memory is not None else None)
        tokenizer = tokenizer if tokenizer is not None else (memory.tokenizer if memory is not None else None)
        if model is None or tokenizer is None:
            raise ValueError("LtriLLM needs model= and tokenizer= (or memory=)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a Hugging Face causal LM (torch.nn.Module), got {type(model).__name__}")
        if memory is not None and (model is not memory.model or tokenizer is not memory.tokenizer):
            raise ValueError("model and tokenizer must be the memory's own (its K/V were written by that model)")
        config = config if config is not None else (memory.config if memory is not None else LtriConfig())
        if not isinstance(config, LtriConfig):
            raise TypeError(f"config must be an LtriConfig, got {type(config).__name__}")
        if "context_window" not in kwargs:
            text_config = (model.config.get_text_config() if hasattr(model.config, "get_text_config")
                           else model.config)
            kwargs["context_window"] = int(getattr(text_config, "max_position_embeddings", None) or 32768)
        if "model_name" not in kwargs:
            kwargs["model_name"] = str(getattr(model.config, "_name_or_path", "") or "ltri")
        kwargs.setdefault("messages_to_prompt", chat_template_prompt(tokenizer))
        kwargs.setdefault("completion_to_prompt",
                          lambda prompt, _m=kwargs["messages_to_prompt"]: _m([ChatMessage(role="user",
                                                                                         content=prompt)]))
        super().__init__(**kwargs)
        for name in ("num_output", "context_window", "similarity_top_k"):
            _check_positive(name, getattr(self, name))
        self._model, self._tokenizer, self._config, self._memory = model, tokenizer, config, memory
        self._lock = threading.RLock()

    @classmethod
    def class_name(cls) -> str:
        return "LtriLLM"

    @property
    def metadata(self) -> LLMMetadata:
        """Context window, ``num_output``, not a chat model (chat goes through ``messages_to_prompt``), name."""
        return LLMMetadata(context_window=self.context_window, num_output=self.num_output, is_chat_model=False,
                           model_name=self.model_name)

    @property
    def memory(self) -> KVMemory | None:
        """The :class:`KVMemory` answers come from, if any."""
        return self._memory

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (e.g. for ``Settings.tokenizer = llm.tokenizer.encode``)."""
        return self._tokenizer

    # ---------------------------------------------------------------------------------------------- generation
    def _gen_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(_GEN_KWARGS))
        if unknown:
            raise TypeError(f"LtriLLM got unknown keyword arguments {unknown}; it takes {list(_GEN_KWARGS)}")
        args = {"max_new_tokens": self.num_output, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop": list(self.stop)}
        args.update(kwargs)
        if isinstance(args["stop"], str):
            args["stop"] = [args["stop"]]
        return args

    def _encode(self, text: str) -> torch.Tensor:
        if not isinstance(text, str) or not text:
            raise ValueError(f"the prompt must be a non-empty string, got {text!r:.60}")
        bos = getattr(self._tokenizer, "bos_token", None)
        special = not (bos and text.startswith(bos))  # a chat template already put the BOS token in
        ids = self._tokenizer(text, add_special_tokens=special)["input_ids"]
        if not ids:
            raise ValueError(f"the prompt encodes to no tokens: {text!r:.60}")
        return torch.tensor(ids, dtype=torch.int64)

    def _steps(self, prompt: str | list[dict[str, str]], formatted: bool, args: dict[str, Any]
               ) -> tuple[Iterator[tuple[str, tuple[list[int], str, str | None]]], Callable[[], dict[str, Any]]]:
        """``(iterator of (piece, (ids, text, finish reason)), function giving the raw dict at the end)``."""
        if self._memory is not None:
            stream = self._memory.stream(prompt, args["max_new_tokens"], collection=self.collection,
                                         k=self.similarity_top_k, chat_template=not formatted,
                                         temperature=args["temperature"], top_p=args["top_p"], seed=args["seed"],
                                         stop=args["stop"])

            def memory_steps() -> Iterator[tuple[str, tuple[list[int], str, str | None]]]:
                text = ""
                for piece in stream:
                    text += piece
                    yield piece, ([], text, None)
                answer = stream.result
                assert answer is not None
                yield "", (answer.token_ids, answer.text, answer.finish_reason)

            def memory_raw() -> dict[str, Any]:
                answer = stream.result
                if answer is None:
                    return {}
                return _answer_raw(answer)

            return memory_steps(), memory_raw
        assert isinstance(prompt, str)
        ids = self._encode(prompt if formatted else self.completion_to_prompt(prompt))
        with self._lock:
            session = LtriSession(self._model, self._config)
            logits = session.feed(ids)[0]
        steps = decode(self._model, self._tokenizer, session, logits, max_new_tokens=args["max_new_tokens"],
                       stop=args["stop"], temperature=args["temperature"], top_p=args["top_p"], seed=args["seed"],
                       lock=self._lock)
        last: list[tuple[list[int], str, str | None]] = []

        def plain_steps() -> Iterator[tuple[str, tuple[list[int], str, str | None]]]:
            for piece, step in stream_pieces(steps, args["stop"]):
                last[:] = [step]
                yield piece, step
                if step[2] is not None:
                    return

        def plain_raw() -> dict[str, Any]:
            out = last[0] if last else ([], "", None)
            return {"usage": {"prompt_tokens": int(ids.numel()), "completion_tokens": len(out[0]),
                              "total_tokens": int(ids.numel()) + len(out[0])},
                    "finish_reason": out[2], "engine_usage": session.usage()}

        return plain_steps(), plain_raw

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Generate a completion of ``prompt`` (wrapped by ``completion_to_prompt`` unless ``formatted``)."""
        args = self._gen_args(kwargs)
        steps, raw = self._steps(prompt, formatted, args)
        text = ""
        for _, (_, text, reason) in steps:
            if reason is not None:
                break
        return CompletionResponse(text=text, raw=raw())

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Stream a completion: each response has ``text`` (so far) and ``delta`` (the new piece); the last one
        carries the final ``raw["usage"]`` (possibly with an empty delta)."""
        args = self._gen_args(kwargs)
        steps, raw = self._steps(prompt, formatted, args)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece, (_, _, reason) in steps:
                text += piece
                if reason is not None:
                    yield CompletionResponse(text=text, delta=piece, raw=raw())
                    return
                if piece:
                    yield CompletionResponse(text=text, delta=piece)

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Chat: with a memory the messages go to :meth:`KVMemory.generate` (the last user message is the question
        recalled against); without one through ``messages_to_prompt``."""
        if self._memory is None:
            return super().chat(messages, **kwargs)
        from llama_index.core.base.llms.generic_utils import completion_response_to_chat_response

        args = self._gen_args(kwargs)
        steps, raw = self._steps(_messages_to_dicts(messages), True, args)
        text = ""
        for _, (_, text, reason) in steps:
            if reason is not None:
                break
        return completion_response_to_chat_response(CompletionResponse(text=text, raw=raw()))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Streaming :meth:`chat`."""
        if self._memory is None:
            return super().stream_chat(messages, **kwargs)
        from llama_index.core.base.llms.generic_utils import stream_completion_response_to_chat_response

        args = self._gen_args(kwargs)
        steps, raw = self._steps(_messages_to_dicts(messages), True, args)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece, (_, _, reason) in steps:
                text += piece
                if reason is not None:
                    yield CompletionResponse(text=text, delta=piece, raw=raw())
                    return
                if piece:
                    yield CompletionResponse(text=text, delta=piece)

        return stream_completion_response_to_chat_response(gen())

    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """:meth:`complete` in a worker thread (the event loop stays free; the model runs one call at a time)."""
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """:meth:`chat` in a worker thread."""
        return await asyncio.to_thread(self.chat, messages, **kwargs)


def _answer_raw(answer: MemoryAnswer) -> dict[str, Any]:
    return {"usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": len(answer.token_ids),
                      "total_tokens": answer.prompt_tokens + len(answer.token_ids),
                      "memory_tokens": answer.memory_tokens},
            "finish_reason": answer.finish_reason, "documents": list(answer.documents),
            "spans": [(h.collection, h.doc_id, h.char_start, h.char_end, h.score) for h in answer.spans],
            "engine_usage": dict(answer.usage)}


# ------------------------------------------------------------------------------------------------ the retriever
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
        filters_to_memory_filter(self.filters)  # fail now on a bad filter

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
