"""Persistent span store (installed as ``ltri_rag.storage``): SQLAlchemy metadata, FAISS per layer, safetensors K/V.

Implements the core's :class:`ltri_rag.store.SpanStore` protocol::

    from ltri_rag.storage import SqlSpanStore
    store = SqlSpanStore.create("./mem", fingerprint)          # or a SQLAlchemy URL with data_dir=...
    store.add(document_record)
    hits = store.search(layer, query, k=8, collection="essays", filter={"lang": "en"})
"""

from ltri_rag.store import (
                            DocumentInfo,
                            DocumentNotFound,
                            DocumentRecord,
                            Fingerprint,
                            FingerprintMismatch,
                            LayerRecord,
                            LayerSpans,
                            SpanHit,
                            SpanRecord,
                            SpanStore,
                            StoreError,
                            StoreStats,
                            VerifyReport,
)

from .span_store import SqlSpanStore

__all__ = [
    "DocumentInfo",
    "DocumentNotFound",
    "DocumentRecord",
    "Fingerprint",
    "FingerprintMismatch",
    "LayerRecord",
    "LayerSpans",
    "SpanHit",
    "SpanRecord",
    "SpanStore",
    "SqlSpanStore",
    "StoreError",
    "StoreStats",
    "VerifyReport",
]
