"""The store's schema 2 (no SQL row per index vector: FAISS ids derived from span ids) and the in-place upgrade of a
schema-1 store, on SQLite and PostgreSQL (the ``loc`` fixture of ``test_storage``)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from ltri_rag.storage import SqlSpanStore, StoreError
from ltri_rag.storage.faiss_index import LayerIndexes
from ltri_rag.storage.schema import MAX_SPAN_VECTORS, split_vector_ids, vector_ids
from sqlalchemy import create_engine, inspect, text

from tests.unit import test_storage
from tests.unit.store_worker import STORED_LAYERS, make_doc
from tests.unit.test_storage import Location, _queries, _snapshot

loc = test_storage.loc  # the store-location fixture (SQLite and PostgreSQL)


def test_vector_ids_round_trip() -> None:
    spans = np.array([3, 7, 8, 1 << 30], dtype=np.int64)
    counts = np.array([2, 0, 3, 1], dtype=np.int64)
    ids = vector_ids(spans, counts)
    assert ids.tolist() == [3 << 20, (3 << 20) + 1, 8 << 20, (8 << 20) + 1, (8 << 20) + 2, 1 << 50]
    span, row = split_vector_ids(ids)
    assert span.tolist() == [3, 3, 8, 8, 8, 1 << 30] and row.tolist() == [0, 1, 0, 1, 2, 0]
    assert vector_ids(np.zeros(0), np.zeros(0)).shape == (0,)


def test_faiss_ids_name_each_span_and_row(loc: Location) -> None:
    """Every id in a layer's index decodes to a span row of that layer and a vector row within its range, and the
    index holds exactly the vectors the span rows name."""
    with loc.create() as s:
        s.add([make_doc(f"d{i}", seed=i) for i in range(5)])
    engine = create_engine(loc.db_url)
    with engine.connect() as c:
        spans = c.execute(text("select id, layer, vector_start, vector_end from spans")).all()
        assert not inspect(c).has_table("vectors")
    engine.dispose()
    by_span = {sid: (layer, end - start) for sid, layer, start, end in spans}
    for layer in STORED_LAYERS:
        index = faiss.read_index(str(loc.files / "faiss" / f"layer{layer}.index"))
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        span, row = split_vector_ids(ids)
        assert all(by_span[sp][0] == layer and r < by_span[sp][1] for sp, r in zip(span.tolist(), row.tolist()))
        assert len(ids) == sum(n for lay, n in by_span.values() if lay == layer) == len(set(ids.tolist()))


def test_a_span_with_too_many_vectors_is_refused(loc: Location, monkeypatch) -> None:
    from ltri_rag.storage import prepare

    monkeypatch.setattr(prepare, "MAX_SPAN_VECTORS", 1)
    with loc.create() as s:
        with pytest.raises(ValueError, match="index vectors, a span may hold at most 1"):
            s.add(make_doc("d0", seed=0))
        assert s.stats().documents == 0
    assert MAX_SPAN_VECTORS == 1 << 20


def _downgrade_to_schema_1(loc: Location) -> None:
    """Rewrite a closed schema-2 store as schema 1 laid it out: a ``vectors`` row per index vector with ids numbered
    from 1, FAISS indexes holding those ids, ``store_meta.next_vector_id``, version 1."""
    engine = create_engine(loc.db_url)
    old_of: dict[int, int] = {}
    with engine.begin() as c:
        c.execute(text("create table vectors (id bigint primary key, span_id bigint not null references spans(id) "
                       "on delete cascade, layer integer not null, row integer not null)"))
        c.execute(text("alter table store_meta add column next_vector_id bigint default 1"))
        rows = []
        for sid, layer, start, end in c.execute(text("select id, layer, vector_start, vector_end from spans "
                                                     "order by id")).all():
            for new_id, r in zip(vector_ids(np.array([sid]), np.array([end - start])).tolist(), range(start, end)):
                old_of[new_id] = len(old_of) + 1
                rows.append({"id": old_of[new_id], "span_id": sid, "layer": layer, "row": r})
        c.execute(text("insert into vectors (id, span_id, layer, row) values (:id, :span_id, :layer, :row)"), rows)
        c.execute(text("update store_meta set schema_version = 1, next_vector_id = :n"), {"n": len(old_of) + 1})
    engine.dispose()
    for layer in STORED_LAYERS:
        path = loc.files / "faiss" / f"layer{layer}.index"
        index = faiss.read_index(str(path))
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        vectors = np.stack([index.reconstruct(int(i)) for i in ids])
        old = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        old.add_with_ids(vectors, np.array([old_of[int(i)] for i in ids], dtype=np.int64))
        faiss.write_index(old, str(path))


def _schema_state(loc: Location) -> tuple[int, bool]:
    engine = create_engine(loc.db_url)
    with engine.connect() as c:
        state = (c.execute(text("select schema_version from store_meta")).scalar_one(), inspect(c).has_table("vectors"))
    engine.dispose()
    return state


def test_a_schema_1_store_is_upgraded_by_a_writer(loc: Location) -> None:
    with loc.create() as s:
        s.add([make_doc(f"d{i}", collection="a" if i % 2 else "b", seed=i) for i in range(6)])
        before = _snapshot(s)
    _downgrade_to_schema_1(loc)
    assert _schema_state(loc) == (1, True)
    with pytest.raises(StoreError, match="schema version 1; open it once for writing"):
        loc.open(None, read_only=True)
    with loc.open() as s:
        assert _snapshot(s) == before and s.verify().clean
        s.add(make_doc("after", seed=99))
        assert s.search(STORED_LAYERS[0], _queries(1)[0], 200)
    assert _schema_state(loc) == (2, False)
    with loc.open(None, read_only=True) as s:
        assert s.verify().clean and len(s.list_documents()) == 7


def test_an_upgrade_cut_after_its_commit_is_finished_by_the_next_writer(loc: Location, monkeypatch) -> None:
    with loc.create() as s:
        s.add([make_doc(f"d{i}", seed=i) for i in range(4)])
        before = _snapshot(s)
    _downgrade_to_schema_1(loc)

    def crash(self):
        raise KeyboardInterrupt("killed after the upgrade's commit")

    with monkeypatch.context() as m:
        m.setattr(LayerIndexes, "layers_on_disk", crash)
        with pytest.raises(KeyboardInterrupt):
            loc.open()
    assert _schema_state(loc) == (2, False)  # committed; the index files still hold schema 1's ids
    with loc.open() as s:
        assert _snapshot(s) == before and s.verify().clean


def test_an_unknown_schema_is_refused(loc: Location) -> None:
    loc.create().close()  # an empty store
    engine = create_engine(loc.db_url)
    with engine.begin() as c:
        c.execute(text("update store_meta set schema_version = 7"))
    engine.dispose()
    with pytest.raises(StoreError, match="schema version 7, this code reads 2"):
        SqlSpanStore.open(loc.target, None, data_dir=loc.data_dir)
