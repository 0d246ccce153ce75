"""LangChain's standard integration tests for :class:`ChatLtri` and :class:`LtriRetriever` on the real
Qwen2.5-Coder-0.5B, offline on CPU (the model loads once per test session; answers are kept short).

Unsupported features are switched off through the test classes' properties, which makes LangChain skip those tests
with a reason: tool calling, tool choice, structured output, JSON mode, image / PDF / audio input, model override
(one local model per instance).
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests

from ltri_rag import LtriConfig
from ltri_rag.integrations.langchain import ChatLtri, LtriRetriever
from tests.integrations.conftest import QWEN_CONFIG, essay_memory, needs_qwen, qwen

pytestmark = [pytest.mark.slow, needs_qwen]


class TestChatLtriStandard(ChatModelIntegrationTests):
    """``ChatLtri`` without a memory (the prompt read by the engine); ``cache_read`` checked over the essays' memory."""

    @property
    def chat_model_class(self) -> type[ChatLtri]:
        return ChatLtri

    @property
    def chat_model_params(self) -> dict[str, Any]:
        model, tokenizer = qwen()
        # short answers keep the suite fast on 2 CPU cores; no timeout (a shared CI machine may be slow)
        return {"hf_model": model, "tokenizer": tokenizer, "config": LtriConfig(**QWEN_CONFIG), "max_tokens": 8,
                "timeout": None}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        chat = ChatLtri(memory=essay_memory(), max_tokens=8, k=2)
        question = "How many startup founders has the author worked with?"
        if not stream:
            return chat.invoke(question)
        full = None
        for chunk in chat.stream(question):
            full = chunk if full is None else full + chunk
        return full  # type: ignore[return-value]


class TestLtriRetrieverStandard(RetrieversIntegrationTests):
    """``LtriRetriever`` over a few essays ingested into a :class:`KVMemory`."""

    @property
    def retriever_constructor(self) -> type[LtriRetriever]:
        return LtriRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"memory": essay_memory()}

    @property
    def retriever_query_example(self) -> str:
        return "How many startup founders has the author worked with?"
