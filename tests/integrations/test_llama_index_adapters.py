"""LlamaIndex adapters on tiny random models: token usage, streaming, retriever nodes, filters, the KV query
engine, the text-RAG engine, the chat memory block and bad input (the real model: test_llama_index_qwen.py)."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.memory import Memory
from llama_index.core.schema import NodeRelationship, QueryBundle
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
)
from ltri_rag.integrations.llama_index import (
    LtriLLM,
    LtriMemoryBlock,
    LtriQueryEngine,
    LtriRetriever,
    filters_to_memory_filter,
    text_rag_query_engine,
)
from ltri_rag.storage import SqlSpanStore

import ltri_rag
from ltri_rag import KVMemory, LtriConfig
from tests.unit.tiny_models import tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer

DOCS = {
    "fox": "The quick brown fox jumps over the lazy dog near the river bank every morning.",
    "paris": "Paris is the capital of France. The Seine flows through it; the Louvre is there.",
    "cafe": "Un café au lait, s'il vous plaît: naïve façade, garçon, déjà vu, à bientôt.",
}
META = {"fox": {"lang": "en", "n": 1}, "paris": {"lang": "en", "n": 2}, "cafe": {"lang": "fr", "n": 3}}


def _config() -> LtriConfig:
    return LtriConfig(mode="ltri", num_sink_tokens=4, local_window=16, chunk_size=8, budget=12, page_size=5,
                      evict_stride=4, span_min_len=2, span_max_len=6)


@pytest.fixture(scope="module")
def llama():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield tiny_model("llama")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def mem(tmp_path, llama, tok):
    with KVMemory.create(tmp_path / "m", llama, tok, _config(), store=SqlSpanStore) as memory:
        memory.add_documents(list(DOCS.values()), [META[k] for k in DOCS], list(DOCS), progress=False)
        yield memory


def _counter(tok) -> TokenCountingHandler:
    return TokenCountingHandler(tokenizer=lambda text: tok(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------- the LLM
def test_complete_reports_the_real_token_counts_and_token_counting_sees_them(llama, tok) -> None:
    counter = _counter(tok)
    llm = LtriLLM(llama, tok, _config(), num_output=9, callback_manager=CallbackManager([counter]))
    response = llm.complete("Where does the Seine flow?")
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": "Where does the Seine flow?"}],
                                         tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt_ids, add_special_tokens=False)["input_ids"])
    usage = response.raw["usage"]
    assert usage["prompt_tokens"] == n_prompt and usage["total_tokens"] == n_prompt + usage["completion_tokens"]
    # a character tokenizer: one token per generated character (the eos token is not generated text)
    assert 0 < usage["completion_tokens"] <= 9 and usage["completion_tokens"] == len(response.text)
    # the same tokens as ltri_rag.generate reading the same templated prompt
    expected = ltri_rag.generate(llama, tok, [{"role": "user", "content": "Where does the Seine flow?"}], _config(),
                                 max_new_tokens=9)
    assert response.text == expected
    assert counter.prompt_llm_token_count == n_prompt
    assert counter.completion_llm_token_count == usage["completion_tokens"]
    # chat goes through the tokenizer's chat template
    chat = llm.chat([ChatMessage(role="user", content="Where does the Seine flow?")])
    assert chat.message.content == expected and chat.raw["usage"]["prompt_tokens"] == n_prompt
    assert llm.metadata.num_output == 9 and llm.metadata.context_window == 4096 and not llm.metadata.is_chat_model


def test_stream_deltas_concatenate_to_the_completion(llama, tok) -> None:
    llm = LtriLLM(llama, tok, _config(), num_output=12)
    full = llm.complete("The quick brown fox", formatted=True)
    chunks = list(llm.stream_complete("The quick brown fox", formatted=True))
    assert "".join(c.delta for c in chunks) == chunks[-1].text == full.text
    assert all(a.text + b.delta == b.text for a, b in itertools.pairwise(chunks))
    assert chunks[-1].raw["usage"] == full.raw["usage"]
    # formatted: read as is, with the BOS token the tokenizer adds
    assert full.raw["usage"]["prompt_tokens"] == len("The quick brown fox") + 1
    # a stop string cuts the text, in both
    stop = full.text[3:5]
    cut = llm.complete("The quick brown fox", formatted=True, stop=[stop])
    assert cut.text == full.text[:full.text.find(stop)]
    assert "".join(c.delta for c in llm.stream_complete("The quick brown fox", formatted=True, stop=[stop])) == cut.text
    assert asyncio.run(llm.acomplete("The quick brown fox", formatted=True)).text == full.text


def test_llm_bad_input_names_the_bad_value(llama, tok) -> None:
    with pytest.raises(ValueError, match="num_output must be a positive int, got 0"):
        LtriLLM(llama, tok, num_output=0)
    with pytest.raises(ValueError, match="needs model= and tokenizer="):
        LtriLLM()
    with pytest.raises(TypeError, match="config must be an LtriConfig, got dict"):
        LtriLLM(llama, tok, {"mode": "ltri"})
    llm = LtriLLM(llama, tok, _config(), num_output=2)
    with pytest.raises(TypeError, match=r"unknown keyword arguments \['max_tokenz'\]"):
        llm.complete("hi", max_tokenz=3)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        llm.complete("", formatted=True)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        llm.complete("hi", temperature=-1)


def test_llm_over_a_memory_answers_as_the_memory_does(mem) -> None:
    counter = _counter(mem.tokenizer)
    llm = LtriLLM(memory=mem, num_output=8, callback_manager=CallbackManager([counter]))
    response = llm.complete("What is the capital of France?")
    answer = mem.generate("What is the capital of France?", 8)
    assert response.text == answer.text
    usage = response.raw["usage"]
    assert usage == {"prompt_tokens": answer.prompt_tokens, "completion_tokens": len(answer.token_ids),
                     "total_tokens": answer.prompt_tokens + len(answer.token_ids),
                     "memory_tokens": answer.memory_tokens}
    assert counter.prompt_llm_token_count == answer.prompt_tokens
    chunks = list(llm.stream_complete("What is the capital of France?"))
    assert "".join(c.delta for c in chunks) == answer.text and chunks[-1].raw["usage"] == usage
    chat = llm.chat([ChatMessage(role="user", content="What is the capital of France?")])
    assert chat.message.content == answer.text  # messages go to the memory, through the template


# --------------------------------------------------------------------------------------------- the retriever
def test_retriever_nodes_carry_text_offsets_scores_and_the_source_document(mem) -> None:
    retriever = LtriRetriever(mem, similarity_top_k=3)
    nodes = retriever.retrieve("What is the capital of France?")
    hits = mem.retrieve("What is the capital of France?", 3)
    assert len(nodes) == 3 and [n.node.text for n in nodes] == [h.text for h in hits]
    for n in nodes:
        meta = n.node.metadata
        doc = meta["doc_id"]
        assert DOCS[doc][meta["start_char"]:meta["end_char"]] == n.node.text
        assert (n.node.start_char_idx, n.node.end_char_idx) == (meta["start_char"], meta["end_char"])
        assert meta["lang"] == META[doc]["lang"] and meta["n"] == META[doc]["n"] and meta["collection"] == "default"
        assert n.node.relationships[NodeRelationship.SOURCE].node_id == doc == n.node.ref_doc_id
        assert 0 < n.score <= 1 and n.score == meta["score"]
        assert n.node.node_id == f"default/{doc}:{meta['start_char']}-{meta['end_char']}"
    assert [n.score for n in nodes] == sorted((n.score for n in nodes), reverse=True)
    assert [n.node.node_id for n in retriever.retrieve("What is the capital of France?")] == \
        [n.node.node_id for n in nodes]  # stable ids
    assert [n.node.node_id for n in asyncio.run(retriever.aretrieve(QueryBundle("What is the capital of France?")))
            ] == [n.node.node_id for n in nodes]
    assert len(LtriRetriever(mem, similarity_top_k=1).retrieve("the fox")) == 1


def test_retriever_filters(mem) -> None:
    mem.add_documents(["Bonjour, la tour Eiffel est à Paris."], [{"lang": "fr"}], ["eiffel"], collection="other",
                      progress=False)
    french = MetadataFilters(filters=[MetadataFilter(key="lang", value="fr")])
    nodes = LtriRetriever(mem, 4, filters=french).retrieve("Where is the tower?")
    assert nodes and {n.node.metadata["doc_id"] for n in nodes} <= {"cafe", "eiffel"}
    nodes = LtriRetriever(mem, 4, filters=french, collection="default").retrieve("Where is the tower?")
    assert {n.node.metadata["doc_id"] for n in nodes} == {"cafe"}
    by_key = MetadataFilters(filters=[MetadataFilter(key="collection", value="other")])
    assert {n.node.metadata["collection"] for n in LtriRetriever(mem, 4, filters=by_key).retrieve("tower")} == {"other"}
    two = {"lang": "en", "n": 2}
    assert {n.node.metadata["doc_id"] for n in LtriRetriever(mem, 4, filters=two).retrieve("river")} == {"paris"}
    assert LtriRetriever(mem, 4, filters={"lang": "de"}).retrieve("river") == []


@pytest.mark.parametrize("filters, error, match", [
    (MetadataFilters(filters=[MetadataFilter(key="n", value=2, operator=FilterOperator.GT)]), ValueError,
     "filter on 'n': operator '>' is not supported"),
    (MetadataFilters(filters=[MetadataFilter(key="lang", value="fr"), MetadataFilter(key="n", value=1)],
                     condition=FilterCondition.OR), ValueError, "only AND filters are supported.*'or'"),
    (MetadataFilters(filters=[MetadataFilters(filters=[MetadataFilter(key="lang", value="fr")])]), ValueError,
     "nested filters"),
    ({"lang": ["en", "fr"]}, ValueError, r"filter on 'lang': a list value \['en', 'fr'\]"),
    ("lang=fr", TypeError, "filters must be MetadataFilters or a dict, got str"),
])
def test_unsupported_filters_are_refused_naming_them(filters, error, match) -> None:
    with pytest.raises(error, match=match):
        filters_to_memory_filter(filters)


def test_retriever_bad_input_names_the_bad_value(mem) -> None:
    with pytest.raises(ValueError, match="similarity_top_k must be a positive int, got 0"):
        LtriRetriever(mem, similarity_top_k=0)
    with pytest.raises(TypeError, match="memory must be a KVMemory, got str"):
        LtriRetriever("mem")
    with pytest.raises(ValueError, match="collection='a' contradicts the filter collection == 'b'"):
        LtriRetriever(mem, collection="a", filters={"collection": "b"})
    with pytest.raises(ValueError, match="query must be a non-empty string"):
        LtriRetriever(mem).retrieve("  ")


# --------------------------------------------------------------------------------------------- query engines
def test_kv_query_engine_answers_from_memory_with_the_recalled_spans(mem) -> None:
    counter = _counter(mem.tokenizer)
    engine = LtriQueryEngine(memory=mem, max_new_tokens=8, similarity_top_k=2,
                             callback_manager=CallbackManager([counter]))
    response = engine.query("What is the capital of France?")
    answer = mem.generate([{"role": "user", "content": "What is the capital of France?"}], 8, k=2)
    assert response.response == answer.text
    assert [n.node.text for n in response.source_nodes] == [h.text for h in answer.spans]
    assert all(n.node.ref_doc_id == n.node.metadata["doc_id"] for n in response.source_nodes)
    assert response.metadata["prompt_tokens"] == answer.prompt_tokens
    assert response.metadata["memory_tokens"] == sum(len(mem.tokenizer(t, add_special_tokens=False)["input_ids"])
                                                     for t in DOCS.values())
    assert response.metadata["documents"] == [("default", k) for k in sorted(DOCS)]
    assert counter.prompt_llm_token_count == answer.prompt_tokens
    assert counter.completion_llm_token_count == len(answer.token_ids)
    french = LtriQueryEngine(memory=mem, max_new_tokens=4, filters={"lang": "fr"}).query("café?")
    assert french.metadata["documents"] == [("default", "cafe")]
    assert asyncio.run(engine.aquery("What is the capital of France?")).response == answer.text
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got -3"):
        LtriQueryEngine(memory=mem, max_new_tokens=-3)
    with pytest.raises(ValueError, match="operator '!=' is not supported"):
        LtriQueryEngine(memory=mem, filters=MetadataFilters(filters=[
            MetadataFilter(key="lang", value="fr", operator=FilterOperator.NE)]))
    with pytest.raises(ValueError, match="collection='default' contradicts the filter collection == 'other'"):
        LtriQueryEngine(memory=mem, collection="default", filters={"collection": "other"})  # (it answered anyway)


def test_text_rag_query_engine_pastes_the_spans_into_the_prompt(mem) -> None:
    counter = _counter(mem.tokenizer)
    llm = LtriLLM(mem.model, mem.tokenizer, _config(), num_output=6, callback_manager=CallbackManager([counter]))
    engine = text_rag_query_engine(mem, llm, similarity_top_k=2, callback_manager=CallbackManager([counter]))
    response = engine.query("What is the capital of France?")
    hits = mem.retrieve("What is the capital of France?", 2)
    assert [n.node.text for n in response.source_nodes] == [h.text for h in hits]
    prompt = counter.llm_token_counts[-1].prompt
    # (LlamaIndex strips the whitespace a node's text begins or ends with when it pastes it)
    assert all(h.text.strip() in prompt for h in hits) and "What is the capital of France?" in prompt
    assert "start_char" not in prompt  # the offsets stay out of the LLM's context
    assert prompt.startswith("<s><|user|>Context information")  # the QA prompt went through the chat template
    assert counter.llm_token_counts[-1].prompt_token_count > len("What is the capital of France?")


# --------------------------------------------------------------------------------------------- chat memory
def test_memory_block_stores_flushed_turns_and_recalls_whole_old_messages(mem) -> None:
    tok = mem.tokenizer
    block = LtriMemoryBlock(memory=mem, similarity_top_k=2)
    chat = Memory.from_defaults(session_id="s1", token_limit=120, chat_history_token_ratio=0.5, token_flush_size=40,
                                memory_blocks=[block], tokenizer_fn=lambda t: tok(t)["input_ids"])
    said = []
    for i in range(6):
        for role, text in (("user", f"Note {i}: my locker number is {100 + i}."), ("assistant", f"Noted {i}.")):
            chat.put(ChatMessage(role=role, content=text))
            said.append(f"{role}: {text}")
    stored = [doc for coll, doc in mem.list_documents("chat_memory")]
    assert stored, "nothing left the short-term memory"
    infos = mem.get(stored, collection="chat_memory")
    assert all(info.metadata["session_id"] == "s1" for info in infos)
    flushed = "".join(info.text for info in sorted(infos, key=lambda i: i.doc_id)).splitlines()
    assert flushed == said[:len(flushed)]  # oldest turns, in order
    recalled = asyncio.run(block.aget([ChatMessage(role="user", content="What is my locker number?")],
                                      session_id="s1"))
    assert recalled and all(line in flushed for line in recalled.splitlines())
    assert asyncio.run(block.aget([ChatMessage(role="user", content="locker?")], session_id="other")) == ""
    messages = chat.get(input="What is my locker number?")
    assert recalled in messages[0].content and messages[0].role == "system"
    with pytest.raises(ValueError, match="similarity_top_k must be a positive int, got 0"):
        LtriMemoryBlock(memory=mem, similarity_top_k=0)


def test_chat_without_a_memory_is_one_counted_event(llama, tok) -> None:
    """``chat`` formats the messages and completes them itself: one LLM event per call (through CustomLLM.chat and
    complete it was three, and TokenCountingHandler counted the prompt three times)."""
    counter = _counter(tok)
    llm = LtriLLM(llama, tok, _config(), num_output=6, callback_manager=CallbackManager([counter]))
    response = llm.chat([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")])
    assert len(counter.llm_token_counts) == 1
    assert counter.prompt_llm_token_count == response.raw["usage"]["prompt_tokens"]
    counter.reset_counts()
    streamed = "".join(r.delta or "" for r in llm.stream_chat([ChatMessage(role="user", content="Hi")]))
    assert len(counter.llm_token_counts) == 1 and streamed == llm.chat([ChatMessage(role="user",
                                                                                     content="Hi")]).message.content


def test_async_streams_leave_the_event_loop_free(llama, tok) -> None:
    """``astream_complete`` / ``astream_chat`` run the model in worker threads: a ticker coroutine keeps running
    while they stream, and their pieces are the synchronous stream's."""
    llm = LtriLLM(llama, tok, _config(), num_output=12)

    async def streamed(make) -> tuple[str, int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        text = "".join([r.delta or "" async for r in await make()])
        stop.set()
        await task
        return text, ticks

    text, ticks = asyncio.run(streamed(lambda: llm.astream_complete("The quick brown fox", formatted=True)))
    assert text == llm.complete("The quick brown fox", formatted=True).text and ticks > 3
    text, ticks = asyncio.run(streamed(lambda: llm.astream_chat([ChatMessage(role="user", content="Hi")])))
    assert text == llm.chat([ChatMessage(role="user", content="Hi")]).message.content and ticks > 3
