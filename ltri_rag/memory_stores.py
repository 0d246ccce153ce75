"""Finding a span store by name without importing it: the ``ltri_rag.stores`` entry point group.

Core code never imports the storage package (imports go kernels <- core <- storage <- integrations). The SQL store
registers itself in ``pyproject.toml``::

    [project.entry-points."ltri_rag.stores"]
    sql = "ltri_rag.storage:SqlSpanStore"

so ``KVMemory.create(path, model, tokenizer, store="sql")`` loads it through :mod:`importlib.metadata`; another
package can register its own store the same way, and tests can pass a factory class directly.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any, Protocol

from ltri_rag.store import SpanStore

__all__ = ["STORE_GROUP", "StoreFactory", "resolve_store"]

STORE_GROUP = "ltri_rag.stores"


class StoreFactory(Protocol):
    """What creates and opens a :class:`SpanStore` (e.g. ``ltri_rag.storage.SqlSpanStore``)."""

    def create(self, path_or_url: Any, fingerprint: Any, **kwargs: Any) -> SpanStore: ...

    def open(self, path_or_url: Any, fingerprint: Any, **kwargs: Any) -> SpanStore: ...


def resolve_store(store: str | StoreFactory) -> StoreFactory:
    """A store factory: ``store`` itself, or the one registered under that name in the ``ltri_rag.stores`` entry
    point group.

    Raises:
        ValueError: no store is registered under that name (the message lists those that are).
        TypeError: ``store`` is neither a name nor something with ``create`` / ``open``.
    """
    if isinstance(store, str):
        found = {ep.name: ep for ep in entry_points(group=STORE_GROUP)}
        if store not in found:
            raise ValueError(f"no span store named {store!r} in the {STORE_GROUP!r} entry points (found "
                             f"{sorted(found)}); install the package (pip install -e .) to register 'sql', or pass "
                             "the factory itself, e.g. store=ltri_rag.storage.SqlSpanStore")
        return found[store].load()
    if callable(getattr(store, "create", None)) and callable(getattr(store, "open", None)):
        return store
    raise TypeError(f"store must be an entry point name or a factory with create() / open(), got {store!r}")
