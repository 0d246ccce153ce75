"""Persistent KV memory (installed as ``ltri_rag.storage``).

Empty in this release: the SQLite + FAISS span store is tracked as its own issue. The core engine keeps its span
memory in :class:`ltri_rag.pool.PagedKVPool`, whose page layout the store will persist.
"""
