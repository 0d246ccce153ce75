"""The store's SQL queries (portable SQLAlchemy Core / ORM statements, batched to stay under parameter limits)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Row, Table, func, insert, select
from sqlalchemy.orm import Session

from .schema import CollectionRow, DocumentRow, SpanRow, split_vector_ids, vector_ids

BATCH = 5000  # ids per IN (...) clause


def batches(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """``items`` in runs of ``BATCH`` (SQL drivers cap the parameters of one statement: SQLite at 32,766 by default,
    psycopg at 65,535)."""
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
    for batch in batches(list(doc_ids)):
        q = select(DocumentRow).where(DocumentRow.collection_id == coll, DocumentRow.doc_id.in_(batch))
        out.update((r.doc_id, r) for r in s.scalars(q))
    return out


def _by_layer(rows: Iterator[Any]) -> dict[int, np.ndarray]:
    """``{layer: [n] int64 vector ids}`` from ``(layer, span id, vector count)`` rows (ids increasing when the rows
    come in span-id order)."""
    found: dict[int, list[tuple[int, int]]] = {}
    for layer, span_id, count in rows:
        found.setdefault(layer, []).append((span_id, count))
    out = {}
    for layer, pairs in found.items():
        arr = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        out[layer] = vector_ids(arr[:, 0], arr[:, 1])
    return out


_VECTOR_COUNT = (SpanRow.vector_end - SpanRow.vector_start)


def vector_ids_by_layer(s: Session, document_pks: Sequence[int]) -> dict[int, np.ndarray]:
    """``{layer: [n] int64 vector ids}`` of the given documents (primary keys)."""
    parts: dict[int, list[np.ndarray]] = {}
    for batch in batches(list(document_pks)):
        q = (select(SpanRow.layer, SpanRow.id, _VECTOR_COUNT).where(SpanRow.document_id.in_(batch))
             .order_by(SpanRow.id))
        for layer, ids in _by_layer(iter(s.execute(q))).items():
            parts.setdefault(layer, []).append(ids)
    return {layer: np.concatenate(v) for layer, v in parts.items()}


def search_rows(s: Session, vector_ids: Sequence[int], collection_pk: int | None) -> dict[int, Row[Any]]:
    """``{vector id: row}`` with the span's offsets and text, the document's id, collection and metadata.

    The span text is cut in SQL (``substr``, 1-based in SQLite and PostgreSQL alike) so long documents stay there.
    """
    text = func.substr(DocumentRow.text, SpanRow.char_start + 1, SpanRow.char_end - SpanRow.char_start)
    ids = np.asarray(vector_ids, dtype=np.int64)
    spans, rows = split_vector_ids(ids)
    by_span: dict[int, Row[Any]] = {}
    for batch in batches(sorted(set(spans.tolist()))):
        q = (select(SpanRow.id.label("span_pk"), _VECTOR_COUNT.label("num_vectors"), SpanRow.span_idx,
                    SpanRow.token_start, SpanRow.token_end, SpanRow.char_start, SpanRow.char_end, text.label("text"),
                    DocumentRow.doc_id, DocumentRow.meta, CollectionRow.name.label("collection"))
             .join(DocumentRow, SpanRow.document_id == DocumentRow.id)
             .join(CollectionRow, DocumentRow.collection_id == CollectionRow.id).where(SpanRow.id.in_(batch)))
        if collection_pk is not None:
            q = q.where(DocumentRow.collection_id == collection_pk)
        by_span.update((r.span_pk, r) for r in s.execute(q))
    out: dict[int, Row[Any]] = {}
    for vid, span, row in zip(ids.tolist(), spans.tolist(), rows.tolist()):
        hit = by_span.get(span)
        if hit is not None and row < hit.num_vectors:
            out[vid] = hit
    return out


def layer_vector_ids(s: Session) -> dict[int, np.ndarray]:
    """``{layer: sorted [n] int64 ids}`` of every index vector the span rows describe."""
    return _by_layer(iter(s.execute(select(SpanRow.layer, SpanRow.id, _VECTOR_COUNT).order_by(SpanRow.id))))


def vector_counts(s: Session, *, by_document: bool = False) -> dict[Any, int]:
    """Index vectors the span rows describe: ``{layer: n}``, or ``{(document pk, layer): n}`` with ``by_document``."""
    keys = (SpanRow.document_id, SpanRow.layer) if by_document else (SpanRow.layer,)
    q = select(*keys, func.sum(_VECTOR_COUNT)).group_by(*keys)
    return {(tuple(r[:-1]) if by_document else r[0]): int(r[-1] or 0) for r in s.execute(q)}


def vector_locations(s: Session, layer: int, vector_ids: Sequence[int]) -> dict[str, list[tuple[int, int]]]:
    """``{kv_file: [(vector id, row in the file's layer vectors)]}`` for vectors of one layer (ids that name no
    vector of a span of this layer are left out)."""
    ids = np.asarray(vector_ids, dtype=np.int64)
    spans, rows = split_vector_ids(ids)
    where: dict[int, tuple[str, int, int]] = {}
    for batch in batches(sorted(set(spans.tolist()))):
        q = (select(SpanRow.id, DocumentRow.kv_file, SpanRow.vector_start, _VECTOR_COUNT)
             .join(DocumentRow, SpanRow.document_id == DocumentRow.id)
             .where(SpanRow.layer == layer, SpanRow.id.in_(batch)))
        where.update((span_id, (kv_file, start, count)) for span_id, kv_file, start, count in s.execute(q))
    out: dict[str, list[tuple[int, int]]] = {}
    for vid, span, row in zip(ids.tolist(), spans.tolist(), rows.tolist()):
        found = where.get(span)
        if found is not None and row < found[2]:
            out.setdefault(found[0], []).append((vid, found[1] + row))
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
