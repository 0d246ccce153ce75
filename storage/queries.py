"""The store's SQL queries (portable SQLAlchemy Core / ORM statements, batched to stay under parameter limits)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Row, Table, func, insert, select
from sqlalchemy.orm import Session

from .schema import CollectionRow, DocumentRow, SpanRow, VectorRow

BATCH = 5000  # ids per IN (...) clause


def _batches(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), BATCH):
        yield items[i:i + BATCH]


def collection_id(s: Session, name: str) -> int | None:
    return s.scalar(select(CollectionRow.id).where(CollectionRow.name == name))


def ensure_collection(s: Session, name: str) -> int:
    """The collection's id, inserting the row if needed (inside the caller's transaction)."""
    found = collection_id(s, name)
    if found is not None:
        return found
    row = CollectionRow(name=name)
    s.add(row)
    s.flush()
    return row.id


def document_rows(s: Session, collection: str, doc_ids: Sequence[str]) -> dict[str, DocumentRow]:
    """``{doc_id: row}`` of the given ids that exist in ``collection``."""
    coll = collection_id(s, collection)
    if coll is None:
        return {}
    out: dict[str, DocumentRow] = {}
    for batch in _batches(list(doc_ids)):
        q = select(DocumentRow).where(DocumentRow.collection_id == coll, DocumentRow.doc_id.in_(batch))
        out.update((r.doc_id, r) for r in s.scalars(q))
    return out


def vector_ids_by_layer(s: Session, document_pks: Sequence[int]) -> dict[int, np.ndarray]:
    """``{layer: [n] int64 vector ids}`` of the given documents (primary keys)."""
    found: dict[int, list[int]] = {}
    for batch in _batches(list(document_pks)):
        q = (select(VectorRow.layer, VectorRow.id).join(SpanRow, VectorRow.span_id == SpanRow.id)
             .where(SpanRow.document_id.in_(batch)))
        for layer, vid in s.execute(q):
            found.setdefault(layer, []).append(vid)
    return {layer: np.asarray(ids, dtype=np.int64) for layer, ids in found.items()}


def search_rows(s: Session, vector_ids: Sequence[int], collection_pk: int | None) -> dict[int, Row[Any]]:
    """``{vector id: row}`` with the span's offsets and text, the document's id, collection and metadata.

    The span text is cut in SQL (``substr``, 1-based in SQLite and PostgreSQL alike) so long documents stay there.
    """
    text = func.substr(DocumentRow.text, SpanRow.char_start + 1, SpanRow.char_end - SpanRow.char_start)
    out: dict[int, Row[Any]] = {}
    for batch in _batches(list(vector_ids)):
        q = (select(VectorRow.id.label("vid"), SpanRow.id.label("span_pk"), SpanRow.span_idx, SpanRow.token_start,
                    SpanRow.token_end, SpanRow.char_start, SpanRow.char_end, text.label("text"), DocumentRow.doc_id,
                    DocumentRow.meta, CollectionRow.name.label("collection"))
             .join(SpanRow, VectorRow.span_id == SpanRow.id).join(DocumentRow, SpanRow.document_id == DocumentRow.id)
             .join(CollectionRow, DocumentRow.collection_id == CollectionRow.id).where(VectorRow.id.in_(batch)))
        if collection_pk is not None:
            q = q.where(DocumentRow.collection_id == collection_pk)
        out.update((r.vid, r) for r in s.execute(q))
    return out


def layer_vector_ids(s: Session) -> dict[int, np.ndarray]:
    """``{layer: sorted [n] int64 ids}`` of every vector row."""
    found: dict[int, list[int]] = {}
    for layer, vid in s.execute(select(VectorRow.layer, VectorRow.id).order_by(VectorRow.id)):
        found.setdefault(layer, []).append(vid)
    return {layer: np.asarray(ids, dtype=np.int64) for layer, ids in found.items()}


def vector_locations(s: Session, layer: int, vector_ids: Sequence[int]) -> dict[str, list[tuple[int, int]]]:
    """``{kv_file: [(vector id, row in the file's layer vectors)]}`` for vectors of one layer."""
    out: dict[str, list[tuple[int, int]]] = {}
    for batch in _batches(list(vector_ids)):
        q = (select(DocumentRow.kv_file, VectorRow.id, VectorRow.row).join(SpanRow, VectorRow.span_id == SpanRow.id)
             .join(DocumentRow, SpanRow.document_id == DocumentRow.id)
             .where(VectorRow.layer == layer, VectorRow.id.in_(batch)))
        for kv_file, vid, row in s.execute(q):
            out.setdefault(kv_file, []).append((vid, row))
    return out


def bulk_insert(s: Session, table: Table, columns: dict[str, np.ndarray]) -> int:
    """Insert rows given column-wise (``columns``: every column of ``table`` by name, equal-length integer arrays) in
    one executemany; returns the number of rows.

    On SQLite the rows go to the driver's ``executemany`` as plain tuples: SQLAlchemy's per-row parameter processing
    is most of the cost of a large insert there. Elsewhere SQLAlchemy Core's ``insert`` is used (on PostgreSQL it
    batches the rows into multi-row statements, which a plain ``executemany`` would not).

    Raises:
        ValueError: a column is missing or unknown, or the lengths differ.
    """
    names = [c.name for c in table.columns]
    if sorted(columns) != sorted(names):
        raise ValueError(f"columns {sorted(columns)} do not match table {table.name!r}'s {sorted(names)}")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns of table {table.name!r} differ in length: {sorted(lengths)}")
    count = lengths.pop() if lengths else 0
    if count == 0:
        return 0
    rows = np.stack([np.asarray(columns[n], dtype=np.int64) for n in names], axis=1).tolist()
    dialect = s.get_bind().dialect
    if dialect.name == "sqlite":
        quote = dialect.identifier_preparer.quote
        sql = (f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) "
               f"VALUES ({', '.join('?' * len(names))})")
        s.connection().exec_driver_sql(sql, [tuple(r) for r in rows])
    else:
        s.execute(insert(table), [dict(zip(names, r)) for r in rows])
    return count
