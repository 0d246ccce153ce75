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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import torch
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from torch import nn

from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession
from ltri_rag.generation import encode_text
from ltri_rag.hook import model_lock
from ltri_rag.memory import KVMemory, MemoryAnswer
from ltri_rag.memory_query import decode, stream_pieces

__all__ = ["LtriLLM", "chat_template_prompt"]

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
        self._lock = model_lock(model)  # shared with every other user of this model (KVMemory included)

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
        ids = encode_text(self._tokenizer, text)  # the BOS a chat template put in is not doubled
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
        return self._completion(prompt, formatted, self._gen_args(kwargs))

    def _completion(self, prompt: Any, formatted: bool, args: dict[str, Any]) -> CompletionResponse:
        """The whole completion of ``prompt`` (text, or chat messages for the memory), with no callback event."""
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
        return self._stream_responses(steps, raw)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Chat: with a memory the messages go to :meth:`KVMemory.generate` (the last user message is the question
        recalled against); without one through ``messages_to_prompt``."""
        from llama_index.core.base.llms.generic_utils import completion_response_to_chat_response

        # one callback event per call (this method's): not CustomLLM.chat -> complete, two more decorated calls
        prompt = _messages_to_dicts(messages) if self._memory is not None else self.messages_to_prompt(messages)
        return completion_response_to_chat_response(self._completion(prompt, True, self._gen_args(kwargs)))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Streaming :meth:`chat`."""
        from llama_index.core.base.llms.generic_utils import stream_completion_response_to_chat_response

        prompt = _messages_to_dicts(messages) if self._memory is not None else self.messages_to_prompt(messages)
        steps, raw = self._steps(prompt, True, self._gen_args(kwargs))
        return stream_completion_response_to_chat_response(self._stream_responses(steps, raw))

    @staticmethod
    def _stream_responses(steps: Any, raw: Callable[[], dict[str, Any]]) -> CompletionResponseGen:
        """Responses of a stream: ``text`` so far and ``delta`` per non-empty piece; the last one carries ``raw``."""
        text = ""
        for piece, (_, _, reason) in steps:
            text += piece
            if reason is not None:
                yield CompletionResponse(text=text, delta=piece, raw=raw())
                return
            if piece:
                yield CompletionResponse(text=text, delta=piece)

    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """:meth:`complete` in a worker thread (the event loop stays free; the model runs one call at a time)."""
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """:meth:`chat` in a worker thread."""
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
        """:meth:`stream_complete` with every step (prefill included) in a worker thread: the event loop stays free
        (CustomLLM's default would run the model in the loop's thread)."""
        return _in_threads(await asyncio.to_thread(self.stream_complete, prompt, formatted, **kwargs))

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> Any:
        """:meth:`stream_chat` with every step in a worker thread."""
        return _in_threads(await asyncio.to_thread(self.stream_chat, messages, **kwargs))


async def _in_threads(responses: Iterator[Any]) -> AsyncIterator[Any]:
    """An async generator over ``responses``, each ``next`` (the model's work) run in a worker thread."""
    done = object()
    while True:
        item = await asyncio.to_thread(next, responses, done)
        if item is done:
            return
        yield item


def _answer_raw(answer: MemoryAnswer) -> dict[str, Any]:
    return {"usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": len(answer.token_ids),
                      "total_tokens": answer.prompt_tokens + len(answer.token_ids),
                      "memory_tokens": answer.memory_tokens},
            "finish_reason": answer.finish_reason, "documents": list(answer.documents),
            "spans": [(h.collection, h.doc_id, h.char_start, h.char_end, h.score) for h in answer.spans],
            "engine_usage": dict(answer.usage)}


# ------------------------------------------------------------------------------------------------ the retriever
