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

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import (
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.llms import LLM
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession
from ltri_rag.generation import encode_prompt
from ltri_rag.hook import model_lock
from ltri_rag.memory import KVMemory
from ltri_rag.memory_fingerprint import weights_sha256
from ltri_rag.memory_query import decode, stream_pieces
from ltri_rag.store import SpanHit

__all__ = ["ChatLtri", "LtriLLM", "span_metadata"]

PROVIDER = "ltri_rag"


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


def _weights_id(model: Any) -> str:
    """A hash of the model's weights (:func:`~ltri_rag.memory_fingerprint.weights_sha256`, cached per model object
    until a parameter changes)."""
    return weights_sha256(model)


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

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` by the model's own tokenizer (LangChain's default counts with GPT-2's, which it
        downloads), so ``get_num_tokens`` and ``trim_messages(token_counter=...)`` count what the model reads."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

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
                             f"(got hf_model={type(self.hf_model).__name__}, "
                             f"tokenizer={type(self.tokenizer).__name__})")
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

    def _params(self) -> dict[str, Any]:
        """The settings that identify this model (LangChain's ``_identifying_params``, also the key of an LLM
        cache: every setting that changes the answer is in it, and the weights and memory it answers from)."""
        if self.memory is not None:
            source = {"memory": str(getattr(self.memory.store, "url", "") or id(self.memory.store)),
                      "fingerprint": self.memory.fingerprint.to_json()}
        else:
            source = {"memory": None, "weights_sha256": _weights_id(self.hf_model),
                      "config": repr(self.config or LtriConfig())}
        return {"model_name": self.model_name, "temperature": self.temperature, "max_tokens": self.max_tokens,
                "top_p": self.top_p, "seed": self.seed, "stop": self.stop, "k": self.k, "collection": self.collection,
                "filter": self.filter, "max_memory_tokens": self.max_memory_tokens, **source}

    def _ls_params(self, model_type: str, stop: list[str] | None, kwargs: Mapping[str, Any]) -> LangSmithParams:
        """LangSmith's tracing parameters for a call (``model_type``: ``chat`` or ``llm``)."""
        return LangSmithParams(ls_provider=PROVIDER, ls_model_name=kwargs.get("model") or self.model_name,
                               ls_model_type=model_type, ls_temperature=kwargs.get("temperature", self.temperature),
                               ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
                               ls_stop=self._stops(stop) or None)

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
        lock = model_lock(self.hf_model)
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


_CHAT_ROLES = {"human": "user", "ai": "assistant"}


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
        elif isinstance(message, ChatMessage):  # LangChain's own names mapped to the template's
            role = _CHAT_ROLES.get(message.role, message.role)
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"messages[{i}] is a ChatMessage with role {message.role!r}: ChatLtri takes "
                                 f"system / user / assistant (or human / ai)")
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
        return self._params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("chat", stop, kwargs)

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
        return {**self._params(), "chat_template": self.chat_template}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("llm", stop, kwargs)

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
