"""The persistent span store: SQL metadata (SQLite by default) + FAISS per layer + one safetensors file per document.

Layout of a store folder (``data_dir``)::

    meta.sqlite          metadata (only when opened by folder path; with a URL the database lives elsewhere)
    kv/<hash>-<rand>.safetensors   one document's K/V, index vectors and owners per layer
    faiss/layer{L}.index           one exact inner-product index per layer (ids = vectors.id)
    writer.lock          flock held by the one process that has the store open for writing

Crash safety by write order. Add: K/V file (temp, fsync, rename) -> one SQL transaction (document + spans, replacing
an existing (collection, id) in the same transaction) -> FAISS files -> old file removed. Delete: SQL transaction ->
FAISS ``remove_ids`` -> file removed. A crash leaves at worst unreferenced files or an index out of step with the span
rows (each span names its vectors' FAISS ids: :func:`~ltri_rag.storage.schema.vector_ids`); opening for writing
repairs both (see :mod:`ltri_rag.storage.integrity`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import delete, inspect, select
from sqlalchemy import text as sql_text
from sqlalchemy.orm import Session
from typing_extensions import Self

from ltri_rag.store import (
    DocumentNotFound,
    DocumentRecord,
    Fingerprint,
    FingerprintMismatch,
    StoreError,
    VerifyReport,
)

from . import integrity
from .faiss_index import LayerIndexes
from .kvfiles import new_file_name, write_kv_file
from .prepare import PreparedDocument, check_ids, prepare_document
from .queries import (
    batches,
    bulk_insert,
    document_rows,
    ensure_collection,
    vector_ids_by_layer,
)
from .schema import SCHEMA_VERSION, Base, DocumentRow, SpanRow, StoreMeta, make_engine, vector_ids
from .span_reads import SpanReads


def _resolve(path_or_url: str | os.PathLike[str],
             data_dir: str | os.PathLike[str] | None) -> tuple[str, Path, Path | None]:
    """``(url, data_dir, local database file or None)`` for a folder path or an SQLAlchemy URL."""
    text = os.fspath(path_or_url)
    if "://" in text:
        if data_dir is None:
            raise ValueError(f"a database URL ({text!r}) needs data_dir= for the K/V and index files")
        db_file = Path(text.split(":///", 1)[1]) if text.startswith("sqlite:///") and len(text) > 10 else None
        return text, Path(data_dir).resolve(), db_file
    folder = Path(text).resolve()
    db = folder / "meta.sqlite"
    return f"sqlite:///{db}", Path(data_dir).resolve() if data_dir else folder, db


INDEX_WRITE_GROWTH = 0.25  # index files are rewritten once the changes since the last write reach this share
FILE_WRITERS = 4  # K/V files of one add() written at once, at most (and at most one per CPU)


_F = TypeVar("_F", bound=Callable[..., Any])


def _serialised(method: _F) -> _F:
    """Run ``method`` under the store's lock: one write (or index search) at a time per store object. SQLite's
    driver begins a transaction only at the first write, so two threads adding at once would read the same next
    span id; the in-memory FAISS indexes and the pending-change counters are shared too."""

    @functools.wraps(method)
    def locked(self: SqlSpanStore, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


_STORES: weakref.WeakSet[SqlSpanStore] = weakref.WeakSet()  # every store object of this process (see _forked)


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        # a descriptor closed by the parent's close() just before the fork must not stop the other stores
        with contextlib.suppress(OSError):
            store._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SqlSpanStore(SpanReads):
    """A :class:`ltri_rag.store.SpanStore` on SQLAlchemy + FAISS + safetensors. Use :meth:`create` or :meth:`open`.

    One process may hold a store for writing (an exclusive lock on ``writer.lock``); any number may open it with
    ``read_only=True`` and search while it writes: they see committed documents only, and reload an index file when
    the writer replaces it.
    """

    def __init__(self, url: str, data_dir: Path, db_file: Path | None, *, read_only: bool) -> None:
        self.url, self.data_dir, self.db_file, self.read_only = url, data_dir, db_file, read_only
        self.kv_dir, self.faiss_dir = data_dir / "kv", data_dir / "faiss"
        self._lock_fd: int | None = None
        self._lock = threading.RLock()  # see _serialised
        self._forked_from_writer = False  # see _forked
        self._inherited_pools: list[Any] = []  # see _forked
        self.engine = make_engine(url, read_only=read_only)
        self.fingerprint: Fingerprint = Fingerprint(num_layers=1, num_kv_heads=1, head_dim=1, dtype="float32")
        self.indexes: LayerIndexes | None = None
        # index changes of committed adds / deletes not yet written to the FAISS files (see _changed_indexes)
        self._dirty_layers: set[int] = set()
        self._pending_changes = 0  # vectors added or removed since the files were last written
        self._persisted_vectors = 0  # vectors in the indexes when they were last written
        self._pending_generation: int | None = None
        _STORES.add(self)

    # ------------------------------------------------------------------------------------------- lifecycle
    @classmethod
    def create(cls, path_or_url: str | os.PathLike[str], fingerprint: Fingerprint, *,
               data_dir: str | os.PathLike[str] | None = None) -> SqlSpanStore:
        """Create an empty store (folder path -> ``folder/meta.sqlite``; URL -> tables there, files in ``data_dir``).

        Raises:
            StoreError: a store already exists there, or another process holds it.
        """
        if not isinstance(fingerprint, Fingerprint):
            raise TypeError(f"fingerprint must be a Fingerprint, got {type(fingerprint).__name__}")
        url, folder, db_file = _resolve(path_or_url, data_dir)
        for sub in ("kv", "faiss"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        store = cls(url, folder, db_file, read_only=False)
        try:
            store._take_writer_lock()
            if inspect(store.engine).has_table(StoreMeta.__tablename__):
                with Session(store.engine) as s:
                    if s.get(StoreMeta, 1) is not None:
                        raise StoreError(f"a store already exists at {os.fspath(path_or_url)!r}; use open()")
                # tables without the meta row: a creation that stopped between the two steps; finish it
            Base.metadata.create_all(store.engine)
            fp = fingerprint
            with Session(store.engine) as s, s.begin():
                s.add(StoreMeta(id=1, schema_version=SCHEMA_VERSION, fingerprint=fp.to_json(),
                                num_layers=fp["num_layers"], num_kv_heads=fp["num_kv_heads"], head_dim=fp["head_dim"],
                                dtype=fp["dtype"], data_generation=0, index_generation=0, next_span_id=1))
            store._attach(fingerprint)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open(cls, path_or_url: str | os.PathLike[str], fingerprint: Fingerprint | None, *,
             data_dir: str | os.PathLike[str] | None = None, read_only: bool = False) -> SqlSpanStore:
        """Open an existing store; for writing, also repair what a crash can leave (orphan files, stale indexes),
        after cheap checks say the last writer did not close cleanly (:func:`integrity.closed_cleanly`).

        Args:
            fingerprint: What the caller's model/tokenizer/config give; ``None`` accepts the stored one.
            read_only: Open as a reader (no lock, no repair, no writes).

        A store of schema 1 (one SQL row per index vector) is upgraded in place by a writer's open: the ``vectors``
        table is dropped and every layer's FAISS index rebuilt from the K/V files under the new ids (seconds per
        million vectors; a crash midway leaves a store that the next writer's open repairs). A reader cannot open
        it before that.

        Raises:
            StoreError: no store there, another process has it open for writing, or its schema is unknown (or 1
                and ``read_only``).
            FingerprintMismatch: ``fingerprint`` differs from the stored one (every differing key is named).
        """
        url, folder, db_file = _resolve(path_or_url, data_dir)
        if (db_file is not None and not db_file.exists()) or not folder.is_dir():
            raise StoreError(f"no store at {os.fspath(path_or_url)!r} (missing {db_file or folder})")
        store = cls(url, folder, db_file, read_only=read_only)
        try:
            with Session(store.engine) as s:
                meta = s.get(StoreMeta, 1) if inspect(store.engine).has_table("store_meta") else None
                if meta is None:
                    raise StoreError(f"no store at {os.fspath(path_or_url)!r} (no store_meta table or row)")
                version = meta.schema_version
                if version not in (1, SCHEMA_VERSION):
                    raise StoreError(f"store schema version {version}, this code reads {SCHEMA_VERSION}")
                if version == 1 and read_only:
                    raise StoreError(f"the store at {os.fspath(path_or_url)!r} has schema version 1; open it once for "
                                     f"writing to upgrade it to {SCHEMA_VERSION}")
                stored = Fingerprint.from_json(meta.fingerprint)
            if fingerprint is not None and stored.diff(fingerprint):
                raise FingerprintMismatch(stored.diff(fingerprint))
            store._attach(stored)
            if not read_only:
                store._take_writer_lock()
                if version == 1:
                    store._upgrade_from_schema_1()
                if not integrity.closed_cleanly(store):  # what a crash can leave: see integrity.repair
                    integrity.repair(store, deep=False)
                store._persisted_vectors = store._index_size()
        except BaseException:
            store.close()
            raise
        return store

    def _upgrade_from_schema_1(self) -> None:
        """Drop schema 1's ``vectors`` table and its FAISS files (ids of the old numbering), in that order; the
        caller's repair then rebuilds every layer's index from the K/V files. The commit marks the indexes stale, so
        a crash after it is finished by the next writer's open."""
        with Session(self.engine) as s, s.begin():
            s.execute(sql_text("DROP TABLE IF EXISTS vectors"))
            meta = s.execute(select(StoreMeta).where(StoreMeta.id == 1).with_for_update()).scalar_one()
            meta.schema_version = SCHEMA_VERSION
            meta.data_generation += 1
        assert self.indexes is not None
        for layer in self.indexes.layers_on_disk():
            self.indexes.path(layer).unlink(missing_ok=True)
            self.indexes.forget(layer)

    def _attach(self, fingerprint: Fingerprint) -> None:
        self.fingerprint = fingerprint
        dim = int(fingerprint["num_kv_heads"]) * int(fingerprint["head_dim"])  # type: ignore[arg-type]
        self.indexes = LayerIndexes(self.faiss_dir, dim)

    def _take_writer_lock(self) -> None:
        fd = os.open(self.data_dir / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"another process has the store at {str(self.data_dir)!r} open for writing") from None
        self._lock_fd = fd

    @_serialised
    def close(self) -> None:
        """Write pending index changes (:meth:`flush`), release the database connections and the writer lock
        (idempotent). The connections and the lock are released even when the flush fails (its error is raised;
        the next writer's open repairs the indexes)."""
        try:
            if self._dirty_layers and self.indexes is not None and self._lock_fd is not None:
                self.flush()
        finally:
            if getattr(self, "engine", None) is not None:
                self.engine.dispose()
            if self._lock_fd is not None:
                fd, self._lock_fd = self._lock_fd, None  # (a fork from here on finds no descriptor to close)
                os.close(fd)  # releases the flock

    def _forked(self) -> None:
        """Run in a child forked from the process that opened this store object (``os.register_at_fork``): a fresh
        lock (a thread of the parent may have held it at the fork); database connections of its own (the engine's
        pool replaced by ``dispose(close=False)``; the inherited pool is kept referenced, so that the child does not
        close the parent's SQLite connections, which could check point or remove a write-ahead log the parent is
        using, when the dropped pool would be collected); and no writing: the child's copy of the writer-lock
        descriptor is closed (that does not release the parent's lock, and the lock no longer outlives the parent's
        close while this child runs), and the parent's pending index changes stay the parent's to write. The child
        may read and search (FAISS searches in a forked child are subject to the OpenMP runtime's fork limits)."""
        self._lock = threading.RLock()
        engine = getattr(self, "engine", None)
        if engine is not None:
            self._inherited_pools.append(engine.pool)
            engine.dispose(close=False)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            self._forked_from_writer = True
        self._dirty_layers = set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # an index search must not meet an index change of another thread (FAISS indexes are not safe to mutate while
    # searched), nor a reader's index reload
    search = _serialised(SpanReads.search)

    @property
    def writable(self) -> bool:
        """Whether :meth:`add` / :meth:`delete` may write (not read-only, not closed)."""
        return not self.read_only and self._lock_fd is not None

    def _writable(self) -> LayerIndexes:
        if self._forked_from_writer:
            raise StoreError(f"this store object at {str(self.data_dir)!r} was opened for writing by the process this "
                             "one was forked from, which keeps the writer lock; open the store in this process "
                             "(read_only=True while the other one writes)")
        if not self.writable:
            raise StoreError("the store is open read-only (or closed)")
        assert self.indexes is not None
        return self.indexes

    # ----------------------------------------------------------------------------------------------- writes
    @_serialised
    def add(self, documents: DocumentRecord | Sequence[DocumentRecord]) -> list[str]:
        """Add documents; an existing (collection, doc_id) is replaced atomically. Returns the ids in order.

        Raises:
            TypeError / ValueError: bad input (nothing is written).
        """
        indexes = self._writable()
        docs = [documents] if isinstance(documents, DocumentRecord) else list(documents)
        if not docs:  # nothing to write: no generation bump (which would leave the store marked unclean)
            return []
        prepared = [prepare_document(d, self.fingerprint) for d in docs]
        for coll in {d.collection for d in docs}:
            check_ids([d.doc_id for d in docs if d.collection == coll])
        files = [new_file_name(d.collection, d.doc_id) for d in docs]
        paths = [self.kv_dir / name for name in files]
        try:
            shas = self._write_files(prepared, paths)
            with Session(self.engine) as s, s.begin():
                old_files, old_ids, new_ids = self._insert(s, prepared, files, shas)
                generation = self._bump(s)
        except BaseException:
            for path in paths:  # written or not: unlinking a name never written is a no-op
                path.unlink(missing_ok=True)
            raise
        for layer, ids in old_ids.items():
            indexes.remove(layer, ids)
        for layer, (ids, vecs) in new_ids.items():
            indexes.add(layer, ids, vecs)
        changes = sum(len(ids) for ids in old_ids.values()) + sum(len(ids) for ids, _ in new_ids.values())
        self._changed_indexes(set(old_ids) | set(new_ids), changes, generation)
        for name in old_files:
            (self.kv_dir / name).unlink(missing_ok=True)
        return [d.doc_id for d in docs]

    def _write_files(self, prepared: list[PreparedDocument], paths: list[Path]) -> list[str]:
        """Write each document's K/V file (:func:`write_kv_file`); returns their sha256 in order.

        Several documents are written by up to :data:`FILE_WRITERS` threads at once: hashing, writing and fsync
        release the GIL, so a batch's files are written in parallel on a multi-core host with a fast disk. Every
        write is waited for before this returns or raises (the caller then removes every path on failure).
        """
        def write(p: PreparedDocument, path: Path) -> str:
            return write_kv_file(path, p.tensors(), {"doc_id": p.record.doc_id, "collection": p.record.collection})

        workers = min(FILE_WRITERS, len(paths), os.cpu_count() or 1)
        if workers <= 1:
            return [write(p, path) for p, path in zip(prepared, paths)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ltri-store-file") as pool:
            futures = [pool.submit(write, p, path) for p, path in zip(prepared, paths)]
            wait(futures)
        return [f.result() for f in futures]  # the first failure in document order is raised

    def _insert(self, s: Session, prepared: list[PreparedDocument], files: list[str], shas: list[str]
                ) -> tuple[list[str], dict[int, np.ndarray], dict[int, tuple[np.ndarray, np.ndarray]]]:
        """Insert the documents (replacing old ones) in session ``s``; returns old files, old ids and new vectors."""
        meta = s.execute(select(StoreMeta).where(StoreMeta.id == 1).with_for_update()).scalar_one()
        old_files: list[str] = []
        old_ids: dict[int, list[np.ndarray]] = {}
        new: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # layer -> [(FAISS ids, vectors)]
        for p, name, sha in zip(prepared, files, shas):
            rec = p.record
            coll = ensure_collection(s, rec.collection)
            old = s.execute(select(DocumentRow.id, DocumentRow.kv_file).where(
                DocumentRow.collection_id == coll, DocumentRow.doc_id == rec.doc_id)).first()
            if old is not None:
                for layer, ids in vector_ids_by_layer(s, [old.id]).items():
                    old_ids.setdefault(layer, []).append(ids)
                old_files.append(old.kv_file)
                s.execute(delete(DocumentRow).where(DocumentRow.id == old.id))
            row = DocumentRow(collection_id=coll, doc_id=rec.doc_id, text=rec.text, meta=dict(rec.metadata),
                              num_tokens=rec.num_tokens, kv_file=name, kv_sha256=sha)
            s.add(row)
            s.flush()
            span_cols: list[dict[str, np.ndarray]] = []
            for layer in p.layers:
                n = len(layer.spans)
                span_ids = np.arange(meta.next_span_id, meta.next_span_id + n, dtype=np.int64)
                meta.next_span_id += n
                spans = layer.spans.reshape(n, 6)
                span_cols.append({"id": span_ids, "document_id": np.full(n, row.id, np.int64),
                                  "layer": np.full(n, layer.layer, np.int64), "span_idx": np.arange(n, dtype=np.int64),
                                  "token_start": spans[:, 0], "token_end": spans[:, 1], "char_start": spans[:, 2],
                                  "char_end": spans[:, 3], "vector_start": spans[:, 4], "vector_end": spans[:, 5]})
                # vectors are grouped by span in file order, so these ids follow the file's rows
                vec_ids = vector_ids(span_ids, spans[:, 5] - spans[:, 4])
                new.setdefault(layer.layer, []).append((vec_ids, layer.flat_vectors))
            # column-wise, one executemany (Core, or the driver itself on SQLite: no ORM per-row work)
            if span_cols:
                bulk_insert(s, SpanRow.__table__, {k: np.concatenate([c[k] for c in span_cols]) for k in span_cols[0]})
        merged_old = {layer: np.concatenate(v) for layer, v in old_ids.items()}
        merged_new = {layer: (np.concatenate([i for i, _ in v]), np.concatenate([x for _, x in v]))
                      for layer, v in new.items()}
        return old_files, merged_old, merged_new

    @_serialised
    def delete(self, ids: Sequence[str], *, collection: str = "default") -> None:
        """Delete documents by id. Unknown ids raise :class:`DocumentNotFound` naming them; nothing is deleted then."""
        indexes = self._writable()
        wanted = check_ids(ids)
        if not wanted:  # nothing to delete: no generation bump (which would leave the store marked unclean)
            return
        with Session(self.engine) as s, s.begin():
            rows = document_rows(s, collection, wanted)
            missing = [i for i in wanted if i not in rows]
            if missing:
                raise DocumentNotFound(missing, collection)
            doc_pks = [r.id for r in rows.values()]
            old_ids = vector_ids_by_layer(s, doc_pks)
            for batch in batches(doc_pks):
                s.execute(delete(DocumentRow).where(DocumentRow.id.in_(batch)))
            generation = self._bump(s)
        for layer, vec_ids in old_ids.items():
            indexes.remove(layer, vec_ids)
        self._changed_indexes(set(old_ids), sum(len(ids) for ids in old_ids.values()), generation)
        for r in rows.values():
            (self.kv_dir / r.kv_file).unlink(missing_ok=True)

    @staticmethod
    def _bump(s: Session) -> int:
        meta = s.execute(select(StoreMeta).where(StoreMeta.id == 1).with_for_update()).scalar_one()
        meta.data_generation += 1
        return meta.data_generation

    def _changed_indexes(self, layers: set[int], changes: int, generation: int) -> None:
        """Note a committed change of ``changes`` vectors in ``layers``' in-memory indexes; write the changed layers'
        files once the changes since the last write reach :data:`INDEX_WRITE_GROWTH` of the indexes' size then.

        Writing every layer's whole index after every add made ingest quadratic in the store's size (each batch
        rewrote every vector stored before it); this way each vector is written a bounded number of times (at most
        ``1 + 1 / INDEX_WRITE_GROWTH``). Until written, the change is in this process's indexes (its searches see
        it), the database marks the files stale (``index_generation < data_generation``), readers in other
        processes search the files they have (they only return spans whose rows are committed), and a crash loses
        nothing: :meth:`open` re-adds the missing vectors from the K/V files.
        """
        self._dirty_layers |= layers
        self._pending_changes += changes
        self._pending_generation = generation
        if self._pending_changes >= INDEX_WRITE_GROWTH * self._persisted_vectors:
            self.flush()

    @_serialised
    def flush(self) -> None:
        """Write the FAISS files of every layer whose index changed since they were last written (``close`` and
        ``verify`` do it too)."""
        if not self._dirty_layers or self._pending_generation is None:
            return
        self._persist_indexes(self._dirty_layers, self._pending_generation)
        self._persisted_vectors = self._index_size()
        self._dirty_layers, self._pending_changes, self._pending_generation = set(), 0, None

    def _index_size(self) -> int:
        """Vectors in the in-memory indexes, over every loaded layer."""
        assert self.indexes is not None
        return sum(self.indexes.get(layer).ntotal for layer in self.indexes.layers_loaded())

    def _persist_indexes(self, layers: set[int], generation: int) -> None:
        assert self.indexes is not None
        self.indexes.persist(sorted(layers))
        with Session(self.engine) as s, s.begin():
            meta = s.get(StoreMeta, 1)
            assert meta is not None
            if meta.data_generation == generation:
                meta.index_generation = generation

    def verify(self) -> VerifyReport:
        """Check the database, the FAISS indexes and the files against each other (checksums included); a writer
        first writes its pending index changes (:meth:`flush`)."""
        if self._lock_fd is not None:
            self.flush()
        return integrity.verify(self, deep=True)

    @_serialised
    def repair(self, *, drop_broken: bool = False) -> VerifyReport:
        """Fix what can be fixed: remove orphan files, bring indexes in line with the span rows (rebuilding
        unreadable ones from the files); with ``drop_broken``, delete documents whose file is missing or corrupt.
        Returns the report from before the repair."""
        self._writable()
        self.flush()  # (repair marks the files current: they must hold this process's changes first)
        return integrity.repair(self, deep=True, drop_broken=drop_broken)

