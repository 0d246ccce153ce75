"""LtriStore, the LangGraph ``BaseStore`` over KVMemory: put / get / delete / list_namespaces / search semantics on a
tiny random model (fast), a LangGraph graph using it, and search by in-model retrieval on the real Qwen (slow)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypedDict

import pytest
import torch
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import GetOp, InvalidNamespaceError, Item, ListNamespacesOp, PutOp, SearchOp
from ltri_rag.integrations.langgraph import LtriSearchItem, LtriStore, value_text
from ltri_rag.storage import SqlSpanStore

from ltri_rag import KVMemory, LtriConfig
from tests.integrations.conftest import QWEN_CONFIG, needs_qwen, qwen
from tests.unit.tiny_models import tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer

CONFIG = LtriConfig(mode="ltri", num_sink_tokens=4, local_window=16, chunk_size=8, budget=12, page_size=5,
                    evict_stride=4, span_min_len=2, span_max_len=6)
_TINY: dict[str, Any] = {}


@pytest.fixture
def memory(tmp_path):
    if not _TINY:
        _TINY.update(model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors
    with KVMemory.create(tmp_path / "m", _TINY["model"], _TINY["tokenizer"], CONFIG, store=SqlSpanStore) as mem:
        yield mem
    torch.set_num_threads(threads)


@pytest.fixture
def store(memory) -> LtriStore:
    s = LtriStore(memory)
    s.put(("users", "alice", "facts"), "fox", {"text": "The quick brown fox jumps over the lazy dog.", "n": 1})
    s.put(("users", "alice", "facts"), "paris", {"text": "Paris is the capital of France.", "n": 2, "tag": "geo"})
    s.put(("users", "bob", "facts"), "seine", {"text": "The Seine flows through Paris.", "n": 3, "tag": "geo"})
    s.put(("users", "bob", "prefs"), "tea", {"likes": ["green tea", "biscuits"], "n": 4}, index=False)
    return s


def test_put_get_update_delete(store: LtriStore, memory: KVMemory) -> None:
    item = store.get(("users", "alice", "facts"), "paris")
    assert isinstance(item, Item) and item.value == {"text": "Paris is the capital of France.", "n": 2, "tag": "geo"}
    assert item.namespace == ("users", "alice", "facts") and item.key == "paris"
    assert store.get(("users", "alice", "facts"), "nope") is None and store.get(("nobody",), "paris") is None
    time.sleep(0.01)
    store.put(("users", "alice", "facts"), "paris", {"text": "Paris lies on the Seine.", "n": 5})
    updated = store.get(("users", "alice", "facts"), "paris")
    assert updated.value == {"text": "Paris lies on the Seine.", "n": 5}
    assert updated.created_at == item.created_at < updated.updated_at
    # the item is a KVMemory document: key = id, namespace = collection, text = the value's text
    doc = memory.get(["paris"], collection=store.collection(("users", "alice", "facts")))[0]
    assert doc.text == "Paris lies on the Seine.\n5" and store.collection(("a", "b")) == "store:a.b"
    store.delete(("users", "alice", "facts"), "paris")
    store.delete(("users", "alice", "facts"), "paris")  # deleting a missing key is a no-op
    assert store.get(("users", "alice", "facts"), "paris") is None
    assert [d for _, d in memory.list_documents(store.collection(("users", "alice", "facts")))] == ["fox"]


def test_value_text_is_what_the_model_reads() -> None:
    value = {"title": "Trip", "stops": [{"city": "Oslo", "days": 3}, {"city": "Bergen", "ok": True}], "x": None}
    assert value_text(value) == "Trip\nOslo\n3\nBergen"
    assert value_text(value, ["stops[*].city"]) == "Oslo\nBergen"
    assert value_text({"flag": True, "empty": "  "}) == ""


def test_list_namespaces(store: LtriStore) -> None:
    assert store.list_namespaces() == [("users", "alice", "facts"), ("users", "bob", "facts"),
                                       ("users", "bob", "prefs")]
    assert store.list_namespaces(prefix=("users", "bob")) == [("users", "bob", "facts"), ("users", "bob", "prefs")]
    assert store.list_namespaces(suffix=("facts",)) == [("users", "alice", "facts"), ("users", "bob", "facts")]
    assert store.list_namespaces(prefix=("users", "*", "prefs")) == [("users", "bob", "prefs")]
    assert store.list_namespaces(max_depth=2) == [("users", "alice"), ("users", "bob")]
    assert store.list_namespaces(limit=1, offset=1) == [("users", "bob", "facts")]
    store.delete(("users", "bob", "prefs"), "tea")
    assert ("users", "bob", "prefs") not in store.list_namespaces()


def test_search_without_query_filters_and_pages(store: LtriStore) -> None:
    newest_first = [i.key for i in store.search(("users",))]
    assert newest_first == ["tea", "seine", "paris", "fox"]
    assert all(isinstance(i, LtriSearchItem) and i.score is None and i.spans == [] for i in store.search(("users",)))
    assert [i.key for i in store.search(("users",), filter={"tag": "geo"})] == ["seine", "paris"]
    assert [i.key for i in store.search(("users",), filter={"n": {"$gte": 2, "$lt": 4}})] == ["seine", "paris"]
    assert [i.key for i in store.search(("users",), filter={"n": {"$ne": 1}}, limit=1, offset=1)] == ["seine"]
    assert [i.key for i in store.search(("users", "alice"))] == ["paris", "fox"]
    assert store.search(("nobody",)) == []
    with pytest.raises(ValueError, match="unsupported filter operator '\\$in'"):
        store.search(("users",), filter={"n": {"$in": [1]}})


def test_search_by_query_is_in_model_retrieval(store: LtriStore, memory: KVMemory) -> None:
    memory.add_documents(["Other text outside the store about Paris."], ids=["outside"], collection="essays")
    hits = store.search(("users",), query="Where does the Seine flow?", limit=10)
    # indexed items only (the index=False one and other collections are never found by a query), each once
    assert sorted(i.key for i in hits) == ["fox", "paris", "seine"]
    assert [i.score for i in hits] == sorted((i.score for i in hits), reverse=True)  # best first
    for item in hits:  # the recalled regions are character ranges of the item's text
        text = value_text(item.value)
        assert item.spans and all(text[s["start_char"]:s["end_char"]] == s["text"] for s in item.spans)
        assert item.spans[0]["score"] == item.score and item.dict()["spans"] == item.spans
    assert [i.key for i in store.search(("users", "bob"), query="Paris")] == ["seine"]
    geo = store.search(("users",), query="Paris", filter={"tag": "geo"}, limit=1)
    assert len(geo) == 1 and geo[0].key in ("paris", "seine")
    assert store.search(("users", "bob", "prefs"), query="tea") == []  # only an unindexed item there
    # the same through the async API
    again = asyncio.run(store.asearch(("users",), query="Where does the Seine flow?", limit=10))
    assert [(i.key, i.score) for i in again] == [(i.key, i.score) for i in hits]


def test_batch_runs_in_order_and_async(store: LtriStore) -> None:
    ns = ("users", "carol")
    results = store.batch([GetOp(ns, "a"), PutOp(ns, "a", {"text": "one"}), PutOp(ns, "a", {"text": "two"}),
                           GetOp(ns, "a"), SearchOp(ns), ListNamespacesOp(max_depth=1)])
    assert results[0] is None and results[1] is None and results[2] is None
    assert results[3].value == {"text": "two"} and [i.key for i in results[4]] == ["a"]
    assert results[5] == [("users",)]
    got = asyncio.run(store.abatch([GetOp(ns, "a"), PutOp(ns, "a", None), GetOp(ns, "a")]))
    assert got[0].value == {"text": "two"} and got[2] is None
    assert asyncio.run(store.aget(("users", "alice", "facts"), "fox")).value["n"] == 1


def test_bad_input_is_refused_by_name(store: LtriStore, memory: KVMemory) -> None:
    with pytest.raises(InvalidNamespaceError, match="'a.b'"):
        store.batch([PutOp(("a.b",), "k", {"text": "x"})])
    with pytest.raises(InvalidNamespaceError, match="cannot be empty"):
        store.batch([PutOp((), "k", {"text": "x"})])
    with pytest.raises(ValueError, match="key must be a non-empty string"):
        store.put(("a",), " ", {"text": "x"})
    with pytest.raises(TypeError, match="must be a dict or None, got list"):
        store.batch([PutOp(("a",), "k", ["x"])])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="value of key 'k' is not JSON-serialisable"):
        store.put(("a",), "k", {"when": object()})
    with pytest.raises(NotImplementedError, match="TTL"):
        store.put(("a",), "k", {"text": "x"}, ttl=5)
    with pytest.raises(TypeError, match="ops\\[1\\] is not a LangGraph store op"):
        store.batch([GetOp(("a",), "k"), "get a"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="limit must be a non-negative int, got -1"):
        store.search(("users",), limit=-1)
    with pytest.raises(TypeError, match="memory must be a KVMemory"):
        LtriStore("mem")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="collection_prefix"):
        LtriStore(memory, collection_prefix="a.b")
    assert ("a",) not in store.list_namespaces()  # nothing of a refused batch was written


class State(TypedDict):
    user: str
    text: str
    found: list[str]


def remember(state: State, runtime: Runtime) -> dict[str, Any]:
    runtime.store.put(("memories", state["user"]), f"m{len(state['text'])}", {"text": state["text"]})
    return {}


def look_up(state: State, runtime: Runtime) -> dict[str, Any]:
    return {"found": [i.value["text"] for i in runtime.store.search(("memories", state["user"]))]}


def test_a_langgraph_graph_uses_the_store(store: LtriStore) -> None:
    builder = StateGraph(State)
    builder.add_node("remember", remember)
    builder.add_node("look_up", look_up)
    builder.add_edge(START, "remember")
    builder.add_edge("remember", "look_up")
    builder.add_edge("look_up", END)
    graph = builder.compile(store=store)
    out = graph.invoke({"user": "dana", "text": "Dana's locker is number 12.", "found": []})
    assert out["found"] == ["Dana's locker is number 12."]
    assert store.list_namespaces(prefix=("memories",)) == [("memories", "dana")]


# --------------------------------------------------------------------------------------------- real model
FACTS = {"gym": "My locker number at the gym is 7319.", "sister": "My sister Ingrid is a glassblower in Bergen.",
         "diet": "I stopped eating meat two years ago.", "car": "I drive an old green Volvo estate."}


@pytest.mark.slow
@needs_qwen
def test_search_finds_the_memory_the_question_is_about_on_qwen(cpu_threads, tmp_path) -> None:
    model, tokenizer = qwen()
    with KVMemory.create(tmp_path / "m", model, tokenizer, LtriConfig(**QWEN_CONFIG)) as kv:
        store = LtriStore(kv)
        store.batch([PutOp(("memories", "u1"), key, {"text": text, "kind": "fact"}) for key, text in FACTS.items()]
                    + [PutOp(("memories", "u2"), "gym", {"text": "My locker number at the pool is 2288."})])
        hits = store.search(("memories", "u1"), query="What is my locker number at the gym?", limit=2)
        assert [i.key for i in hits][:1] == ["gym"] and hits[0].namespace == ("memories", "u1"), \
            [(i.key, i.score) for i in hits]
        assert "7319" in " ".join(s["text"] for s in hits[0].spans)
        hits = store.search(("memories",), query="Which city does my sister live in?", limit=1)
        assert [i.key for i in hits] == ["sister"], [(i.key, i.score) for i in hits]
