"""A batch's K/V files are written by several threads (``SqlSpanStore._write_files``): the store they leave equals
the one sequential writes leave, and one failing write leaves nothing of the batch (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import threading

import pytest
from ltri_rag.storage import span_store

from tests.unit import test_storage
from tests.unit.store_worker import make_doc
from tests.unit.test_storage import Location, _db_counts, _snapshot

loc = test_storage.loc  # the store-location fixture (SQLite and PostgreSQL)


def _batch(n: int = 7):
    return [make_doc(f"d{i}", collection="a" if i % 3 else "b", seed=i, num_tokens=30 + 7 * i) for i in range(n)]


def test_parallel_writes_equal_sequential_ones(loc: Location, monkeypatch) -> None:
    threads: set[str] = set()
    real = span_store.write_kv_file

    def spy(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(span_store, "write_kv_file", spy)
    monkeypatch.setattr(span_store.os, "cpu_count", lambda: 4)
    with loc.create() as s:
        s.add(_batch())
        parallel = _snapshot(s)
        assert s.verify().clean
        assert len(threads) > 1 and all(name.startswith("ltri-store-file") for name in threads)
        for coll in ("a", "b"):
            s.delete([d for c, d in s.list_documents(coll)], collection=coll)
        monkeypatch.setattr(span_store, "FILE_WRITERS", 1)
        threads.clear()
        s.add(_batch())
        assert _snapshot(s) == parallel and s.verify().clean
        assert threads == {threading.current_thread().name}


def test_one_failed_write_leaves_nothing_of_the_batch(loc: Location, monkeypatch) -> None:
    real = span_store.write_kv_file

    def failing(path, tensors, metadata):
        if metadata["doc_id"] == "d4":
            raise OSError("disk full")
        return real(path, tensors, metadata)

    monkeypatch.setattr(span_store.os, "cpu_count", lambda: 4)
    with loc.create() as s:
        s.add(make_doc("keep", seed=99))
        before = (_snapshot(s), sorted(os.listdir(s.kv_dir)))
        monkeypatch.setattr(span_store, "write_kv_file", failing)
        with pytest.raises(OSError, match="disk full"):
            s.add(_batch())
        assert (_snapshot(s), sorted(os.listdir(s.kv_dir))) == before
        assert s.verify().clean
    assert _db_counts(loc)["documents"] == 1
