"""The span store's reads (documents, spans, search, stats), a base of :class:`~.span_store.SqlSpanStore`.

They need only what the store holds once open: ``engine`` (SQLAlchemy), ``indexes`` (the per-layer FAISS
indexes), the ``kv_dir`` / ``faiss_dir`` folders and the local database file ``db_file`` (or None); a reader
process opened with ``read_only=True`` uses nothing else.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ltri_rag.store import (
    DocumentInfo,
    DocumentNotFound,
    LayerSpans,
    SpanHit,
    SpanRecord,
    StoreError,
    StoreStats,
)

from .faiss_index import LayerIndexes
from .kvfiles import read_layer, sha256_file
from .prepare import check_ids
from .queries import batches, collection_id, document_rows, search_rows, vector_counts
from .schema import CollectionRow, DocumentRow, SpanRow

_MISSING = object()


def _file_size(path: Path) -> int:
    """Bytes of a regular file; 0 for anything else, or for a file gone since its folder was listed (a writer renames
    its temporary files and removes replaced ones while a reader sums them)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return 0
    return info.st_size if stat.S_ISREG(info.st_mode) else 0


class SpanReads:
    """Read access to an open span store (see the module docstring for what it relies on)."""

    engine: Engine
    indexes: LayerIndexes | None
    kv_dir: Path
    faiss_dir: Path
    db_file: Path | None

    def get(self, ids: Sequence[str], *, collection: str = "default") -> list[DocumentInfo]:
        """The documents (text, metadata, layers; no tensors) in the order of ``ids``."""
        wanted = check_ids(ids)
        with Session(self.engine) as s:
            rows = document_rows(s, collection, wanted)
            missing = [i for i in wanted if i not in rows]
            if missing:
                raise DocumentNotFound(missing, collection)
            layers = dict.fromkeys((r.id for r in rows.values()), ())
            for batch in batches(list(layers)):
                for doc_pk, layer in s.execute(select(SpanRow.document_id, SpanRow.layer).distinct().where(
                        SpanRow.document_id.in_(batch))):
                    layers[doc_pk] = (*layers[doc_pk], layer)
            return [DocumentInfo(doc_id=r.doc_id, collection=collection, text=r.text, metadata=dict(r.meta),
                                 num_tokens=r.num_tokens, layers=tuple(sorted(layers[r.id])), created=r.created)
                    for r in (rows[i] for i in wanted)]

    def list_documents(self, collection: str | None = None) -> list[tuple[str, str]]:
        """``(collection, doc_id)`` pairs, sorted."""
        q = select(CollectionRow.name, DocumentRow.doc_id).join(CollectionRow)
        if collection is not None:
            q = q.where(CollectionRow.name == collection)
        with Session(self.engine) as s:
            return sorted((c, d) for c, d in s.execute(q))

    def collections(self) -> list[str]:
        """Names of collections holding at least one document."""
        with Session(self.engine) as s:
            return sorted(s.scalars(select(CollectionRow.name).join(DocumentRow).distinct()))

    def search(self, layer: int, query: torch.Tensor, k: int, *, collection: str | None = None,
               filter: Mapping[str, Any] | None = None) -> list[SpanHit]:
        """The ``k`` best spans of ``layer`` for ``query``, best first; one hit per span (max over its vectors).

        Args:
            query: ``[num_kv_heads, head_dim]`` or ``[num_kv_heads * head_dim]``; scored by inner product summed
                over heads.
            collection: Only this collection (``None``: all).
            filter: Metadata equality: every key must be present and equal.
        """
        assert self.indexes is not None
        dim = self.indexes.dim
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not isinstance(query, torch.Tensor) or query.numel() != dim or not query.is_floating_point():
            got = f"{query.dtype} {tuple(query.shape)}" if isinstance(query, torch.Tensor) else type(query).__name__
            raise ValueError(f"query must be a floating tensor of {dim} = num_kv_heads * head_dim values, got {got}")
        q = query.detach().cpu().to(torch.float32).reshape(-1).numpy()  # [num_kv_heads * head_dim]
        if not np.isfinite(q).all():
            raise ValueError("query contains NaN or inf")
        if filter is not None and not isinstance(filter, Mapping):
            raise TypeError(f"filter must be a dict of metadata values, got {type(filter).__name__}")
        with Session(self.engine) as s:
            coll = collection_id(s, collection) if collection is not None else None
            if collection is not None and coll is None:
                return []
            fetch, hits, seen, exhaustive = 4 * k + 16, [], set(), False
            while True:
                scores, ids = self.indexes.search(layer, q, fetch, exhaustive=exhaustive)
                rows = search_rows(s, ids.tolist(), coll)
                hits, seen = [], set()
                for vid, score in zip(ids.tolist(), scores.tolist()):
                    row = rows.get(vid)
                    if row is None or row.span_pk in seen:
                        continue
                    if filter and any(row.meta.get(key, _MISSING) != v for key, v in filter.items()):
                        continue
                    seen.add(row.span_pk)
                    hits.append(SpanHit(doc_id=row.doc_id, collection=row.collection, layer=layer,
                                        span_idx=row.span_idx, token_start=row.token_start, token_end=row.token_end,
                                        char_start=row.char_start, char_end=row.char_end, text=row.text or "",
                                        score=float(score)))
                    if len(hits) == k:
                        return hits
                if len(ids) < fetch:  # every probed list was read: the whole index, unless IVF probed a part
                    if exhaustive or not self.indexes.probes_part(layer):
                        return hits
                    exhaustive = True  # a small collection or a filter: search every list
                    continue
                fetch *= 4

    def load_spans(self, doc_id: str, layer: int, *, collection: str = "default",
                   verify_checksum: bool = False) -> LayerSpans:
        """A document's spans of ``layer`` with its K/V and vectors, read from the memory-mapped file.

        Raises:
            DocumentNotFound: no such document. ValueError: the document has no such layer.
            StoreError: ``verify_checksum`` and the file's sha256 differs from the recorded one.
        """
        with Session(self.engine) as s:
            row = document_rows(s, collection, check_ids([doc_id])).get(doc_id)
            if row is None:
                raise DocumentNotFound([doc_id], collection)
            spans = s.execute(select(SpanRow).where(SpanRow.document_id == row.id, SpanRow.layer == layer)
                              .order_by(SpanRow.span_idx)).scalars().all()
        path = self.kv_dir / row.kv_file
        try:
            if verify_checksum and sha256_file(path) != row.kv_sha256:
                raise StoreError(f"checksum mismatch for {path} (document {doc_id!r})")
            t = read_layer(path, layer)
        except FileNotFoundError:
            with Session(self.engine) as s:
                now = document_rows(s, collection, [doc_id]).get(doc_id)
            if now is None or now.kv_file != row.kv_file:  # deleted or replaced meanwhile by the writer
                raise DocumentNotFound([doc_id], collection) from None
            raise StoreError(f"K/V file {path} of document {doc_id!r} is missing (see verify() / repair())") from None
        except KeyError:
            raise ValueError(f"document {doc_id!r} has no layer {layer}") from None
        records = tuple(SpanRecord(layer=layer, span_idx=r.span_idx, token_start=r.token_start, token_end=r.token_end,
                                   char_start=r.char_start, char_end=r.char_end, vector_start=r.vector_start,
                                   vector_end=r.vector_end) for r in spans)
        return LayerSpans(doc_id=doc_id, collection=collection, layer=layer, spans=records, keys=t["k"],
                          values=t["v"], vectors=t["vectors"], owner=t["owner"], version=row.kv_file)

    def stats(self) -> StoreStats:
        with Session(self.engine) as s:
            docs, tokens = s.execute(select(func.count(DocumentRow.id), func.coalesce(func.sum(DocumentRow.num_tokens),
                                                                                       0))).one()
            spans = s.scalar(select(func.count(SpanRow.id))) or 0
            vectors = sum(vector_counts(s).values())
        files = [*self.kv_dir.iterdir(), *self.faiss_dir.iterdir()]
        if self.db_file is not None:
            files += [p for p in self.db_file.parent.glob(self.db_file.name + "*")]
        size = sum(_file_size(p) for p in files)
        return StoreStats(documents=docs, spans=spans, vectors=vectors, tokens=int(tokens), bytes_on_disk=size)
