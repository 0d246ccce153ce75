"""The span store and ``KVMemory`` under concurrent writes and at the edges of their life cycle: adds from several
threads at once (one store object), empty adds / deletes, a ``create`` refused before anything is made, a close
whose flush fails, a write refused before the model runs, a creation that stopped half-way."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from ltri_rag.storage import SqlSpanStore, faiss_index, integrity

from ltri_rag import KVMemory
from ltri_rag.store import Fingerprint, StoreError
from tests.unit.store_worker import fingerprint_items, make_doc
from tests.unit.test_kvmemory import _config, _create, llama, tok  # noqa: F401  (fixtures)


def test_concurrent_adds_on_one_memory_lose_nothing(tmp_path, llama, tok) -> None:
    """Async adds into new collections at once (each write batch its own thread): every call succeeds and every
    document is stored whole (before the store serialised its writes, ~1 call in 3 failed with a duplicate span id
    and its documents were lost)."""
    mem = _create(tmp_path / "m", llama, tok, batch_bytes=1)  # every document written by the background thread

    async def rounds() -> list:
        out = []
        for r in range(4):
            out += await asyncio.gather(*[mem.aadd_documents(
                [f"Doc {r} {c} x y", f"Doc {r} {c} z w", f"Doc {r} {c} q"], ids=[f"a{c}", f"b{c}", f"c{c}"],
                collection=f"r{r}c{c}") for c in range(3)], return_exceptions=True)
        return out

    results = asyncio.run(rounds())
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert len(mem.list_documents()) == 4 * 3 * 3
    assert mem.verify().clean
    for r in range(4):
        for c in range(3):
            (info,) = mem.store.get([f"b{c}"], collection=f"r{r}c{c}")
            assert info.text == f"Doc {r} {c} z w"
    mem.close()


def test_empty_adds_and_deletes_change_nothing(tmp_path, llama, tok) -> None:
    """Nothing to write bumps no generation: the store still closes clean (before, the next writer's open ran the
    full repair)."""
    mem = _create(tmp_path / "m", llama, tok)
    mem.add_documents(["A short text about rivers."], ids=["r"], progress=False)
    assert mem.store.add([]) == []
    mem.delete([])
    store = mem.store
    mem.close()
    assert integrity.closed_cleanly(store)


def test_a_refused_create_leaves_nothing_behind(tmp_path, llama, tok) -> None:
    """Arguments the memory refuses are refused before the store is made, so the same path can be created right."""
    path = tmp_path / "m"
    with pytest.raises(ValueError, match="span memory"):
        _create(path, llama, tok, _config("streaming"))
    with pytest.raises(ValueError, match="ranking must be one of"):
        _create(path, llama, tok, ranking="exces")
    with pytest.raises(TypeError, match="unknown KVMemory option"):
        _create(path, llama, tok, batch_byte=5)
    assert not (path / "meta.sqlite").exists()
    _create(path, llama, tok).close()


def test_a_failing_flush_still_releases_the_writer_lock(tmp_path, llama, tok, monkeypatch) -> None:
    mem = _create(tmp_path / "m", llama, tok)
    mem.add_documents(["The first text, long enough for a few spans of its own."], ids=["a"], progress=False)
    mem.add_documents(["A second one."], ids=["b"], progress=False)  # a pending index change
    store = mem.store
    assert store._dirty_layers  # the small second add leaves its index change for close to write

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss_index, "write_atomic", full_disk)
    with pytest.raises(OSError, match="No space left"):
        mem.close()
    monkeypatch.undo()
    assert store._lock_fd is None
    with KVMemory.open(tmp_path / "m", llama, tok, store=SqlSpanStore) as again:  # repairs the indexes
        assert [d for _, d in again.list_documents()] == ["a", "b"]
        assert again.verify().clean


def test_writes_to_a_read_only_memory_are_refused_before_the_model_runs(tmp_path, llama, tok, monkeypatch) -> None:
    _create(tmp_path / "m", llama, tok).close()
    reader = KVMemory.open(tmp_path / "m", llama, tok, store=SqlSpanStore, store_options={"read_only": True})
    import ltri_rag.memory as memory_mod

    monkeypatch.setattr(memory_mod, "ingest_document", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(StoreError, match="read-only"):
        reader.add_documents(["Some text."], progress=False)
    reader.close()


def test_a_creation_stopped_before_its_meta_row_can_be_created_again(tmp_path) -> None:
    from ltri_rag.storage.schema import Base, make_engine

    folder = tmp_path / "s"
    folder.mkdir()
    engine = make_engine(f"sqlite:///{folder / 'meta.sqlite'}", read_only=False)
    Base.metadata.create_all(engine)  # the tables, then a crash before the meta row
    engine.dispose()
    fp = Fingerprint(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32")
    with pytest.raises(StoreError, match="no store"):
        SqlSpanStore.open(folder, fp)
    SqlSpanStore.create(folder, fp).close()
    SqlSpanStore.open(folder, fp).close()
    with pytest.raises(StoreError, match="already exists"):
        SqlSpanStore.create(folder, fp)


def test_a_document_replaced_between_two_layer_reads_is_read_again(tmp_path, llama, tok, monkeypatch) -> None:
    """Loading reads a document layer by layer; a replace landing between two reads mixed two versions' K/V in one
    imported memory. The reads now carry the version and a mixed set is read again."""
    from ltri_rag.memory_ingest import load_document_memory

    mem = _create(tmp_path / "m", llama, tok)
    mem.add_documents(["The quick brown fox jumps over the lazy dog."], ids=["fox"], progress=False)
    store, layers = mem.store, mem.global_layers
    original = SqlSpanStore.load_spans
    calls = []

    def racing(self, doc_id, layer, **kwargs):
        calls.append(layer)
        if len(calls) == 2:  # after the first layer's read: the writer replaces the document
            mem.add_documents(["The quick brown cat jumps over the lazy dog."], ids=["fox"], progress=False)
        return original(self, doc_id, layer, **kwargs)

    monkeypatch.setattr(SqlSpanStore, "load_spans", racing)
    memory, _ = load_document_memory(store, "fox", "default", layers, mem.config.num_sink_tokens, torch.float32)
    monkeypatch.undo()
    again, _ = load_document_memory(store, "fox", "default", layers, mem.config.num_sink_tokens, torch.float32)
    assert len(calls) == 2 * len(layers)  # the first, mixed set was read again
    for layer in layers:
        assert torch.equal(memory.layers[layer]["keys"], again.layers[layer]["keys"])
    mem.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_reads_but_cannot_write_and_the_parent_keeps_writing(tmp_path) -> None:
    """A child forked while the parent has the store open for writing, with index changes not yet written and the
    store's lock held by another of its threads: the child reads (connections of its own), is refused writes with
    an error that says why, and its close writes none of the parent's index changes. While the child still runs,
    the parent writes, closes, and a new writer can open the store: the child's copy of the lock's descriptor does
    not keep the store locked."""

    path = tmp_path / "store"
    fingerprint = Fingerprint(fingerprint_items())
    store = SqlSpanStore.create(path, fingerprint)
    store.add([make_doc(f"seed{i}", seed=i, num_tokens=40) for i in range(12)])
    store.add(make_doc("a", seed=1, num_tokens=8))  # a small change: its index files are not rewritten yet
    assert store._dirty_layers
    index_files = {p.name: p.stat().st_mtime_ns for p in store.faiss_dir.iterdir()}
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(30)
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, wait for the parent's word, never return into pytest
        result: dict = {}
        try:
            result["docs"] = len(store.list_documents())
            result["text"] = store.get(["a"])[0].text
            store.flush()  # takes the store's lock: the parent's holder would block it forever
            try:
                store.add(make_doc("c", seed=3))
                result["add"] = "written"
            except StoreError as err:
                result["add"] = str(err)
            store.close()
        except BaseException as err:  # noqa: BLE001
            result["error"] = repr(err)
        finally:
            os.write(report_w, json.dumps(result).encode())
            os.close(report_w)
            os.read(go_r, 1)
            os._exit(0)
    os.close(report_w)
    os.close(go_r)
    release.set()
    holder.join()
    try:
        if not select.select([report_r], [], [], 60)[0]:
            pytest.fail("the forked child hung (the store's lock inherited held?)")
        with os.fdopen(report_r) as pipe:
            result = json.loads(pipe.read() or "{}")
        assert "error" not in result and result, result
        assert result["docs"] == 13 and result["text"] == make_doc("a", seed=1, num_tokens=8).text
        assert "forked" in result["add"] and str(path.resolve()) in result["add"]
        assert {p.name: p.stat().st_mtime_ns for p in store.faiss_dir.iterdir()} == index_files
        store.add(make_doc("d", seed=4))  # the parent still writes: its lock and connections are its own
        store.close()
        with SqlSpanStore.open(path, fingerprint) as again:  # the child still runs
            assert sorted(doc_id for _, doc_id in again.list_documents())[:2] == ["a", "d"]
            assert len(again.list_documents()) == 14 and again.verify().clean
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
        deadline = time.monotonic() + 60
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung")
            time.sleep(0.01)


def test_stats_while_a_writer_renames_and_removes_files(tmp_path, monkeypatch) -> None:
    """``stats`` lists the store's folders and then sizes each file; a file a writer renamed or removed after the
    listing (its temporary K/V files, a replaced document's old file), even one still there when first looked at,
    counts 0 instead of failing the call."""
    with SqlSpanStore.create(tmp_path / "store", Fingerprint(fingerprint_items())) as store:
        store.add([make_doc("a", seed=1), make_doc("b", seed=2)])
        whole = store.stats().bytes_on_disk
        gone = store.kv_dir / "renamed-by-the-writer.safetensors.tmp"
        listing, is_file = Path.iterdir, Path.is_file
        monkeypatch.setattr(Path, "iterdir",
                            lambda self: iter([*listing(self), *([gone] if self == store.kv_dir else [])]))
        monkeypatch.setattr(Path, "is_file", lambda self: self == gone or is_file(self))  # there a moment before
        stats = store.stats()
        assert stats.documents == 2 and stats.bytes_on_disk == whole
