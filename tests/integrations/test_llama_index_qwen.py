"""LlamaIndex adapters on the real Qwen2.5-Coder-0.5B (CPU, slow): a VectorStoreIndex-free pipeline over Paul Graham
essays (retriever -> KV query engine, and the text-RAG engine over the same retriever) and the chat memory block
recalling a fact said 20+ turns earlier. The model and the essay memory are built once per test session
(tests/integrations/conftest.py, shared with the LangChain tests)."""

from __future__ import annotations

import asyncio
import os
import re

import pytest
import torch
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.memory import Memory
from ltri_rag.integrations.llama_index import (
    LtriLLM,
    LtriMemoryBlock,
    LtriQueryEngine,
    text_rag_query_engine,
)

from ltri_rag import KVMemory, LtriConfig
from tests.integrations.conftest import QWEN_CONFIG, essay_memory, needs_qwen, qwen

pytestmark = [pytest.mark.slow, needs_qwen]

QUESTION = "How many startup founders has the author worked with?"  # "boss": "over 200 of them"


@pytest.fixture(scope="module")
def cpu_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # (other test modules run torch single-threaded)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def essays(cpu_threads) -> KVMemory:
    return essay_memory()


ANSWER = re.compile(r"\b200\b")  # (not "2009")


def _brief(nodes) -> list[tuple[str, str]]:
    return [(n.node.node_id, n.node.text[:60]) for n in nodes]


def test_retriever_to_query_engine_answers_with_the_source_essay(essays) -> None:
    # in-model KV retrieval: the essays are served from the memory, the prompt is the question
    response = LtriQueryEngine(memory=essays, max_new_tokens=16, similarity_top_k=4).query(QUESTION)
    assert ANSWER.search(response.response), response.response
    # the passage with the answer is the first recalled span (ranking by the attention paid beyond a neutral
    # question's; by raw attention it ranked 4th, behind the documents' opening spans)
    first = response.source_nodes[0].node
    assert first.ref_doc_id == "boss" and "over 200" in first.text, _brief(response.source_nodes)
    cited = [n.node for n in response.source_nodes if n.node.ref_doc_id == "boss" and "over 200" in n.node.text]
    assert cited and cited[0].metadata["essay"] == "boss", _brief(response.source_nodes)
    assert essays.get(["boss"])[0].text[cited[0].start_char_idx:cited[0].end_char_idx] == cited[0].text
    assert response.metadata["prompt_tokens"] < 120 < response.metadata["memory_tokens"]
    # the plain text RAG: LtriRetriever -> RetrieverQueryEngine, the same spans pasted into the QA prompt
    model, tokenizer = qwen()
    llm = LtriLLM(model, tokenizer, LtriConfig(**QWEN_CONFIG), num_output=16)
    rag = text_rag_query_engine(essays, llm, similarity_top_k=4).query(QUESTION)
    assert _brief(rag.source_nodes) == _brief(response.source_nodes)
    assert ANSWER.search(str(rag)), str(rag)


FACT = "By the way, my sister Ingrid lives in Trondheim and works as a glassblower."
FILLER = [("What is {a} plus {b}?", "{a} plus {b} is {c}."), ("Name a colour.", "Blue is a colour."),
          ("Say something about the weather.", "It is cloudy today.")]


def test_memory_block_recalls_a_fact_said_twenty_turns_earlier(cpu_threads, tmp_path) -> None:
    model, tokenizer = qwen()
    with KVMemory.create(tmp_path / "chat", model, tokenizer, LtriConfig(**QWEN_CONFIG)) as kv:
        block = LtriMemoryBlock(memory=kv, similarity_top_k=2)
        chat = Memory.from_defaults(session_id="user-1", token_limit=160, chat_history_token_ratio=0.5,
                                    token_flush_size=80, memory_blocks=[block],
                                    tokenizer_fn=lambda text: tokenizer(text)["input_ids"])
        chat.put(ChatMessage(role="user", content=FACT))
        chat.put(ChatMessage(role="assistant", content="Nice, thanks for telling me."))
        for i in range(22):
            question, answer = FILLER[i % len(FILLER)]
            values = {"a": i, "b": 2 * i, "c": 3 * i}
            chat.put(ChatMessage(role="user", content=question.format(**values)))
            chat.put(ChatMessage(role="assistant", content=answer.format(**values)))
        active = asyncio.run(chat.sql_store.get_messages("user-1"))
        assert all("Trondheim" not in (m.content or "") for m in active)  # the fact left the short-term memory
        messages = chat.get(input="Which city does my sister live in?")
        assert "Trondheim" in messages[0].content and messages[0].role == "system", messages[0].content
        reply = LtriLLM(model, tokenizer, LtriConfig(**QWEN_CONFIG), num_output=16).chat(
            [*messages, ChatMessage(role="user", content="Which city does my sister live in?")])
        assert "Trondheim" in reply.message.content, reply.message.content
