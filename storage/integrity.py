"""Checking the database, the FAISS indexes and the K/V files against each other, and repairing what a crash leaves.

What a crash between the ordered writes can leave, and the fix:

- a temp file, or a K/V file no document row references (crash before / after the file, before the commit; an old
  file of a replaced or deleted document) -> removed;
- index ids no span row names, or vectors of span rows missing from an index (crash after the commit, before the
  index files were written) -> ids removed / vectors re-added from the K/V files; an unreadable index is rebuilt from
  the files.

Missing or corrupt K/V files cannot be fixed; ``repair(drop_broken=True)`` deletes their documents.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from ltri_rag.store import VerifyReport

from .kvfiles import is_temp, layer_shapes, read_layer, sha256_file
from .queries import layer_vector_ids, vector_counts, vector_locations
from .schema import CollectionRow, DocumentRow, StoreMeta

if TYPE_CHECKING:
    from .span_store import SqlSpanStore


def _index_ids(store: SqlSpanStore, layer: int) -> np.ndarray | None:
    """The layer's index ids, or ``None`` when its file cannot be read."""
    assert store.indexes is not None
    try:
        return store.indexes.ids(layer)
    except RuntimeError:  # FAISS raises RuntimeError on a corrupt / truncated file
        return None


def _shape_problems(store: SqlSpanStore, s: Session, rows: Mapping[str, DocumentRow]) -> list[str]:
    counts: dict[int, dict[int, int]] = {}
    for (doc_pk, layer), n in vector_counts(s, by_document=True).items():
        counts.setdefault(doc_pk, {})[layer] = n
    problems = []
    for name, row in rows.items():
        shapes = layer_shapes(store.kv_dir / name)
        for layer, n in counts.get(row.id, {}).items():
            got = shapes.get(f"layer{layer}.vectors", (None,))[0]
            if got != n:
                problems.append(f"{name}: layer {layer} has {got} vectors in the file, its span rows {n}")
            if shapes.get(f"layer{layer}.k", (None,))[0] != row.num_tokens:
                problems.append(f"{name}: layer {layer} keys do not cover {row.num_tokens} tokens")
    return problems


def verify(store: SqlSpanStore, *, deep: bool = True) -> VerifyReport:
    """Report disagreements; ``deep`` adds checksums and file-vs-row shape checks (reads every file)."""
    with Session(store.engine) as s:
        rows = {r.kv_file: r for r in s.scalars(select(DocumentRow))}
        sql_ids = layer_vector_ids(s)
        on_disk = {p.name for p in store.kv_dir.iterdir()}
        missing = sorted(set(rows) - on_disk)
        present = {name: row for name, row in rows.items() if name in on_disk}
        bad_sums = sorted(n for n, r in present.items() if sha256_file(store.kv_dir / n) != r.kv_sha256) if deep else []
        shapes = _shape_problems(store, s, {n: r for n, r in present.items() if n not in bad_sums}) if deep else []
    orphans = sorted(on_disk - set(rows)) + sorted(f"faiss/{p.name}" for p in store.faiss_dir.iterdir()
                                                   if is_temp(p.name))
    assert store.indexes is not None
    index_missing, index_extra, stale = {}, {}, []
    for layer in sorted(set(sql_ids) | set(store.indexes.layers_on_disk())):
        store.indexes.forget(layer)  # read what is on disk, not this process's copy
        got = _index_ids(store, layer)
        if got is None:
            stale.append(layer)
            continue
        want = sql_ids.get(layer, np.zeros(0, np.int64))
        n_missing = len(np.setdiff1d(want, got))
        n_extra = len(np.setdiff1d(got, want))
        if n_missing:
            index_missing[layer] = n_missing
        if n_extra:
            index_extra[layer] = n_extra
        if n_missing or n_extra:
            stale.append(layer)
    return VerifyReport(missing_files=tuple(missing), checksum_failures=tuple(bad_sums),
                        shape_mismatches=tuple(shapes), orphan_files=tuple(orphans), index_missing=index_missing,
                        index_extra=index_extra, stale_layers=tuple(stale))


def _add_from_files(store: SqlSpanStore, s: Session, layer: int, vector_ids: np.ndarray) -> None:
    """Re-add vectors to a layer's index, reading them from their documents' K/V files (missing files skipped)."""
    assert store.indexes is not None
    for kv_file, pairs in vector_locations(s, layer, vector_ids.tolist()).items():
        path = store.kv_dir / kv_file
        if not path.exists():
            continue
        vectors = read_layer(path, layer)["vectors"]  # [num_vectors, num_kv_heads, head_dim]
        ids = np.asarray([v for v, _ in pairs], dtype=np.int64)
        rows = np.asarray([r for _, r in pairs], dtype=np.int64)
        store.indexes.add(layer, ids, vectors.reshape(vectors.shape[0], -1).numpy()[rows])


def closed_cleanly(store: SqlSpanStore) -> bool:
    """Whether the store is as its last writer left it after a clean close, by cheap checks only: the index files
    reflect the last committed change (``index_generation == data_generation``), the K/V folder holds exactly the
    files the document rows name, no temp file is left in the FAISS folder, and every layer's index holds as many
    vectors as the layer's span rows name (summed in SQL, not listed).

    A crash between the ordered writes always fails one of these (an uncommitted K/V file, a commit whose index
    files were not written, a temp file), so a writer's open runs the full :func:`repair` only then, instead of
    listing and comparing every vector id at every open (tens of seconds at 1M tokens). :func:`verify` still compares
    everything.
    """
    assert store.indexes is not None
    with Session(store.engine) as s:
        meta = s.get(StoreMeta, 1)
        if meta is None or meta.index_generation != meta.data_generation:
            return False
        named = set(s.scalars(select(DocumentRow.kv_file)))
        counts = vector_counts(s)
    if {p.name for p in store.kv_dir.iterdir()} != named:
        return False
    if any(is_temp(p.name) for p in store.faiss_dir.iterdir()):
        return False
    for layer in sorted(set(counts) | set(store.indexes.layers_on_disk())):
        try:
            if store.indexes.get(layer).ntotal != counts.get(layer, 0):
                return False
        except RuntimeError:  # FAISS raises RuntimeError on a corrupt / truncated file
            return False
    return True


def repair(store: SqlSpanStore, *, deep: bool = True, drop_broken: bool = False) -> VerifyReport:
    """Fix what :func:`verify` finds (see the module docstring); returns the report from before."""
    report = verify(store, deep=deep)
    for name in report.orphan_files:
        path = store.faiss_dir / name[len("faiss/"):] if name.startswith("faiss/") else store.kv_dir / name
        Path(path).unlink(missing_ok=True)
    if drop_broken and (report.missing_files or report.checksum_failures):
        _drop_documents(store, set(report.missing_files) | set(report.checksum_failures))
    assert store.indexes is not None
    fixed: list[int] = []
    with Session(store.engine) as s:
        sql_ids = layer_vector_ids(s)
        for layer in sorted(set(sql_ids) | set(store.indexes.layers_on_disk())):
            want = sql_ids.get(layer, np.zeros(0, np.int64))
            got = _index_ids(store, layer)
            if got is None:
                store.indexes.reset(layer)
                got = np.zeros(0, np.int64)
            extra, missing = np.setdiff1d(got, want), np.setdiff1d(want, got)
            if len(extra) or len(missing) or layer in report.stale_layers:
                store.indexes.remove(layer, extra)
                _add_from_files(store, s, layer, missing)
                fixed.append(layer)
    store.indexes.persist(fixed)
    with Session(store.engine) as s, s.begin():
        meta = s.get(StoreMeta, 1)
        assert meta is not None
        meta.index_generation = meta.data_generation
    return report


def _drop_documents(store: SqlSpanStore, kv_files: set[str]) -> None:
    with Session(store.engine) as s:
        pairs = s.execute(select(CollectionRow.name, DocumentRow.doc_id).join(CollectionRow)
                          .where(DocumentRow.kv_file.in_(sorted(kv_files)))).all()
    by_collection: dict[str, list[str]] = {}
    for coll, doc_id in pairs:
        by_collection.setdefault(coll, []).append(doc_id)
    for coll, ids in by_collection.items():
        store.delete(ids, collection=coll)
