"""The LangChain adapters' logic on tiny random models (fast): usage counts equal the real token counts, streaming
equals invoke, stop sequences cut, options and bad input, the retriever's filters / add / delete / get, the chat
history, and LangChain's standard unit tests for :class:`ChatLtri`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, message_to_dict
from langchain_tests.unit_tests import ChatModelUnitTests
from ltri_rag.storage import SqlSpanStore

from ltri_rag import KVMemory, LtriConfig, generate_ids
from ltri_rag.generation import encode_prompt
from ltri_rag.integrations.langchain import ChatLtri, KVChatMessageHistory, LtriLLM, LtriRetriever
from ltri_rag.store import DocumentNotFound
from tests.unit.tiny_models import tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer

torch.set_num_threads(1)  # tiny tensors (as tests/unit/conftest.py)

DOCS = {
    "fox": "The quick brown fox jumps over the lazy dog near the river bank every morning.",
    "paris": "Paris is the capital of France. The Seine flows through it; the Louvre is there.",
    "cafe": "Un café au lait, s'il vous plaît: naïve façade, garçon, déjà vu, à bientôt.",
}
META = {"fox": {"lang": "en", "n": 1}, "paris": {"lang": "en", "n": 2}, "cafe": {"lang": "fr", "n": 3}}
CONFIG = LtriConfig(mode="ltri", num_sink_tokens=4, local_window=16, chunk_size=8, budget=12, page_size=5,
                    evict_stride=4, span_min_len=2, span_max_len=6)
_TINY: dict[str, Any] = {}


def tiny() -> tuple[Any, Any]:
    if not _TINY:
        _TINY.update(model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    return _TINY["model"], _TINY["tokenizer"]


@pytest.fixture
def memory(tmp_path):
    model, tok = tiny()
    with KVMemory.create(tmp_path / "m", model, tok, CONFIG, store=SqlSpanStore) as mem:
        yield mem


@pytest.fixture
def retriever(memory) -> LtriRetriever:
    r = LtriRetriever(memory=memory, k=2)
    r.add_documents([Document(page_content=text, metadata=META[key]) for key, text in DOCS.items()], ids=list(DOCS))
    return r


def plain_chat(**kw: Any) -> ChatLtri:
    model, tok = tiny()
    return ChatLtri(hf_model=model, tokenizer=tok, config=CONFIG, **{"max_tokens": 10, **kw})


class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


# --------------------------------------------------------------------------------------------- chat model
def test_plain_usage_equals_the_real_token_counts() -> None:
    model, tok = tiny()
    messages = [SystemMessage("Be brief."), HumanMessage("Where is Paris?")]
    result = plain_chat().invoke(messages)
    dicts = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Paris?"}]
    reference = generate_ids(model, tok, dicts, CONFIG, max_new_tokens=10)
    assert result.content == reference.text
    assert result.usage_metadata == {"input_tokens": reference.prompt_tokens, "output_tokens": len(reference.token_ids),
                                     "total_tokens": reference.prompt_tokens + len(reference.token_ids),
                                     "input_token_details": {"cache_read": 0}}
    assert reference.prompt_tokens == encode_prompt(tok, dicts).numel() > 0
    meta = result.response_metadata
    assert meta["model_name"] == "llama" and meta["finish_reason"] in ("stop", "length") and meta["spans"] == []


def test_memory_answer_counts_the_stored_tokens_as_cache_read_and_cites_spans(retriever) -> None:
    memory = retriever.memory
    chat = ChatLtri(memory=memory, max_tokens=10, k=3)
    result = chat.invoke("Where does the Seine flow?")
    reference = memory.generate([{"role": "user", "content": "Where does the Seine flow?"}], 10, k=3)
    stored = memory.stats().tokens
    assert stored == sum(len(tok) for tok in DOCS.values()) and reference.memory_tokens == stored  # char tokenizer
    usage = result.usage_metadata
    assert result.content == reference.text
    assert usage["input_token_details"]["cache_read"] == stored
    assert usage["input_tokens"] == reference.prompt_tokens + stored
    assert usage["output_tokens"] == len(reference.token_ids)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert result.response_metadata["prompt_tokens"] == reference.prompt_tokens
    spans = result.response_metadata["spans"]
    assert [(s["doc_id"], s["start_char"], s["end_char"]) for s in spans] == [
        (h.doc_id, h.char_start, h.char_end) for h in reference.spans]
    for s in spans:
        assert DOCS[s["doc_id"]][s["start_char"]:s["end_char"]] == s["text"] and 0 <= s["score"] <= 1


def test_stream_equals_invoke_and_calls_the_token_callback(retriever) -> None:
    for chat in (plain_chat(), ChatLtri(memory=retriever.memory, max_tokens=10)):
        handler = Tokens()
        chunks = list(chat.stream("Hello there", config={"callbacks": [handler]}))
        full = chunks[0]
        for chunk in chunks[1:]:
            full = full + chunk
        result = chat.invoke("Hello there")
        assert full.content == result.content and "".join(handler.tokens) == result.content
        assert chunks[-1].chunk_position == "last" and full.usage_metadata == result.usage_metadata
        assert full.response_metadata["spans"] == result.response_metadata["spans"]


def test_stop_sequences_cut_the_output() -> None:
    chat = plain_chat(max_tokens=16)
    full = chat.invoke("Where is Paris?").content
    assert len(full) >= 6
    stop = full[3:5]
    cut = full[:full.find(stop)]
    assert chat.invoke("Where is Paris?", stop=[stop]).content == cut
    assert plain_chat(max_tokens=16, stop=[stop]).invoke("Where is Paris?").content == cut
    assert "".join(c.content for c in chat.stream("Where is Paris?", stop=[stop])) == cut
    assert chat.invoke("Where is Paris?", stop=[stop]).response_metadata["finish_reason"] == "stop"


def test_options_per_call_and_sampling() -> None:
    chat = plain_chat()
    assert chat.invoke("Hi", max_tokens=3).usage_metadata["output_tokens"] <= 3
    assert chat.invoke("Hi").content == chat.invoke("Hi", temperature=0).content  # greedy
    a = chat.invoke("Hi", temperature=1.5, seed=7).content
    assert a == chat.invoke("Hi", temperature=1.5, seed=7).content
    assert chat.bind(max_tokens=2).invoke("Hi").usage_metadata["output_tokens"] <= 2
    params = chat._get_ls_params(stop=["x"])
    assert params["ls_provider"] == "ltri_rag" and params["ls_max_tokens"] == 10 and params["ls_stop"] == ["x"]


def test_batch_and_async_equal_invoke() -> None:
    chat = plain_chat()
    one, two = chat.invoke("Hi"), chat.invoke("Where is Paris?")
    assert [m.content for m in chat.batch(["Hi", "Where is Paris?"])] == [one.content, two.content]

    async def run():
        a = await chat.ainvoke("Hi")
        pieces = [c.content async for c in chat.astream("Hi")]
        b = await chat.abatch(["Hi", "Where is Paris?"])
        return a, pieces, b

    a, pieces, b = asyncio.run(run())
    assert a.content == one.content and "".join(pieces) == one.content
    assert [m.content for m in b] == [one.content, two.content]


def test_bad_input_gives_clear_errors(memory) -> None:
    model, tok = tiny()
    with pytest.raises(ValueError, match="temperature.*-1"):
        plain_chat(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens.*0"):
        plain_chat().invoke("Hi", max_tokens=0)
    with pytest.raises(TypeError, match="tools"):
        plain_chat().invoke("Hi", tools=[])
    with pytest.raises(ValueError, match="needs memory=KVMemory"):
        ChatLtri(max_tokens=3)
    with pytest.raises(ValueError, match="hf_model differs"):
        ChatLtri(memory=memory, hf_model=tiny_model("llama", seed=1))
    with pytest.raises(ValueError, match="'image' content block"):
        plain_chat().invoke([HumanMessage(content=[{"type": "image", "url": "https://x/y.png"}])])
    with pytest.raises(ValueError, match="tool calls"):
        plain_chat().invoke([HumanMessage("hi"), AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "1"}]),
                             HumanMessage("again")])
    with pytest.raises(ValueError, match="need a memory"):
        plain_chat().invoke("Hi", collection="essays")
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        LtriRetriever(memory=memory, k=0)
    with pytest.raises(TimeoutError, match="timeout=1e-09"):
        plain_chat(timeout=1e-9).invoke("Hi")


# --------------------------------------------------------------------------------------------- text LLM
def test_llm_completion_usage_and_stream() -> None:
    model, tok = tiny()
    llm = LtriLLM(hf_model=model, tokenizer=tok, config=CONFIG, max_tokens=8)
    reference = generate_ids(model, tok, "The capital of France is", CONFIG, max_new_tokens=8)
    assert llm.invoke("The capital of France is") == reference.text
    assert "".join(llm.stream("The capital of France is")) == reference.text
    result = llm.generate(["The capital of France is"])
    info = result.generations[0][0].generation_info
    assert info["usage"]["input_tokens"] == reference.prompt_tokens
    assert info["usage"]["output_tokens"] == len(reference.token_ids)
    assert result.llm_output["token_usage"]["total_tokens"] == reference.prompt_tokens + len(reference.token_ids)
    assert llm._identifying_params["model_name"] == "llama" and llm._llm_type == "ltri"
    stop = reference.text[2:4]
    assert llm.invoke("The capital of France is", stop=[stop]) == reference.text[:reference.text.find(stop)]


# --------------------------------------------------------------------------------------------- retriever
def test_retriever_hits_are_documents_with_offsets_and_metadata(retriever) -> None:
    docs = retriever.invoke("Where does the Seine flow?")
    assert len(docs) == 2 and len(retriever.invoke("Seine", k=3)) == 3
    hits = retriever.memory.retrieve("Where does the Seine flow?", k=2)
    for doc, hit in zip(docs, hits):
        meta = doc.metadata
        assert (meta["doc_id"], meta["start_char"], meta["end_char"], meta["score"]) == (
            hit.doc_id, hit.char_start, hit.char_end, hit.score)
        assert doc.page_content == DOCS[meta["doc_id"]][meta["start_char"]:meta["end_char"]]
        assert meta["collection"] == "default" and meta["lang"] == META[meta["doc_id"]]["lang"]
        assert doc.id == f"default/{hit.doc_id}:{hit.char_start}-{hit.char_end}"


def test_retriever_filters_and_collections(retriever) -> None:
    assert {d.metadata["doc_id"] for d in retriever.invoke("café", k=4, filter={"lang": "fr"})} == {"cafe"}
    fr = LtriRetriever(memory=retriever.memory, filter={"lang": "fr"}, k=4)
    assert {d.metadata["doc_id"] for d in fr.invoke("the river")} == {"cafe"}
    assert retriever.invoke("x", filter={"lang": "de"}) == []
    other = LtriRetriever(memory=retriever.memory, collection="other", k=3)
    other.add_documents([Document(page_content="Berlin is the capital of Germany.", id="berlin")])
    assert {d.metadata["collection"] for d in other.invoke("capital")} == {"other"}
    # without a collection the retriever reads every collection (k covers all regions: a random model's ranking
    # says nothing about which document comes first)
    assert {d.metadata["doc_id"] for d in retriever.invoke("capital", k=64)} >= {"berlin", "paris"}
    # one document id in two collections: every passage keeps an id of its own (the collection is part of it)
    other.add_documents([Document(page_content=DOCS["paris"], id="paris")])
    both = retriever.invoke("capital of France Seine", k=64)
    assert {d.metadata["collection"] for d in both if d.metadata["doc_id"] == "paris"} == {"default", "other"}
    assert len({d.id for d in both}) == len(both)
    assert all(d.id.startswith(d.metadata["collection"] + "/") for d in both)


def test_retriever_delete_then_retrieve_and_upsert(retriever) -> None:
    assert retriever.delete(["paris"])["num_deleted"] == 1
    assert all(d.metadata["doc_id"] != "paris" for d in retriever.invoke("capital of France Seine", k=6))
    assert retriever.get(["paris", "fox"]) == [Document(id="fox", page_content=DOCS["fox"],
                                                        metadata={**META["fox"], "doc_id": "fox",
                                                                  "collection": "default"})]
    with pytest.raises(DocumentNotFound):
        retriever.delete(["paris"])
    with pytest.raises(ValueError, match="non-empty list"):
        retriever.delete()
    assert retriever.upsert([Document(id="fox", page_content="A red fox sleeps.", metadata={"lang": "en"})]
                            )["succeeded"] == ["fox"]
    assert retriever.get_by_ids(["fox"])[0].page_content == "A red fox sleeps."
    with pytest.raises(TypeError, match="documents\\[0\\] must be a Document"):
        retriever.add_documents(["plain text"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="unsupported keyword arguments \\['top_k'\\]"):
        retriever.invoke("fox", top_k=2)


async def test_retriever_async(retriever) -> None:
    docs = await retriever.ainvoke("Seine", k=1)
    assert len(docs) == 1 and docs == retriever.invoke("Seine", k=1)


# --------------------------------------------------------------------------------------------- chat history
def test_chat_history_persists_turns_per_session_and_recalls_them(memory) -> None:
    history = KVChatMessageHistory(memory, "alice")
    turns = [HumanMessage("My locker code is 4711."), AIMessage("Noted: locker 4711.")]
    history.add_messages(turns)
    history.add_user_message("And the river is the Seine.")
    assert [m.content for m in history.messages] == [m.content for m in turns] + ["And the river is the Seine."]
    assert [type(m) for m in history.messages] == [HumanMessage, AIMessage, HumanMessage]
    bob = KVChatMessageHistory(memory, "bob")
    bob.add_user_message("Nothing to say.")
    assert len(bob.messages) == 1 and memory.collections() == ["chat:alice", "chat:bob"]
    recalled = history.recall("locker code", k=2)
    assert recalled and {d.metadata["collection"] for d in recalled} == {"chat:alice"}
    assert all(d.metadata["session_id"] == "alice" for d in recalled)
    answer = ChatLtri(memory=memory, collection=history.collection, max_tokens=4).invoke("What is my locker code?")
    assert answer.response_metadata["documents"] and all(c == "chat:alice" for c, _ in
                                                         answer.response_metadata["documents"])
    history.clear()
    assert history.messages == [] and len(bob.messages) == 1
    with pytest.raises(ValueError, match="session_id"):
        KVChatMessageHistory(memory, "")


def test_chat_history_stores_one_document_per_call(memory) -> None:
    history = KVChatMessageHistory(memory, "carol")
    history.add_messages([HumanMessage("My locker code is 4711."), AIMessage("Noted: locker 4711.")])
    history.add_messages([HumanMessage("  ")])
    infos = memory.get(["turn-00000000", "turn-00000001"], collection="chat:carol")
    assert [d.doc_id for d in infos] == ["turn-00000000", "turn-00000001"]
    assert infos[0].text == "human: My locker code is 4711.\nai: Noted: locker 4711.\n"
    assert [infos[0].text[a:b] for a, b in infos[0].metadata["turns"]] == ["human: My locker code is 4711.",
                                                                          "ai: Noted: locker 4711."]
    assert infos[1].text == "human: (empty)\n" and infos[1].metadata["roles"] == ["human"]
    # a document of the earlier one-message-per-document layout is still read, in order
    memory.add_documents(["human: Hello."], [{"session_id": "carol", "index": 2,
                                              "message": message_to_dict(HumanMessage("Hello."))}], ["msg-00000002"],
                         collection="chat:carol", progress=False)
    history.add_messages([AIMessage("Hi.")])
    assert [m.content for m in history.messages] == ["My locker code is 4711.", "Noted: locker 4711.", "  ",
                                                     "Hello.", "Hi."]
    assert ("chat:carol", "turn-00000003") in memory.list_documents("chat:carol")


# --------------------------------------------------------------------------------------------- standard tests
class TestChatLtriStandardUnit(ChatModelUnitTests):
    """LangChain's standard unit tests (construction, standard params) on the tiny model."""

    @property
    def chat_model_class(self) -> type[ChatLtri]:
        return ChatLtri

    @property
    def chat_model_params(self) -> dict:
        model, tok = tiny()
        return {"hf_model": model, "tokenizer": tok, "config": CONFIG}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False


# ------------------------------------------------------------------------------------------ review fixes (37)
def test_every_user_of_a_model_shares_its_lock(memory) -> None:
    """A session switches the model's attention function for its pass; ChatLtri, LtriLLM, the LlamaIndex LLM and
    KVMemory must take one lock per model object, or two calls on one model undo each other's switch."""
    from ltri_rag.hook import model_lock
    from ltri_rag.integrations.llama_index import LtriLLM as IndexLLM

    model, tok = tiny()
    assert memory._lock is model_lock(model)
    assert IndexLLM(model, tok, CONFIG)._lock is model_lock(model) is IndexLLM(memory=memory)._lock


def test_the_cache_key_holds_what_changes_the_answer(memory) -> None:
    """LangChain keys its LLM cache by ``_identifying_params``: a filter, stop strings, a seed or another memory
    give another answer, so another key."""
    base = ChatLtri(memory=memory, max_tokens=6)._identifying_params
    for change in ({"filter": {"lang": "fr"}}, {"stop": ["x"]}, {"seed": 3}, {"max_memory_tokens": 50},
                   {"collection": "other"}):
        assert ChatLtri(memory=memory, max_tokens=6, **change)._identifying_params != base, change
    model, tok = tiny()
    plain = plain_chat()._identifying_params
    assert plain != base and plain["weights_sha256"]
    other = ChatLtri(hf_model=model, tokenizer=tok, config=CONFIG.replace(budget=40), max_tokens=10)
    assert other._identifying_params != plain


def test_tokens_are_counted_with_the_model_tokenizer() -> None:
    chat = plain_chat()
    _, tok = tiny()
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    assert chat.get_token_ids("hello world") == list(ids) and chat.get_num_tokens("hello world") == len(ids)


def test_chat_message_roles_map_to_the_template_roles() -> None:
    from langchain_core.messages import ChatMessage

    chat = plain_chat(max_tokens=4)
    assert chat.invoke([ChatMessage(role="human", content="Where is Paris?")]).content == \
        chat.invoke([HumanMessage("Where is Paris?")]).content
    with pytest.raises(ValueError, match="role 'wizard'"):
        chat.invoke([ChatMessage(role="wizard", content="hi")])


def test_concurrent_exchanges_in_one_history_are_both_kept(memory) -> None:
    history = KVChatMessageHistory(memory, session_id="u1")

    async def both() -> None:
        await asyncio.gather(history.aadd_messages([HumanMessage("first question"), AIMessage("first answer")]),
                             history.aadd_messages([HumanMessage("second question"), AIMessage("second answer")]))

    asyncio.run(both())
    texts = [m.content for m in history.messages]
    assert sorted(texts) == ["first answer", "first question", "second answer", "second question"]


def test_retriever_get_returns_each_id_once(retriever) -> None:
    assert [d.id for d in retriever.get(["fox", "fox", "nope", "paris"])] == ["fox", "paris"]
