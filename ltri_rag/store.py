"""The span store protocol: what core code programs against to persist documents' spans, index vectors and K/V.

Core never imports ``ltri_rag.storage``; it builds :class:`DocumentRecord` objects and talks to any object that
satisfies :class:`SpanStore` (the SQL + FAISS + safetensors store in ``ltri_rag.storage``, or a test double).

Types only (plus their own consistency checks); no I/O here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import torch

JsonScalar = str | int | float | bool | None


# ----------------------------------------------------------------------------------------------------- errors
class StoreError(RuntimeError):
    """A store cannot be created, opened or used (missing, locked, corrupt beyond repair...)."""


class FingerprintMismatch(StoreError):
    """The store was written with a different model / tokenizer / config than the one opening it.

    Attributes:
        differences: ``{key: (stored, given)}`` for every differing key (a missing key reads as ``None``).
    """

    def __init__(self, differences: Mapping[str, tuple[Any, Any]]) -> None:
        self.differences = dict(differences)
        lines = [f"{key}: store has {old!r}, opening with {new!r}"
                 for key, (old, new) in sorted(self.differences.items())]
        super().__init__("store fingerprint mismatch (" + str(len(lines)) + " keys differ):\n  " + "\n  ".join(lines))


class DocumentNotFound(KeyError):
    """Some requested document ids are not in the store. Attributes: ``ids``, ``collection``."""

    def __init__(self, ids: Sequence[str], collection: str | None) -> None:
        self.ids = list(ids)
        self.collection = collection
        super().__init__(f"documents not found in collection {collection!r}: {self.ids!r}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# ------------------------------------------------------------------------------------------------ fingerprint
@dataclass(frozen=True, init=False)
class Fingerprint(Mapping[str, JsonScalar]):
    """A frozen mapping of everything that must match to reopen a store.

    Required keys (they shape the stored tensors): ``num_layers``, ``num_kv_heads``, ``head_dim`` (ints) and ``dtype``
    (the K/V dtype name, e.g. ``"bfloat16"``). Any further JSON scalars may be added: model config hash, weights
    sha256, tokenizer hash, the LtriConfig fields that shape spans and K/V...
    """

    _items: Mapping[str, JsonScalar]
    REQUIRED = ("num_layers", "num_kv_heads", "head_dim", "dtype")

    def __init__(self, items: Mapping[str, JsonScalar] | None = None, /, **kwargs: JsonScalar) -> None:
        merged = {**dict(items or {}), **kwargs}
        for key, value in merged.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"fingerprint keys must be non-empty strings, got {key!r}")
            if not isinstance(value, (str, int, float, bool)) and value is not None:
                raise TypeError(f"fingerprint value for {key!r} must be a JSON scalar, got {type(value).__name__}")
        missing = [key for key in self.REQUIRED if key not in merged]
        if missing:
            raise ValueError(f"fingerprint lacks required keys {missing}; has {sorted(merged)}")
        for key in ("num_layers", "num_kv_heads", "head_dim"):
            if not isinstance(merged[key], int) or isinstance(merged[key], bool) or merged[key] <= 0:
                raise ValueError(f"fingerprint {key} must be a positive int, got {merged[key]!r}")
        dtype_name = str(merged["dtype"])
        if not hasattr(torch, dtype_name) or not isinstance(getattr(torch, dtype_name), torch.dtype):
            raise ValueError(f"fingerprint dtype must name a torch dtype (e.g. 'bfloat16'), got {merged['dtype']!r}")
        object.__setattr__(self, "_items", MappingProxyType(dict(sorted(merged.items()))))

    def __getitem__(self, key: str) -> JsonScalar:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"Fingerprint({dict(self._items)!r})"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The K/V dtype as a ``torch.dtype``."""
        return getattr(torch, str(self["dtype"]))

    def diff(self, other: Mapping[str, JsonScalar]) -> dict[str, tuple[JsonScalar, JsonScalar]]:
        """``{key: (self's value, other's value)}`` for every key whose values differ (absent reads as ``None``)."""
        keys = sorted(set(self) | set(other))
        return {k: (self.get(k), other.get(k)) for k in keys if k not in self or k not in other or self[k] != other[k]}

    def to_json(self) -> str:
        return json.dumps(dict(self._items), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        return cls(json.loads(text))


# ---------------------------------------------------------------------------------------------- records in
def _check_1d_int(name: str, t: torch.Tensor, length: int | None) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a 1-D int64 tensor, got {got}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} has {t.numel()} entries, expected {length}")


@dataclass(frozen=True, kw_only=True)
class LayerRecord:
    """One global layer of one document: its tokens' K/V, its spans, and the spans' index vectors.

    Attributes:
        layer: Layer index in the model.
        keys: ``[num_tokens, num_kv_heads, head_dim]`` post-RoPE keys of the document's tokens.
        values: ``[num_tokens, num_kv_heads, head_dim]`` values, same dtype as ``keys``.
        token_starts: ``[num_spans]`` int64 document-local token offsets of each span's first token.
        token_ends: ``[num_spans]`` int64 exclusive token ends.
        char_starts: ``[num_spans]`` int64 offsets into the document text.
        char_ends: ``[num_spans]`` int64 exclusive character ends.
        vectors: ``[num_vectors, num_kv_heads, head_dim]`` floating index vectors (stored as float32).
        owner: ``[num_vectors]`` int64 span index (into this layer's spans) of each index vector.
    """

    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    token_starts: torch.Tensor
    token_ends: torch.Tensor
    char_starts: torch.Tensor
    char_ends: torch.Tensor
    vectors: torch.Tensor
    owner: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ValueError(f"layer must be a non-negative int, got {self.layer!r}")
        for name in ("keys", "values", "vectors"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"layer {self.layer} {name} must be a 3-D floating tensor, got {got}")
        if self.keys.shape != self.values.shape or self.keys.dtype != self.values.dtype:
            raise ValueError(f"layer {self.layer} keys {self.keys.dtype} {tuple(self.keys.shape)} and values "
                             f"{self.values.dtype} {tuple(self.values.shape)} differ")
        if self.vectors.shape[1:] != self.keys.shape[1:]:
            raise ValueError(f"layer {self.layer} vectors {tuple(self.vectors.shape)} do not match keys' heads x dim "
                             f"{tuple(self.keys.shape[1:])}")
        num_spans = self.token_starts.numel() if isinstance(self.token_starts, torch.Tensor) else None
        for name in ("token_starts", "token_ends", "char_starts", "char_ends"):
            _check_1d_int(f"layer {self.layer} {name}", getattr(self, name), num_spans)
        _check_1d_int(f"layer {self.layer} owner", self.owner, self.vectors.shape[0])
        if not bool(torch.isfinite(self.vectors).all()):
            raise ValueError(f"layer {self.layer} vectors contain NaN or inf")
        if self.owner.numel() and (int(self.owner.min()) < 0 or int(self.owner.max()) >= int(num_spans or 0)):
            raise ValueError(f"layer {self.layer} owner values must lie in [0, {num_spans}), got "
                             f"[{int(self.owner.min())}, {int(self.owner.max())}]")

    @property
    def num_spans(self) -> int:
        return int(self.token_starts.numel())


@dataclass(frozen=True, kw_only=True)
class DocumentRecord:
    """A document as the store receives it (the argument of :meth:`SpanStore.add`).

    Attributes:
        doc_id: Caller's id, unique within its collection (re-adding replaces).
        collection: Collection (namespace) name.
        text: The document text; span character offsets index into it.
        num_tokens: Number of the document's tokens (the first dim of every layer's K/V).
        layers: One :class:`LayerRecord` per stored layer (layers without spans, e.g. sliding-window ones, are absent).
        metadata: JSON-serialisable dict (filterable by equality in :meth:`SpanStore.search`).
    """

    doc_id: str
    collection: str = "default"
    text: str
    num_tokens: int
    layers: tuple[LayerRecord, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("doc_id", "collection"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.text, str) or not self.text:
            raise ValueError(f"document {self.doc_id!r}: text must be a non-empty str, got {type(self.text).__name__} "
                             f"{self.text!r:.40}")
        try:
            self.text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate, e.g. from bytes decoded with errors="surrogateescape"
            raise ValueError(f"document {self.doc_id!r}: text is not valid Unicode (code point "
                             f"{self.text[err.start]!r} at character {err.start}); decode the bytes with "
                             "errors='replace' first") from None
        if not isinstance(self.metadata, Mapping) or not all(isinstance(k, str) for k in self.metadata):
            raise TypeError(f"document {self.doc_id!r}: metadata must be a dict with str keys, "
                            f"got {self.metadata!r:.80}")
        try:
            json.dumps(dict(self.metadata), allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"document {self.doc_id!r}: metadata is not JSON-serialisable ({err})") from None
        if not isinstance(self.num_tokens, int) or self.num_tokens <= 0:
            raise ValueError(f"document {self.doc_id!r}: num_tokens must be a positive int, got {self.num_tokens!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        seen: set[int] = set()
        for rec in self.layers:
            if not isinstance(rec, LayerRecord):
                raise TypeError(f"document {self.doc_id!r}: layers must be LayerRecord, got {type(rec).__name__}")
            if rec.layer in seen:
                raise ValueError(f"document {self.doc_id!r}: layer {rec.layer} given twice")
            seen.add(rec.layer)
            self._check_layer(rec)

    def _check_layer(self, rec: LayerRecord) -> None:
        where = f"document {self.doc_id!r} layer {rec.layer}"
        if rec.keys.shape[0] != self.num_tokens:
            raise ValueError(f"{where}: keys cover {rec.keys.shape[0]} tokens, num_tokens is {self.num_tokens}")
        if rec.num_spans == 0:
            return
        ts, te, cs, ce = rec.token_starts, rec.token_ends, rec.char_starts, rec.char_ends
        bad = (ts < 0) | (te <= ts) | (te > self.num_tokens)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{where}: span {i} tokens [{int(ts[i])}, {int(te[i])}) outside [0, {self.num_tokens}) "
                             "or empty")
        bad = (cs < 0) | (ce < cs) | (ce > len(self.text))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{where}: span {i} chars [{int(cs[i])}, {int(ce[i])}) outside the text "
                             f"(length {len(self.text)})")


# --------------------------------------------------------------------------------------------- records out
@dataclass(frozen=True, kw_only=True)
class SpanRecord:
    """A stored span. Offsets are document-local; ``vector_start``/``vector_end`` index the layer's stored vectors."""

    layer: int
    span_idx: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    vector_start: int
    vector_end: int


@dataclass(frozen=True, kw_only=True)
class SpanHit:
    """One search result: a span, where it is, its text and its score (max inner product over its index vectors)."""

    doc_id: str
    collection: str
    layer: int
    span_idx: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int
    text: str
    score: float


@dataclass(frozen=True, kw_only=True)
class DocumentInfo:
    """A stored document without its tensors (what :meth:`SpanStore.get` returns)."""

    doc_id: str
    collection: str
    text: str
    metadata: Mapping[str, Any]
    num_tokens: int
    layers: tuple[int, ...]
    created: datetime


@dataclass(frozen=True, kw_only=True)
class LayerSpans:
    """One layer of one stored document, as :meth:`SpanStore.load_spans` returns it.

    Attributes:
        spans: The layer's spans in span order.
        keys: ``[num_tokens, num_kv_heads, head_dim]`` in the store dtype.
        values: ``[num_tokens, num_kv_heads, head_dim]``.
        vectors: ``[num_vectors, num_kv_heads, head_dim]`` float32, grouped by span (``spans[i].vector_start`` ...).
        owner: ``[num_vectors]`` int64 span index of each vector.
        version: What identifies the stored version of the document the layer was read from (a replace writes a
            new one), so that a reader can tell layers of two versions apart.
    """

    doc_id: str
    collection: str
    layer: int
    spans: tuple[SpanRecord, ...]
    keys: torch.Tensor
    values: torch.Tensor
    vectors: torch.Tensor
    owner: torch.Tensor
    version: str = ""


@dataclass(frozen=True, kw_only=True)
class StoreStats:
    """Sizes of a store. ``bytes_on_disk`` counts K/V files, indexes and the metadata database file if local."""

    documents: int
    spans: int
    vectors: int
    tokens: int
    bytes_on_disk: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_on_disk / self.tokens if self.tokens else math.nan


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """Disagreements between the metadata database, the FAISS indexes and the K/V files (all empty when clean).

    Attributes:
        missing_files: K/V file names a document row points to that do not exist.
        checksum_failures: K/V file names whose sha256 differs from the recorded one.
        shape_mismatches: ``"file: why"`` for files whose tensors disagree with the span rows.
        orphan_files: Files under the data folder no document references (leftovers of a crash or a delete).
        index_missing: ``{layer: count}`` of index vectors the span rows name that are absent from that layer's
            index.
        index_extra: ``{layer: count}`` of index ids that name no stored index vector.
        stale_layers: Layers whose index file disagrees with the span rows or cannot be read.
    """

    missing_files: tuple[str, ...] = ()
    checksum_failures: tuple[str, ...] = ()
    shape_mismatches: tuple[str, ...] = ()
    orphan_files: tuple[str, ...] = ()
    index_missing: Mapping[int, int] = field(default_factory=dict)
    index_extra: Mapping[int, int] = field(default_factory=dict)
    stale_layers: tuple[int, ...] = ()

    @property
    def clean(self) -> bool:
        return not any((self.missing_files, self.checksum_failures, self.shape_mismatches, self.orphan_files,
                        self.index_missing, self.index_extra, self.stale_layers))


# ------------------------------------------------------------------------------------------------ protocol
@runtime_checkable
class SpanStore(Protocol):
    """A persistent store of documents' spans, index vectors and K/V, searchable per layer."""

    fingerprint: Fingerprint

    @property
    def writable(self) -> bool:
        """Whether :meth:`add` / :meth:`delete` may write (not read-only, not closed)."""

    def add(self, documents: DocumentRecord | Sequence[DocumentRecord]) -> list[str]:
        """Add documents atomically (each fully present or absent); an existing (collection, id) is replaced."""

    def delete(self, ids: Sequence[str], *, collection: str = "default") -> None:
        """Delete documents; unknown ids raise :class:`DocumentNotFound` and nothing is deleted."""

    def get(self, ids: Sequence[str], *, collection: str = "default") -> list[DocumentInfo]: ...

    def list_documents(self, collection: str | None = None) -> list[tuple[str, str]]:
        """``(collection, doc_id)`` pairs, sorted."""

    def search(self, layer: int, query: torch.Tensor, k: int, *, collection: str | None = None,
               filter: Mapping[str, Any] | None = None) -> list[SpanHit]:
        """Best ``k`` spans of ``layer`` for ``query`` (``[num_kv_heads, head_dim]`` or flat), best first."""

    def load_spans(self, doc_id: str, layer: int, *, collection: str = "default") -> LayerSpans: ...

    def collections(self) -> list[str]: ...

    def stats(self) -> StoreStats: ...

    def verify(self) -> VerifyReport: ...

    def repair(self) -> VerifyReport:
        """Fix what can be fixed; returns what was found before fixing."""

    def close(self) -> None: ...
