"""SQLAlchemy 2 models of the span store's metadata, and engine setup (SQLite by default, any URL accepted).

Portable SQL only (no SQLite-only types): the same models run on PostgreSQL. Span ids are assigned by the store from a
counter in ``store_meta``, so no database sequence is involved.

Index vectors have no rows of their own (schema 2): a vector's id in its layer's FAISS index is
``(span id << VECTOR_ID_BITS) | its row within the span`` (:func:`vector_ids`), and a span's ``vector_start`` /
``vector_end`` give its rows in the document file's ``layer{L}.vectors``. Schema 1 kept one ``vectors`` row per index
vector (about 85% of all rows, and of the SQL share of an ingest); a writer's open upgrades such a store in place
(``SqlSpanStore.open``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 2
# bits of a FAISS id that number a vector within its span: a span may hold at most 2**VECTOR_ID_BITS index vectors
VECTOR_ID_BITS = 20
MAX_SPAN_VECTORS = 1 << VECTOR_ID_BITS


class Base(DeclarativeBase):
    """Declarative base of the store's tables."""


class StoreMeta(Base):
    """The single row describing the store.

    ``data_generation`` grows with every committed add / delete; ``index_generation`` is set to it once the FAISS files
    reflecting that change are on disk, so ``index_generation < data_generation`` marks stale indexes.
    """

    __tablename__ = "store_meta"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    schema_version: Mapped[int] = mapped_column(Integer)
    fingerprint: Mapped[str] = mapped_column(Text)  # Fingerprint.to_json()
    num_layers: Mapped[int] = mapped_column(Integer)
    num_kv_heads: Mapped[int] = mapped_column(Integer)
    head_dim: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(32))
    data_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    index_generation: Mapped[int] = mapped_column(BigInteger, default=0)
    next_span_id: Mapped[int] = mapped_column(BigInteger, default=1)


class CollectionRow(Base):
    __tablename__ = "collections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)


class DocumentRow(Base):
    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("collection_id", "doc_id", name="uq_documents_collection_doc"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    doc_id: Mapped[str] = mapped_column(String(1024))
    text: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    num_tokens: Mapped[int] = mapped_column(Integer)
    kv_file: Mapped[str] = mapped_column(String(255), unique=True)
    kv_sha256: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=lambda: datetime.now(timezone.utc))


class SpanRow(Base):
    """A span of one layer of one document; ``vector_start``/``vector_end`` index the file's ``layer{L}.vectors``, and
    its vectors' FAISS ids are ``vector_ids([id], [vector_end - vector_start])``."""

    __tablename__ = "spans"
    __table_args__ = (Index("ix_spans_document_layer", "document_id", "layer", "span_idx"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    layer: Mapped[int] = mapped_column(Integer)
    span_idx: Mapped[int] = mapped_column(Integer)
    token_start: Mapped[int] = mapped_column(Integer)
    token_end: Mapped[int] = mapped_column(Integer)
    char_start: Mapped[int] = mapped_column(Integer)
    char_end: Mapped[int] = mapped_column(Integer)
    vector_start: Mapped[int] = mapped_column(Integer)
    vector_end: Mapped[int] = mapped_column(Integer)


def vector_ids(span_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """FAISS ids of the index vectors of spans ``span_ids [n]`` holding ``counts [n]`` vectors each: ``[counts.sum()]``
    int64, span by span, rows in order (increasing when ``span_ids`` is)."""
    span_ids = np.asarray(span_ids, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(span_ids << VECTOR_ID_BITS, counts) + (np.arange(total, dtype=np.int64) - first)


def split_vector_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(span ids, rows within the span)`` of FAISS ids ``[n]`` (the inverse of :func:`vector_ids`)."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids >> VECTOR_ID_BITS, ids & (MAX_SPAN_VECTORS - 1)


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """An engine for ``url``; for SQLite, WAL journaling, foreign keys and a busy timeout on every connection.

    Args:
        url: SQLAlchemy URL, e.g. ``sqlite:////abs/meta.sqlite`` or ``postgresql+psycopg://...``.
        read_only: Make SQLite connections ``query_only`` (a reader process never writes).
    """
    is_sqlite = url.startswith("sqlite")
    engine = create_engine(url, connect_args={"timeout": 30} if is_sqlite else {})
    if is_sqlite:
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            if not read_only:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=FULL")
            if read_only:
                cur.execute("PRAGMA query_only=ON")
            cur.close()
    return engine
