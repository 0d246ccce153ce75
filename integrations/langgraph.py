"""A LangGraph ``BaseStore`` over a :class:`~ltri_rag.memory.KVMemory`: long-term memory for LangGraph agents whose
search by query is the model's own attention (in-model KV retrieval) instead of an embedding index.

::

    from ltri_rag.integrations.langgraph import LtriStore

    store = LtriStore(memory)                                        # namespaces -> KVMemory collections
    store.put(("memories", "user-1"), "gym", {"text": "My locker number is 7319.", "kind": "fact"})
    store.get(("memories", "user-1"), "gym").value                   # the dict as it was put
    hits = store.search(("memories",), query="What is my locker number?", limit=3)  # best first, .score, .spans
    graph = builder.compile(store=store)                             # nodes reach it as runtime.store

What is stored and indexed:

* A namespace ``("a", "b")`` is the KVMemory collection ``collection_prefix + "a.b"`` (LangGraph forbids ``.`` in
  labels, so the name is unambiguous); a key is a document id; the value dict is kept in the document's metadata
  (with the namespace, ``created_at`` and ``updated_at``) and returned unchanged.
* The document's *text*, read through the model once when the item is put, is the value's text content: with
  ``fields=None`` (the default) every string and number in the value, depth first in the value's order, one per line
  (keys and ``True`` / ``False`` / ``None`` are left out); with ``fields`` (the store's, or ``put(..., index=[...])``)
  the text at those LangGraph JSON paths (``"text"``, ``"notes[*].body"``, ...), one per line.
* An item put with ``index=False``, or whose value has no text, is stored (``get`` and ``search`` without a query
  return it) but never found by a query: its document text is its key, flagged out of query searches.
* ``search(prefix, query=...)`` imports the span memory of the indexed items under the prefix and lets the model read
  the query (:meth:`KVMemory.retrieve`); an item's score is the score retrieve gives its best recalled region (higher
  is better, from the layers' attention), and :attr:`LtriSearchItem.spans` lists its recalled regions
  (character offsets into its text, score, text). Without a query, items come newest ``updated_at`` first.
* ``filter`` follows LangGraph: equality on value fields (a nested dict matches the keys it names), or operators
  ``$eq $ne $gt $gte $lt $lte``. With a query the filter is applied to the recalled items (the items it excludes are
  still in the memory the model reads).
* No TTL (``supports_ttl = False``). Reads run in the caller's thread, one model call at a time;
  ``abatch`` runs ``batch`` in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
)
from langgraph.store.base.embed import get_text_at_path

from ltri_rag.memory import KVMemory
from ltri_rag.store import DocumentInfo, SpanHit

__all__ = ["LtriSearchItem", "LtriStore", "value_text"]

_OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")


def _leaves(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        if value.strip():
            yield value.strip()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield str(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)


def value_text(value: Mapping[str, Any], fields: Sequence[str] | None = None) -> str:
    """The text of a store value that the model reads: every string and number in it (``fields=None``), or the text
    at the LangGraph JSON paths ``fields``, one per line; ``""`` when there is none."""
    if fields is None:
        return "\n".join(_leaves(value))
    texts = [text.strip() for path in fields for text in get_text_at_path(dict(value), path)]
    return "\n".join(text for text in texts if text)


class LtriSearchItem(SearchItem):
    """A :class:`~langgraph.store.base.SearchItem` with the regions of the item's text the model recalled for the
    query (``spans``: dicts of ``start_char``, ``end_char``, ``score``, ``text``, best first; empty without a
    query)."""

    __slots__ = ("spans",)

    def __init__(self, *, spans: list[dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spans = list(spans or [])

    def dict(self) -> dict[str, Any]:
        return {**super().dict(), "spans": self.spans}


def _check_label(label: Any, where: tuple[Any, ...]) -> None:
    if not isinstance(label, str) or not label or "." in label or "\x00" in label:
        raise InvalidNamespaceError(f"namespace labels must be non-empty strings without '.' or NUL bytes, got "
                                    f"{label!r} in {where!r}")


def _check_namespace(namespace: Any, *, what: str = "namespace", allow_empty: bool = True) -> tuple[str, ...]:
    """``namespace`` as a tuple of valid labels (a list is accepted too)."""
    if not isinstance(namespace, (tuple, list)):
        raise InvalidNamespaceError(f"{what} must be a tuple of strings, got {type(namespace).__name__} "
                                    f"{namespace!r:.80}")
    namespace = tuple(namespace)
    if not namespace and not allow_empty:
        raise InvalidNamespaceError(f"{what} cannot be empty")
    for label in namespace:
        _check_label(label, namespace)
    return namespace


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"key must be a non-empty string, got {key!r}")
    return key


def _matches_value(actual: Any, wanted: Any) -> bool:
    """LangGraph's filter semantics for one field: operators, nested partial dicts, lists, plain equality."""
    if isinstance(wanted, Mapping) and wanted and all(isinstance(k, str) and k.startswith("$") for k in wanted):
        return all(_apply(actual, op, operand) for op, operand in wanted.items())
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(_matches_value(actual.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, (list, tuple)):
        return (isinstance(actual, (list, tuple)) and len(actual) == len(wanted)
                and all(_matches_value(a, w) for a, w in zip(actual, wanted)))
    return bool(actual == wanted)


def _apply(actual: Any, op: str, operand: Any) -> bool:
    if op not in _OPERATORS:
        raise ValueError(f"unsupported filter operator {op!r}; supported: {', '.join(_OPERATORS)}")
    if op == "$eq":
        return bool(actual == operand)
    if op == "$ne":
        return bool(actual != operand)
    try:
        a, b = float(actual), float(operand)
    except (TypeError, ValueError):
        return False  # a missing or non-numeric value never compares
    return {"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[op]


def _matches_condition(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = tuple(condition.path)
    if len(namespace) < len(path):
        return False
    if condition.match_type == "prefix":
        part = namespace[:len(path)]
    elif condition.match_type == "suffix":
        part = namespace[len(namespace) - len(path):]
    else:
        raise ValueError(f"match_type must be 'prefix' or 'suffix', got {condition.match_type!r}")
    return all(p == "*" or p == n for p, n in zip(path, part))


class LtriStore(BaseStore):
    """LangGraph's key-value store with search by in-model retrieval, kept in a :class:`KVMemory` (see the module
    docstring for what is stored and indexed).

    Args:
        memory: The KV memory (it may hold other collections too; the store touches only its own).
        fields: LangGraph JSON paths of the value text to index (``None``: every string and number).
        collection_prefix: Prefix of the store's collection names.
        max_memory_tokens: Cap on the item tokens a query search imports (``None``: the memory's); past it, the
            items the memory's FAISS stage ranks first.

    Raises:
        TypeError / ValueError: a bad argument, naming it.
    """

    supports_ttl = False

    def __init__(self, memory: KVMemory, *, fields: Sequence[str] | None = None, collection_prefix: str = "store:",
                 max_memory_tokens: int | None = None) -> None:
        if not isinstance(memory, KVMemory):
            raise TypeError(f"memory must be a KVMemory, got {type(memory).__name__}")
        if fields is not None and (isinstance(fields, str) or not all(isinstance(f, str) and f for f in fields)):
            raise TypeError(f"fields must be a list of JSON paths (non-empty strings) or None, got {fields!r}")
        if not isinstance(collection_prefix, str) or not collection_prefix or "." in collection_prefix:
            raise ValueError(f"collection_prefix must be a non-empty string without '.', got {collection_prefix!r}")
        if max_memory_tokens is not None and (not isinstance(max_memory_tokens, int)
                                              or isinstance(max_memory_tokens, bool) or max_memory_tokens < 1):
            raise ValueError(f"max_memory_tokens must be a positive int or None, got {max_memory_tokens!r}")
        self.memory, self.collection_prefix, self.max_memory_tokens = memory, collection_prefix, max_memory_tokens
        self.fields = list(fields) if fields is not None else None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------- names
    def collection(self, namespace: tuple[str, ...]) -> str:
        """The KVMemory collection holding ``namespace`` (e.g. for ``ChatLtri(memory=..., collection=...)``)."""
        return self.collection_prefix + ".".join(_check_namespace(namespace, allow_empty=False))

    def _namespace(self, collection: str) -> tuple[str, ...] | None:
        if not collection.startswith(self.collection_prefix) or collection == self.collection_prefix:
            return None
        return tuple(collection[len(self.collection_prefix):].split("."))

    def namespaces(self) -> list[tuple[str, ...]]:
        """Every namespace holding items, sorted."""
        found = (self._namespace(c) for c in self.memory.collections())
        return sorted(ns for ns in found if ns is not None)

    # ------------------------------------------------------------------------------------------- batch
    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops`` in order (a run of consecutive puts is written together; the last put of a key wins).

        Raises:
            InvalidNamespaceError / TypeError / ValueError: a bad op (nothing of the batch runs then).
            NotImplementedError: a put with a TTL.
        """
        ops = list(ops)
        for i, op in enumerate(ops):
            self._check_op(i, op)
        results: list[Result] = [None] * len(ops)
        with self._lock:
            i = 0
            while i < len(ops):
                op = ops[i]
                if isinstance(op, PutOp):
                    j = i
                    while j < len(ops) and isinstance(ops[j], PutOp):
                        j += 1
                    self._put([o for o in ops[i:j] if isinstance(o, PutOp)])
                    i = j
                    continue
                if isinstance(op, GetOp):
                    results[i] = self._get(op)
                elif isinstance(op, SearchOp):
                    results[i] = self._search(op)
                elif isinstance(op, ListNamespacesOp):
                    results[i] = self._list_namespaces(op)
                i += 1
        return results

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """:meth:`batch` in a worker thread (``asyncio.to_thread``)."""
        return await asyncio.to_thread(self.batch, list(ops))

    def _check_op(self, i: int, op: Any) -> None:
        if isinstance(op, GetOp):
            _check_namespace(op.namespace, what=f"ops[{i}].namespace")
            _check_key(op.key)
        elif isinstance(op, PutOp):
            _check_namespace(op.namespace, what=f"ops[{i}].namespace", allow_empty=False)
            _check_key(op.key)
            if op.value is not None and not isinstance(op.value, Mapping):
                raise TypeError(f"ops[{i}]: the value of key {op.key!r} must be a dict or None, got "
                                f"{type(op.value).__name__}")
            if op.value is not None:
                try:
                    json.dumps(dict(op.value), allow_nan=False)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"ops[{i}]: the value of key {op.key!r} is not JSON-serialisable "
                                     f"({err})") from None
            if op.index is not None and op.index is not False and (
                    isinstance(op.index, str) or not all(isinstance(f, str) and f for f in op.index)):
                raise TypeError(f"ops[{i}]: index must be False, None or a list of JSON paths, got {op.index!r}")
            if op.ttl is not None:
                raise NotImplementedError(f"ops[{i}]: LtriStore does not support TTL, got ttl={op.ttl!r}")
        elif isinstance(op, SearchOp):
            _check_namespace(op.namespace_prefix, what=f"ops[{i}].namespace_prefix")
            for name in ("limit", "offset"):
                value = getattr(op, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"ops[{i}]: {name} must be a non-negative int, got {value!r}")
            if op.query is not None and not isinstance(op.query, str):
                raise TypeError(f"ops[{i}]: query must be a string or None, got {type(op.query).__name__}")
            if op.filter is not None and not isinstance(op.filter, Mapping):
                raise TypeError(f"ops[{i}]: filter must be a dict or None, got {type(op.filter).__name__}")
        elif isinstance(op, ListNamespacesOp):
            for condition in op.match_conditions or ():
                if condition.match_type not in ("prefix", "suffix"):
                    raise ValueError(f"ops[{i}]: match_type must be 'prefix' or 'suffix', got "
                                     f"{condition.match_type!r}")
                for label in condition.path:
                    if label != "*":
                        _check_label(label, tuple(condition.path))
            if op.max_depth is not None and (not isinstance(op.max_depth, int) or op.max_depth < 1):
                raise ValueError(f"ops[{i}]: max_depth must be a positive int or None, got {op.max_depth!r}")
        else:
            raise TypeError(f"ops[{i}] is not a LangGraph store op (GetOp, PutOp, SearchOp, ListNamespacesOp), got "
                            f"{type(op).__name__}")

    # ------------------------------------------------------------------------------------------- operations
    def _stored(self, namespace: tuple[str, ...], keys: Sequence[str]) -> dict[str, DocumentInfo]:
        """The stored documents of these keys in ``namespace`` (missing keys left out)."""
        if not namespace:
            return {}
        collection = self.collection(namespace)
        present = {doc_id for _, doc_id in self.memory.list_documents(collection)}
        wanted = [k for k in dict.fromkeys(keys) if k in present]
        return {info.doc_id: info for info in self.memory.get(wanted, collection=collection)} if wanted else {}

    @staticmethod
    def _item(info: DocumentInfo, cls: type[Item] = Item, **extra: Any) -> Any:
        meta = info.metadata
        return cls(namespace=tuple(meta["namespace"]), key=meta["key"], value=dict(meta["value"]),
                   created_at=datetime.fromisoformat(meta["created_at"]),
                   updated_at=datetime.fromisoformat(meta["updated_at"]), **extra)

    def _get(self, op: GetOp) -> Item | None:
        info = self._stored(tuple(op.namespace), [op.key]).get(op.key)
        return self._item(info) if info is not None else None

    def _put(self, puts: list[PutOp]) -> None:
        last: dict[tuple[tuple[str, ...], str], PutOp] = {}
        for op in puts:
            last.pop((tuple(op.namespace), op.key), None)  # keep the order of the last puts
            last[(tuple(op.namespace), op.key)] = op
        by_namespace: dict[tuple[str, ...], list[PutOp]] = {}
        for (namespace, _), op in last.items():
            by_namespace.setdefault(namespace, []).append(op)
        for namespace, ops in by_namespace.items():
            collection = self.collection(namespace)
            stored = self._stored(namespace, [op.key for op in ops])
            gone = [op.key for op in ops if op.value is None and op.key in stored]
            if gone:
                self.memory.delete(gone, collection=collection)
            now = datetime.now(timezone.utc).isoformat()
            texts, metas, ids = [], [], []
            for op in ops:
                if op.value is None:
                    continue
                value = dict(op.value)
                text = "" if op.index is False else value_text(value, self.fields if op.index is None else op.index)
                created = stored[op.key].metadata["created_at"] if op.key in stored else now
                meta: dict[str, Any] = {"store": self.collection_prefix, "namespace": list(namespace), "key": op.key,
                                        "value": value, "indexed": bool(text), "created_at": created,
                                        "updated_at": now}
                meta.update({f"ns{d}": label for d, label in enumerate(namespace)})
                texts.append(text or op.key)
                metas.append(meta)
                ids.append(op.key)
            if ids:
                self.memory.add_documents(texts, metas, ids, collection=collection, progress=False)

    def _items_under(self, prefix: tuple[str, ...]) -> list[DocumentInfo]:
        """The stored documents of every namespace that starts with ``prefix``."""
        infos: list[DocumentInfo] = []
        for namespace in self.namespaces():
            if namespace[:len(prefix)] != prefix:
                continue
            collection = self.collection(namespace)
            ids = [doc_id for _, doc_id in self.memory.list_documents(collection)]
            if ids:
                infos += self.memory.get(ids, collection=collection)
        return infos

    def _search(self, op: SearchOp) -> list[SearchItem]:
        prefix = tuple(op.namespace_prefix)
        infos = self._items_under(prefix)
        wanted = dict(op.filter or {})
        allowed = {(i.collection, i.doc_id): i for i in infos
                   if all(_matches_value(i.metadata["value"].get(k), v) for k, v in wanted.items())}
        if not op.query:
            ordered = sorted(allowed.values(), key=lambda i: (i.metadata["updated_at"], i.collection, i.doc_id),
                             reverse=True)
            return [self._item(i, LtriSearchItem) for i in ordered[op.offset:op.offset + op.limit]]
        if not op.query.strip():
            raise ValueError(f"query must be None or a non-empty string, got {op.query!r}")
        indexed = [i for i in infos if i.metadata.get("indexed")]
        if not indexed or not any((i.collection, i.doc_id) in allowed for i in indexed) or op.limit == 0:
            return []
        meta_filter: dict[str, Any] = {"store": self.collection_prefix, "indexed": True}
        meta_filter.update({f"ns{d}": label for d, label in enumerate(prefix)})
        k = max(1, sum(i.num_tokens for i in indexed))  # every region: the ranking is cut after filtering
        hits = self.memory.retrieve(op.query, k, filter=meta_filter, max_memory_tokens=self.max_memory_tokens)
        regions: dict[tuple[str, str], list[SpanHit]] = {}
        for hit in hits:  # best first
            if (hit.collection, hit.doc_id) in allowed:
                regions.setdefault((hit.collection, hit.doc_id), []).append(hit)
        ranked = list(regions.items())[op.offset:op.offset + op.limit]
        return [self._item(allowed[key], LtriSearchItem, score=spans[0].score,
                           spans=[{"start_char": h.char_start, "end_char": h.char_end, "score": h.score,
                                   "text": h.text} for h in spans])
                for key, spans in ranked]

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        found = [ns for ns in self.namespaces()
                 if all(_matches_condition(c, ns) for c in op.match_conditions or ())]
        if op.max_depth is not None:
            found = sorted({ns[:op.max_depth] for ns in found})
        return found[op.offset:op.offset + op.limit]
