"""LangChain adapters over :class:`~ltri_rag.memory.KVMemory` and the long-prompt engine.

::

    from ltri_rag.integrations.langchain import ChatLtri, LtriLLM, LtriRetriever, KVChatMessageHistory

    memory = ltri_rag.KVMemory.create("./mem", model, tokenizer)
    retriever = LtriRetriever(memory=memory, k=4)
    retriever.add_documents([Document(page_content=text, metadata={"source": path}, id=path)])
    chat = ChatLtri(memory=memory, max_tokens=128)             # answers with in-model retrieval from the memory
    msg = chat.invoke("Who founded Viaweb?")                  # msg.usage_metadata, msg.response_metadata["spans"]
    plain = ChatLtri(hf_model=model, tokenizer=tokenizer)     # no memory: the whole prompt read by the engine

* :class:`ChatLtri` (``BaseChatModel``) and :class:`LtriLLM` (``LLM``): invoke / stream / batch / async (LangChain's
  thread defaults; the model runs one call at a time), stop sequences, ``max_tokens``, ``temperature`` (0: greedy),
  token usage. Over a memory, the prompt the model reads is the memory's sink prefix plus the chat-templated messages;
  the documents are served from the stored K/V and counted as ``input_token_details.cache_read`` (``input_tokens``
  includes them, as LangChain's providers count cached tokens). The recalled spans (document id, character offsets,
  score) are in ``response_metadata["spans"]``.
* :class:`LtriRetriever` (``DocumentIndex``, a ``BaseRetriever`` with upsert / get / delete by id): the spans
  :meth:`KVMemory.retrieve` finds, as ``Document`` s.
* :class:`KVChatMessageHistory` (``BaseChatMessageHistory``): every chat turn is ingested into the memory, one
  collection per session, so old turns can be recalled by retrieval (:meth:`KVChatMessageHistory.recall`, or
  ``ChatLtri(memory=..., collection=history.collection)``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core._api import LangChainBetaWarning
from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForLLMRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.documents import Document
from langchain_core.indexing.base import DeleteResponse, DocumentIndex, UpsertResponse
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.llms import LLM
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    message_to_dict,
    messages_from_dict,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, Generation, GenerationChunk, LLMResult
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession
from ltri_rag.generation import encode_prompt
from ltri_rag.memory import DEFAULT_COLLECTION, KVMemory
from ltri_rag.memory_query import decode, stream_pieces
from ltri_rag.store import SpanHit

__all__ = ["ChatLtri", "KVChatMessageHistory", "LtriLLM", "LtriRetriever", "span_metadata"]

PROVIDER = "ltri_rag"
_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(model: Any) -> threading.RLock:
    """One lock per model object: engine sessions swap the model's attention function, one model call at a time."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def span_metadata(hit: SpanHit) -> dict[str, Any]:
    """A recalled span as plain data: ``doc_id, collection, start_char, end_char, score, text``."""
    return {"doc_id": hit.doc_id, "collection": hit.collection, "start_char": hit.char_start,
            "end_char": hit.char_end, "score": hit.score, "text": hit.text}


# ------------------------------------------------------------------------------------------------ shared engine
@dataclass
class _Outcome:
    """What one generation produced (filled in when the piece iterator ends)."""

    text: str = ""
    output_tokens: int = 0
    prompt_tokens: int = 0  # tokens the model read for this call (sink prefix + prompt)
    memory_tokens: int = 0  # tokens served from the KV memory
    finish_reason: str = "length"
    spans: list[SpanHit] = field(default_factory=list)
    documents: list[tuple[str, str]] = field(default_factory=list)

    def usage(self) -> UsageMetadata:
        inputs = self.prompt_tokens + self.memory_tokens
        return UsageMetadata(input_tokens=inputs, output_tokens=self.output_tokens,
                             total_tokens=inputs + self.output_tokens,
                             input_token_details={"cache_read": self.memory_tokens})

    def metadata(self, model_name: str) -> dict[str, Any]:
        return {"model_name": model_name, "model_provider": PROVIDER, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "memory_tokens": self.memory_tokens,
                "spans": [span_metadata(h) for h in self.spans], "documents": [list(d) for d in self.documents]}


_CALL_OPTIONS = ("max_tokens", "temperature", "top_p", "seed", "k", "collection", "filter", "max_memory_tokens",
                 "timeout")


class _LtriParams(BaseModel):
    """Fields and the generation loop shared by :class:`ChatLtri` and :class:`LtriLLM`."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    memory: KVMemory | None = None
    """Answer with in-model retrieval from this memory; ``None``: the prompt alone is read by the engine."""
    hf_model: Any = None
    """The Hugging Face causal LM (default: the memory's)."""
    tokenizer: Any = None
    """Its tokenizer (default: the memory's); its chat template formats chat messages."""
    config: LtriConfig | None = None
    """Engine configuration without a memory (default ``LtriConfig()``); a memory uses its own."""
    model_name: str = Field(default="", alias="model")
    """Name reported in traces and ``response_metadata`` (default: the model's ``name_or_path``)."""
    temperature: float = 0.0
    """0: greedy decoding; otherwise the sampling temperature."""
    max_tokens: int | None = 256
    """Most tokens to generate (``None``: 256)."""
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    """Strings that end the output (not included); merged with the per-call ``stop``."""
    timeout: float | None = None
    """Seconds; checked between generated tokens (prefill is not interrupted): past it ``TimeoutError``."""
    max_retries: int = 0
    """Accepted for compatibility; a local model is not retried (its errors are deterministic)."""
    k: int = 4
    """Spans recalled for citations (``response_metadata["spans"]``)."""
    collection: str | None = None
    """Memory collection to answer from (``None``: every collection)."""
    filter: dict[str, Any] | None = None
    """Metadata equality filter on the memory's documents."""
    max_memory_tokens: int | None = None
    """Overrides the memory's ``max_memory_tokens`` (tokens imported per question)."""
    streaming: bool = False
    """``invoke`` streams internally (callbacks get every token)."""

    @model_validator(mode="after")
    def _check(self) -> Any:
        if self.memory is not None:
            if not isinstance(self.memory, KVMemory):
                raise TypeError(f"memory must be a KVMemory, got {type(self.memory).__name__}")
            for name in ("hf_model", "tokenizer"):
                mine, theirs = getattr(self, name), getattr(self.memory, name.removeprefix("hf_"))
                if mine is None:
                    object.__setattr__(self, name, theirs)
                elif mine is not theirs:
                    raise ValueError(f"{name} differs from the memory's {name.removeprefix('hf_')}; pass only "
                                     "memory=, or the same objects")
        if self.hf_model is None or self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs memory=KVMemory(...) or hf_model= and tokenizer= "
                             f"(got hf_model={type(self.hf_model).__name__}, tokenizer={type(self.tokenizer).__name__})")
        if self.config is not None and not isinstance(self.config, LtriConfig):
            raise TypeError(f"config must be an LtriConfig, got {type(self.config).__name__}")
        if not self.model_name:
            cfg = getattr(self.hf_model, "config", None)
            object.__setattr__(self, "model_name", str(getattr(cfg, "name_or_path", "") or
                                                       getattr(cfg, "model_type", "") or "ltri"))
        self._options({})  # checks the constructor's values
        return self

    def _options(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Per-call options: the fields overridden by ``kwargs`` (a clear error for an unknown or bad one)."""
        unknown = sorted(set(kwargs) - set(_CALL_OPTIONS) - {"model"})
        if unknown:
            raise TypeError(f"{type(self).__name__} got unsupported keyword arguments {unknown}; supported: "
                            f"{list(_CALL_OPTIONS)} (no tool calling or structured output)")
        if "model" in kwargs and kwargs["model"] not in (None, self.model_name):
            raise ValueError(f"model={kwargs['model']!r}: this {type(self).__name__} runs {self.model_name!r} only")
        opts = {name: kwargs.get(name, getattr(self, name)) for name in _CALL_OPTIONS}
        if opts["max_tokens"] is None:
            opts["max_tokens"] = 256
        for name in ("max_tokens", "k", "max_memory_tokens"):
            value = opts[name]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        temperature = opts["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
        if isinstance(opts["top_p"], bool) or not isinstance(opts["top_p"], (int, float)) or not 0 < opts["top_p"] <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {opts['top_p']!r}")
        if opts["timeout"] is not None and (not isinstance(opts["timeout"], (int, float)) or opts["timeout"] <= 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {opts['timeout']!r}")
        if opts["filter"] is not None and not isinstance(opts["filter"], Mapping):
            raise TypeError(f"filter must be a dict of metadata values, got {type(opts['filter']).__name__}")
        if opts["collection"] is not None and (not isinstance(opts["collection"], str) or not opts["collection"]):
            raise ValueError(f"collection must be a non-empty string or None, got {opts['collection']!r}")
        if self.memory is None and (opts["collection"] is not None or opts["filter"]):
            raise ValueError("collection / filter need a memory (ChatLtri(memory=...))")
        return opts

    def _stops(self, stop: Sequence[str] | None) -> list[str]:
        stops = list(self.stop or []) + list(stop or [])
        for s in stops:
            if not isinstance(s, str):
                raise TypeError(f"stop sequences must be strings, got {s!r}")
        return [s for s in stops if s]

    def _run(self, prompt: str | list[dict[str, str]], stop: Sequence[str] | None, chat_template: bool,
             kwargs: Mapping[str, Any], outcome: _Outcome) -> Iterator[str]:
        """Generate: yield text pieces; ``outcome`` is complete when the iterator ends."""
        opts, stops = self._options(kwargs), self._stops(stop)
        deadline = None if opts["timeout"] is None else time.monotonic() + opts["timeout"]

        def check_time(produced: int) -> None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{type(self).__name__}: generation ran past timeout={opts['timeout']} s "
                                   f"({produced} tokens generated)")

        if self.memory is not None:
            stream = self.memory.stream(prompt, opts["max_tokens"], collection=opts["collection"],
                                        filter=opts["filter"], k=opts["k"], chat_template=chat_template,
                                        temperature=float(opts["temperature"]), top_p=float(opts["top_p"]),
                                        seed=opts["seed"], stop=stops, max_memory_tokens=opts["max_memory_tokens"])
            outcome.spans, outcome.documents = list(stream.spans), list(stream.documents)
            for n, piece in enumerate(stream):
                yield piece
                check_time(n + 1)
            result = stream.result
            assert result is not None
            outcome.text, outcome.output_tokens, outcome.finish_reason = (result.text, len(result.token_ids),
                                                                          result.finish_reason)
            outcome.prompt_tokens, outcome.memory_tokens = result.prompt_tokens, result.memory_tokens
            return
        if isinstance(prompt, str) and chat_template and getattr(self.tokenizer, "chat_template", None):
            prompt = [{"role": "user", "content": prompt}]
        ids = encode_prompt(self.tokenizer, prompt)
        lock = _model_lock(self.hf_model)
        session = LtriSession(self.hf_model, self.config or LtriConfig())
        with lock:
            logits = session.feed(ids)[0]
        outcome.prompt_tokens = int(ids.numel())
        steps = decode(self.hf_model, self.tokenizer, session, logits, max_new_tokens=opts["max_tokens"], stop=stops,
                       temperature=float(opts["temperature"]), top_p=float(opts["top_p"]), seed=opts["seed"],
                       lock=lock)
        for piece, (out, text, reason) in stream_pieces(steps, stops):
            if piece:
                yield piece
            if reason is not None:
                outcome.text, outcome.output_tokens, outcome.finish_reason = text, len(out), reason
                return
            check_time(len(out))


def _text_of(i: int, message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"messages[{i}] holds a {kind!r} content block: ChatLtri reads text only "
                             "(no image, audio or file input)")
    return "".join(parts)


def _to_chat(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as ``[{"role", "content"}]`` for the tokenizer's chat template."""
    if not messages:
        raise ValueError("messages are empty")
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            if message.tool_calls:
                raise ValueError(f"messages[{i}] is an AIMessage with tool calls: ChatLtri has no tool calling")
            role = "assistant"
        elif isinstance(message, ChatMessage):
            role = message.role
        else:
            raise ValueError(f"messages[{i}] is a {type(message).__name__}: ChatLtri takes system, human, ai and "
                             "chat messages (no tool calling)")
        out.append({"role": role, "content": _text_of(i, message)})
    return out


# ------------------------------------------------------------------------------------------------ chat model
class ChatLtri(_LtriParams, BaseChatModel):
    """A LangChain chat model on the Ltri engine: over a :class:`KVMemory` it answers with in-model KV retrieval
    from the stored documents; without one it reads the (long) prompt as a stream and generates.

    Messages go through the tokenizer's chat template. ``usage_metadata`` has the real token counts:
    ``input_tokens`` = tokens read now (``response_metadata["prompt_tokens"]``: sink prefix + templated messages)
    plus tokens served from the memory (``input_token_details["cache_read"]``). ``response_metadata["spans"]`` lists
    the recalled spans (doc id, collection, character offsets, score, text), best first.

    Per-call keyword arguments (``invoke(..., k=2, collection="essays")`` or ``bind``): ``max_tokens, temperature,
    top_p, seed, k, collection, filter, max_memory_tokens, timeout``. No tool calling or structured output.

    Example::

        chat = ChatLtri(memory=memory, max_tokens=64, temperature=0)
        chat.invoke([SystemMessage("Answer briefly."), HumanMessage("Who founded Viaweb?")])
    """

    @property
    def _llm_type(self) -> str:
        return "ltri-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "top_p": self.top_p, "k": self.k, "collection": self.collection, "memory": self.memory is not None}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(ls_provider=PROVIDER, ls_model_name=kwargs.get("model") or self.model_name,
                               ls_model_type="chat", ls_temperature=kwargs.get("temperature", self.temperature),
                               ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
                               ls_stop=self._stops(stop) or None)

    def _chunks(self, messages: list[BaseMessage], stop: list[str] | None,
                run_manager: CallbackManagerForLLMRun | None, kwargs: Mapping[str, Any]
                ) -> Iterator[ChatGenerationChunk]:
        outcome = _Outcome()
        for piece in self._run(_to_chat(messages), stop, True, kwargs, outcome):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=outcome.usage(),
                                                         response_metadata=outcome.metadata(self.model_name),
                                                         chunk_position="last"),
                                  generation_info={"finish_reason": outcome.finish_reason})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        yield from self._chunks(messages, stop, run_manager, kwargs)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        outcome = _Outcome()
        streaming = self.streaming and run_manager is not None
        for piece in self._run(_to_chat(messages), stop, True, kwargs, outcome):
            if streaming and run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=ChatGenerationChunk(message=AIMessageChunk(content=piece)))
        message = AIMessage(content=outcome.text, usage_metadata=outcome.usage(),
                            response_metadata=outcome.metadata(self.model_name))
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"finish_reason": outcome.finish_reason})],
                          llm_output={"model_name": self.model_name, "token_usage": dict(outcome.usage())})


# ------------------------------------------------------------------------------------------------ text LLM
class LtriLLM(_LtriParams, LLM):
    """A LangChain text-completion LLM on the Ltri engine (same options as :class:`ChatLtri`).

    The prompt is read as plain text (``chat_template=True`` wraps it as one user message). Over a memory, the text
    follows the stored documents. ``generate`` returns per generation ``generation_info`` with ``finish_reason``,
    ``usage`` (as :class:`ChatLtri`'s ``usage_metadata``) and ``spans``; ``llm_output["token_usage"]`` sums them.
    """

    chat_template: bool = False
    """Wrap the prompt in the tokenizer's chat template as a user message."""

    @property
    def _llm_type(self) -> str:
        return "ltri"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "top_p": self.top_p, "k": self.k, "collection": self.collection, "memory": self.memory is not None,
                "chat_template": self.chat_template}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(ls_provider=PROVIDER, ls_model_name=kwargs.get("model") or self.model_name,
                               ls_model_type="llm", ls_temperature=kwargs.get("temperature", self.temperature),
                               ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
                               ls_stop=self._stops(stop) or None)

    def _complete(self, prompt: str, stop: list[str] | None, run_manager: CallbackManagerForLLMRun | None,
                  kwargs: Mapping[str, Any]) -> _Outcome:
        """Run one completion to its end (callbacks get each piece when ``streaming``)."""
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r:.60}")
        outcome = _Outcome()
        for piece in self._run(prompt, stop, self.chat_template, kwargs, outcome):
            if self.streaming and run_manager is not None:
                run_manager.on_llm_new_token(piece)
        return outcome

    def _call(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
              **kwargs: Any) -> str:
        return self._complete(prompt, stop, run_manager, kwargs).text

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        generations, totals = [], {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "cache_read": 0}
        for prompt in prompts:
            outcome = self._complete(prompt, stop, run_manager, kwargs)
            usage = outcome.usage()
            for key in ("input_tokens", "output_tokens", "total_tokens"):
                totals[key] += usage[key]
            totals["cache_read"] += outcome.memory_tokens
            info = {"usage": dict(usage), **outcome.metadata(self.model_name)}
            generations.append([Generation(text=outcome.text, generation_info=info)])
        return LLMResult(generations=generations, llm_output={"token_usage": totals, "model_name": self.model_name})

    def _stream(self, prompt: str, stop: list[str] | None = None, run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        outcome = _Outcome()
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r:.60}")
        for piece in self._run(prompt, stop, self.chat_template, kwargs, outcome):
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info={"finish_reason": outcome.finish_reason,
                                                        "usage": dict(outcome.usage()),
                                                        **outcome.metadata(self.model_name)})


# ------------------------------------------------------------------------------------------------ retriever
class LtriRetriever(DocumentIndex):
    """The spans a :class:`KVMemory` recalls for a query, as LangChain ``Document`` s, with add / upsert / get /
    delete by id (LangChain's ``DocumentIndex`` shape).

    Each hit is ``Document(id="<doc_id>:<start_char>-<end_char>", page_content=<span text>, metadata={**the
    document's metadata, "doc_id", "collection", "start_char", "end_char", "score"})``, best first.

    ``k``, ``filter`` and ``collection`` are fields and per-call keyword arguments (``invoke(q, k=3)``). Searches
    cover ``collection`` (``None``: every collection); writes go to ``collection`` or ``"default"``.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    memory: KVMemory
    k: int = 4
    collection: str | None = None
    filter: dict[str, Any] | None = None
    max_memory_tokens: int | None = None

    def __init__(self, **data: Any) -> None:
        with warnings.catch_warnings():  # DocumentIndex is marked beta in langchain-core
            warnings.simplefilter("ignore", LangChainBetaWarning)
            super().__init__(**data)
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")

    def _write_collection(self, collection: str | None) -> str:
        return collection or self.collection or DEFAULT_COLLECTION

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None, filter: Mapping[str, Any] | None = None,
                                collection: str | None = None, **kwargs: Any) -> list[Document]:
        if kwargs:
            raise TypeError(f"LtriRetriever got unsupported keyword arguments {sorted(kwargs)}; supported: "
                            "k, filter, collection")
        hits = self.memory.retrieve(query, self.k if k is None else k, filter=self.filter if filter is None else filter,
                                    collection=self.collection if collection is None else collection,
                                    max_memory_tokens=self.max_memory_tokens)
        metas: dict[tuple[str, str], dict[str, Any]] = {}
        docs = []
        for hit in hits:
            key = (hit.collection, hit.doc_id)
            if key not in metas:
                metas[key] = self.memory.get([hit.doc_id], collection=hit.collection)[0].metadata
            meta = {**metas[key], "doc_id": hit.doc_id, "collection": hit.collection, "start_char": hit.char_start,
                    "end_char": hit.char_end, "score": hit.score}
            docs.append(Document(id=f"{hit.doc_id}:{hit.char_start}-{hit.char_end}", page_content=hit.text,
                                 metadata=meta))
        return docs

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       **kwargs: Any) -> list[Document]:
        """:meth:`_get_relevant_documents` in a worker thread (the model runs one call at a time)."""
        return await asyncio.to_thread(self._get_relevant_documents, query,
                                       run_manager=run_manager.get_sync(), **kwargs)

    def add_documents(self, documents: Sequence[Document], ids: Sequence[str] | None = None, *,
                      collection: str | None = None) -> list[str]:
        """Ingest ``documents`` (text, metadata) into the memory; ids from ``ids``, else each ``Document.id``, else
        random. Re-adding an id replaces that document. Returns the ids."""
        if isinstance(documents, Document) or not isinstance(documents, Sequence):
            raise TypeError(f"documents must be a list of Document, got {type(documents).__name__}")
        for i, doc in enumerate(documents):
            if not isinstance(doc, Document):
                raise TypeError(f"documents[{i}] must be a Document, got {type(doc).__name__}")
        if ids is None:
            ids = [doc.id or uuid.uuid4().hex for doc in documents]
        return self.memory.add_documents([d.page_content for d in documents], [d.metadata for d in documents],
                                         list(ids), collection=self._write_collection(collection), progress=False)

    def upsert(self, items: Sequence[Document], /, **kwargs: Any) -> UpsertResponse:
        """Add or replace ``items`` by ``Document.id`` (``collection=`` keyword optional)."""
        ids = self.add_documents(items, collection=kwargs.pop("collection", None), **kwargs)
        return UpsertResponse(succeeded=ids, failed=[])

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> DeleteResponse:
        """Delete documents by id (``collection=`` keyword optional).

        Raises:
            ValueError: no ids.
            DocumentNotFound: an id is not stored (nothing is deleted then).
        """
        if not ids:
            raise ValueError("delete needs a non-empty list of document ids")
        collection = self._write_collection(kwargs.pop("collection", None))
        if kwargs:
            raise TypeError(f"delete got unsupported keyword arguments {sorted(kwargs)}")
        self.memory.delete(ids, collection=collection)
        return DeleteResponse(num_deleted=len(ids), succeeded=list(ids), failed=[], num_failed=0)

    def get(self, ids: Sequence[str], /, **kwargs: Any) -> list[Document]:
        """The whole stored documents with these ids (missing ids are skipped), ``Document.id`` = doc id."""
        collection = self._write_collection(kwargs.pop("collection", None))
        if kwargs:
            raise TypeError(f"get got unsupported keyword arguments {sorted(kwargs)}")
        stored = {doc_id for _, doc_id in self.memory.list_documents(collection)}
        present = [i for i in ids if i in stored]
        if not present:
            return []
        return [Document(id=info.doc_id, page_content=info.text,
                         metadata={**info.metadata, "doc_id": info.doc_id, "collection": info.collection})
                for info in self.memory.get(present, collection=collection)]

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """``VectorStore``-style alias of :meth:`get`."""
        return self.get(ids)


# ------------------------------------------------------------------------------------------------ chat history
class KVChatMessageHistory(BaseChatMessageHistory):
    """Chat history kept in a :class:`KVMemory`: every message is ingested as a document of the collection
    ``collection_prefix + session_id``, so old turns are recalled by in-model retrieval.

    Example::

        history = KVChatMessageHistory(memory, session_id="user-1")
        history.add_messages([HumanMessage("My locker code is 4711."), AIMessage("Noted.")])
        history.recall("locker code")                                   # Documents of the matching turns
        ChatLtri(memory=memory, collection=history.collection).invoke("What is my locker code?")
    """

    def __init__(self, memory: KVMemory, session_id: str, *, collection_prefix: str = "chat:") -> None:
        if not isinstance(memory, KVMemory):
            raise TypeError(f"memory must be a KVMemory, got {type(memory).__name__}")
        if not isinstance(session_id, str) or not session_id.strip():
            raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
        self.memory, self.session_id = memory, session_id
        self.collection = f"{collection_prefix}{session_id}"

    def _ids(self) -> list[str]:
        return [doc_id for _, doc_id in self.memory.list_documents(self.collection)]

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The session's messages in the order they were added."""
        ids = self._ids()
        if not ids:
            return []
        infos = sorted(self.memory.get(ids, collection=self.collection), key=lambda d: d.metadata["index"])
        return messages_from_dict([d.metadata["message"] for d in infos])

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Ingest ``messages`` (each read through the model once) after the existing ones."""
        messages = list(messages)
        for i, message in enumerate(messages):
            if not isinstance(message, BaseMessage):
                raise TypeError(f"messages[{i}] must be a BaseMessage, got {type(message).__name__}")
        if not messages:
            return
        start = len(self._ids())
        texts, metas, ids = [], [], []
        for n, message in enumerate(messages, start):
            content = message.content if isinstance(message.content, str) else message.text
            texts.append(f"{message.type}: {content}" if content.strip() else f"{message.type}: (empty)")
            metas.append({"session_id": self.session_id, "index": n, "role": message.type,
                          "message": message_to_dict(message)})
            ids.append(f"msg-{n:08d}")
        self.memory.add_documents(texts, metas, ids, collection=self.collection, progress=False)

    def clear(self) -> None:
        """Delete the session's messages from the memory."""
        ids = self._ids()
        if ids:
            self.memory.delete(ids, collection=self.collection)

    def recall(self, query: str, k: int = 4) -> list[Document]:
        """The turns' spans the model attends to for ``query`` (as :class:`LtriRetriever` returns them)."""
        return self.as_retriever(k=k).invoke(query)

    def as_retriever(self, **kwargs: Any) -> LtriRetriever:
        """An :class:`LtriRetriever` over this session's collection."""
        return LtriRetriever(memory=self.memory, collection=self.collection, **kwargs)
