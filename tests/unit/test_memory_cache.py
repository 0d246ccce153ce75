"""The document cache of ``KVMemory`` (``ltri_rag.memory_cache``): LRU by bytes, and answers equal to no cache."""

from __future__ import annotations

import pytest
import torch
from ltri_rag.storage import SqlSpanStore

from ltri_rag import KVMemory
from ltri_rag.cache import MemoryExport
from ltri_rag.memory_cache import DocumentCache, memory_bytes
from ltri_rag.memory_ingest import load_document_memory
from tests.unit.test_kvmemory import DOCS, _add_all, _create, llama, tok  # noqa: F401  (fixtures)


def _memory(tokens: int, value: float = 0.0) -> MemoryExport:
    """A one-layer memory of ``tokens`` tokens (float32 K/V ``[tokens, 1, 4]``)."""
    part = {"starts": torch.tensor([0]), "ends": torch.tensor([tokens]), "owner": torch.tensor([0]),
            "vectors": torch.full((1, 1, 4), value), "keys": torch.full((tokens, 1, 4), value),
            "values": torch.full((tokens, 1, 4), value)}
    return MemoryExport(positions=torch.arange(tokens), layers={0: part})


def test_memory_bytes_counts_every_tensor():
    # positions 10 x 8 + starts, ends, owner 3 x 8 + vectors 16 + keys, values 2 x 160
    assert memory_bytes(_memory(10)) == 80 + 24 + 16 + 320


def test_lru_keeps_the_recently_used_within_the_budget():
    size = memory_bytes(_memory(10))
    cache = DocumentCache(2 * size + 1, torch.device("cpu"))
    loads: list[str] = []

    def loader(name: str):
        def load():
            loads.append(name)
            return _memory(10, float(len(loads))), name
        return load

    a = cache.get_or_load("a", loader("a"))
    cache.get_or_load("b", loader("b"))
    again = cache.get_or_load("a", loader("a"))  # hit: the same objects, a is now the most recent
    assert again[0] is a[0] and again[1] == "a"
    cache.get_or_load("c", loader("c"))  # over budget: b (least recent) goes
    assert loads == ["a", "b", "c"]
    cache.get_or_load("a", loader("a"))
    cache.get_or_load("b", loader("b"))  # b was dropped: loaded again
    assert loads == ["a", "b", "c", "b"]
    info = cache.info()
    assert (info.hits, info.misses, info.entries) == (2, 4, 2) and info.bytes == 2 * size <= info.max_bytes


def test_entries_larger_than_the_budget_and_a_zero_budget_are_not_kept():
    small = DocumentCache(memory_bytes(_memory(10)) - 1, torch.device("cpu"))
    off = DocumentCache(0, torch.device("cpu"))
    for cache in (small, off):
        for _ in range(2):
            memory, extra = cache.get_or_load("a", lambda: (_memory(10), 1))
            assert extra == 1 and memory.positions.numel() == 10
        assert cache.info().entries == 0 and cache.info().misses == 2


def test_forget_and_clear():
    cache = DocumentCache(1 << 20, torch.device("cpu"))
    for key in (("c1", "x", 1), ("c1", "y", 1), ("c2", "x", 1)):
        cache.get_or_load(key, lambda: (_memory(4), None))
    assert cache.forget(lambda key: key[0] == "c1" and key[1] == "x") == 1
    assert cache.info().entries == 2
    cache.clear()
    assert cache.info().entries == 0 and cache.info().bytes == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_budget_is_named(bad):
    with pytest.raises(ValueError, match="max_bytes must be a non-negative int"):
        DocumentCache(bad, torch.device("cpu"))


def test_host_tier_keeps_what_the_device_tier_pushes_out():
    """Device tier of one entry, host tier of two: pushed-out documents wait in the host tier and come back without
    a load (equal to what was loaded), the host tier drops its least recent beyond its budget, and an entry too large
    for the device tier goes straight to the host tier."""
    size = memory_bytes(_memory(10))
    cache = DocumentCache(size, torch.device("cpu"), host_bytes=2 * size)
    loads: list[str] = []

    def loader(name: str, value: float):
        def load():
            loads.append(name)
            return _memory(10, value), name
        return load

    for i, name in enumerate("abcd"):
        cache.get_or_load(name, loader(name, float(i)))
    # device: d; host: b, c (a was the least recent of the three pushed out)
    info = cache.info()
    assert (info.entries, info.host_entries, info.bytes, info.host_bytes) == (1, 2, size, 2 * size)
    memory, extra = cache.get_or_load("b", loader("b", -1.0))  # from the host tier, not loaded again
    assert extra == "b" and torch.equal(memory.layers[0]["keys"], torch.full((10, 1, 4), 1.0))
    cache.get_or_load("a", loader("a", 0.0))  # dropped from both tiers: loaded
    assert loads == ["a", "b", "c", "d", "a"]
    info = cache.info()
    assert (info.hits, info.host_hits, info.misses) == (0, 1, 5)
    assert (info.entries, info.host_entries, info.host_max_bytes) == (1, 2, 2 * size)
    assert set(cache._host) == {"d", "b"} and set(cache._entries) == {"a"}  # c, the least recent, left the host
    big = DocumentCache(0, torch.device("cpu"), host_bytes=4 * size)
    for _ in range(2):
        big.get_or_load("x", loader("x", 5.0))
    assert loads[-1] == "x" and loads.count("x") == 1 and big.info().host_hits == 1
    assert cache.forget(lambda key: key in ("a", "b")) == 2  # one from each tier
    assert set(cache._host) == {"d"} and not cache._entries and cache.info().host_bytes == size
    cache.clear()
    assert cache.info().host_entries == 0 and cache.info().host_bytes == 0
    with pytest.raises(ValueError, match="host_bytes must be a non-negative int"):
        DocumentCache(1, torch.device("cpu"), host_bytes=-1)


def test_kvmemory_prefetch_reads_ahead_in_threads_and_changes_no_answer(tmp_path, llama, tok, monkeypatch):  # noqa: F811
    """Documents are read by the prefetch threads (no document cache, so every question reads them), answers equal
    reading them in the calling thread, and an error in a prefetched read reaches the caller, after which the memory
    still answers."""
    import threading

    import ltri_rag.memory_search as search

    question = "Where does the Seine flow?"
    with _create(tmp_path / "m", llama, tok) as mem:
        _add_all(mem)
    readers: list[str] = []
    real = search.load_document_memory

    def recorded(store, doc_id, *args, **kwargs):
        readers.append(threading.current_thread().name)
        if doc_id == fail[0]:
            raise RuntimeError(f"disk error reading {doc_id}")
        return real(store, doc_id, *args, **kwargs)

    fail = [None]
    monkeypatch.setattr(search, "load_document_memory", recorded)
    options = {"store": SqlSpanStore, "cache_bytes": 0}
    with KVMemory.open(tmp_path / "m", llama, tok, prefetch=2, **options) as ahead, \
            KVMemory.open(tmp_path / "m", llama, tok, prefetch=0, store_options={"read_only": True},
                          **options) as plain:
        assert ahead.document_cache.host_max_bytes == 0  # a CPU model: no host tier by default
        readers.clear()
        hits = ahead.retrieve(question, k=3)
        assert len(readers) == len(DOCS) and all(r.startswith("ltri-prefetch") for r in readers)
        readers.clear()
        assert hits == plain.retrieve(question, k=3)
        assert readers == ["MainThread"] * len(DOCS)
        assert ahead.generate(question, max_new_tokens=4, k=2).text == \
            plain.generate(question, max_new_tokens=4, k=2).text
        fail[0] = sorted(DOCS)[1]
        with pytest.raises(RuntimeError, match="disk error"):
            ahead.retrieve(question, k=3)
        fail[0] = None
        assert ahead.retrieve(question, k=3) == hits
    assert ahead._prefetch_pool is None  # closed with the memory
    with pytest.raises(ValueError, match="prefetch must be a non-negative int"):
        KVMemory.open(tmp_path / "m", llama, tok, prefetch=-1, **options)


def test_kvmemory_answers_equal_with_and_without_the_cache(tmp_path, llama, tok):  # noqa: F811
    question = "Where does the Seine flow?"
    with _create(tmp_path / "m", llama, tok) as mem:
        _add_all(mem)
    with KVMemory.open(tmp_path / "m", llama, tok, store=SqlSpanStore) as cached, \
            KVMemory.open(tmp_path / "m", llama, tok, store=SqlSpanStore, store_options={"read_only": True},
                          cache_bytes=0) as plain:
        first = cached.retrieve(question, k=3)
        assert cached.cache_info().misses == len(DOCS) and cached.cache_info().entries == len(DOCS)
        second = cached.retrieve(question, k=3)
        assert cached.cache_info().hits == len(DOCS)  # every document came from the cache
        assert first == second == plain.retrieve(question, k=3)
        assert plain.cache_info().entries == 0
        answer = cached.generate(question, max_new_tokens=4, k=2)
        assert answer.text == plain.generate(question, max_new_tokens=4, k=2).text
        # what a hit returns is exactly what the store holds
        for doc in cached.get(list(DOCS)):
            memory, records = cached._document_memory(doc)
            fresh, fresh_records = load_document_memory(cached.store, doc.doc_id, doc.collection,
                                                        cached.global_layers, int(cached.sink_ids.numel()),
                                                        cached.kv_dtype)
            assert records == fresh_records and torch.equal(memory.positions, fresh.positions)
            for layer, part in fresh.layers.items():
                for name, tensor in part.items():
                    assert torch.equal(memory.layers[layer][name].cpu(), tensor), (doc.doc_id, layer, name)


def test_kvmemory_cache_follows_replace_and_delete(tmp_path, llama, tok):  # noqa: F811
    with _create(tmp_path / "m", llama, tok) as mem:
        _add_all(mem)
        mem.retrieve("capital of France", k=2)
        entries = mem.cache_info().entries
        mem.add_documents(["Rome is the capital of Italy; the Tiber flows through it."], ids=["paris"],
                          progress=False)
        hits = mem.retrieve("capital of Italy", k=8)
        # the replaced document is loaded anew, not served from the cache: one more miss, its new text cited
        assert mem.cache_info().misses == entries + 1
        new_text = "Rome is the capital of Italy; the Tiber flows through it."
        assert all(h.text in new_text for h in hits if h.doc_id == "paris")
        assert [key for key in mem.document_cache._entries if key[1] == "paris"][-1][2] == mem.get(["paris"])[0].created
        mem.delete(["paris"])
        assert all(key[1] != "paris" for key in mem.document_cache._entries)
        assert all(h.doc_id != "paris" for h in mem.retrieve("capital of Italy", k=8))
