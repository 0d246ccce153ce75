"""Turning documents into stored span memory and back: input checks, the sink prefix, character offsets, ingest of
one document (:func:`ingest_document`) and loading a stored document for import (:func:`load_document_memory`).

Every document is read on its own by a fresh :class:`~ltri_rag.engine.LtriSession`: the sink prefix first (its own
``feed``, exactly ``num_sink_tokens`` tokens, so all of it becomes the sinks), then the document's tokens, then
``flush()`` moves the local windows into the span memory and ``export_memory()`` returns every document token's K/V,
the spans and their index vectors. Token ``i`` of the document is read at position ``num_sink_tokens + i``; the store
keeps document-local token offsets and :func:`load_document_memory` restores those positions, so importing a
document after the same sink prefix continues exactly as the session that read it.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ltri_rag.cache import MemoryExport
from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession
from ltri_rag.store import DocumentRecord, LayerRecord, SpanRecord, SpanStore, StoreError

__all__ = ["SINK_TEXT", "DocumentOffsets", "PreparedInput", "check_collection", "check_ids", "encode_document",
           "ingest_document", "load_document_memory", "prepare_input", "record_bytes", "sink_prefix_ids"]

SINK_TEXT = "The following text is stored in memory.\n"


# ------------------------------------------------------------------------------------------------ input checks
@dataclass(frozen=True)
class PreparedInput:
    """Checked arguments of ``add_documents``: ``texts``, ``ids`` and ``metadatas`` of equal length."""

    texts: list[str]
    ids: list[str]
    metadatas: list[dict[str, Any]]


def _check_text(i: int, text: Any) -> None:
    if not isinstance(text, str):
        raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__} {text!r:.60}")
    if not text.strip():
        raise ValueError(f"texts[{i}] is empty or only whitespace: {text!r:.60}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"texts[{i}] is not valid Unicode: code point {text[err.start]!r} at character {err.start} "
                         "(a lone surrogate; decode the bytes with errors='replace')") from None


def check_ids(ids: Any, what: str = "ids") -> list[str]:
    """Non-empty string ids without repeats (``TypeError`` / ``ValueError`` naming the bad one)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{what} must be a list of strings, got {type(ids).__name__} {ids!r:.60}")
    out = list(ids)
    for i, doc_id in enumerate(out):
        if not isinstance(doc_id, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(doc_id).__name__} {doc_id!r:.60}")
        if not doc_id.strip():
            raise ValueError(f"{what}[{i}] is empty: {doc_id!r}")
        try:
            doc_id.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what}[{i}] is not valid Unicode: {doc_id!r}") from None
    repeated = sorted(doc_id for doc_id, n in Counter(out).items() if n > 1)
    if repeated:
        raise ValueError(f"{what} repeat within one call: {repeated}")
    return out


def check_collection(collection: Any) -> str:
    """A collection name must be a non-empty string."""
    if not isinstance(collection, str) or not collection.strip():
        raise ValueError(f"collection must be a non-empty string, got {collection!r}")
    return collection


def _check_metadata(i: int, metadata: Any) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(key, str) for key in metadata):
        raise TypeError(f"metadatas[{i}] must be a dict with str keys, got {metadata!r:.80}")
    try:
        json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadatas[{i}] is not JSON-serialisable ({err}): {metadata!r:.80}") from None
    return dict(metadata)


def prepare_input(texts: Any, metadatas: Any = None, ids: Any = None) -> PreparedInput:
    """Check ``add_documents``' arguments; fills in random ids (``uuid4`` hex) when ``ids`` is None.

    Raises:
        TypeError: ``texts`` is a bare string or not a sequence; a text is not a str; an id is not a str; a metadata
            entry is not a dict with str keys.
        ValueError: ``texts`` is empty; a text is empty or holds a lone surrogate; ``ids`` / ``metadatas`` differ in
            length from ``texts``; ids repeat; metadata is not JSON-serialisable.
    """
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__} {texts!r:.60}")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty")
    for i, text in enumerate(texts):
        _check_text(i, text)
    if ids is None:
        ids = [uuid.uuid4().hex for _ in texts]
    ids = check_ids(ids)
    if len(ids) != len(texts):
        raise ValueError(f"ids has {len(ids)} entries, texts has {len(texts)}")
    if metadatas is None:
        metadatas = [None] * len(texts)
    if isinstance(metadatas, Mapping) or not isinstance(metadatas, Sequence):
        raise TypeError(f"metadatas must be a list of dicts (one per text), got {type(metadatas).__name__}")
    if len(metadatas) != len(texts):
        raise ValueError(f"metadatas has {len(metadatas)} entries, texts has {len(texts)}")
    return PreparedInput(texts=texts, ids=ids, metadatas=[_check_metadata(i, m) for i, m in enumerate(metadatas)])


# ------------------------------------------------------------------------------------------------ tokenization
def sink_prefix_ids(tokenizer: Any, num_sink_tokens: int) -> torch.Tensor:
    """``[num_sink_tokens]`` int64 ids every document and question is read after.

    The tokenizer's BOS token (if any), then :data:`SINK_TEXT` repeated, cut to exactly ``num_sink_tokens`` so that
    the whole prefix, and nothing of the document, becomes the engine's sink tokens.
    """
    ids: list[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if isinstance(bos, int):
        ids.append(bos)
    filler = list(tokenizer(SINK_TEXT, add_special_tokens=False)["input_ids"])
    if not filler:
        raise ValueError(f"the tokenizer encodes the sink text {SINK_TEXT!r} to no tokens")
    while len(ids) < num_sink_tokens:
        ids += filler
    return torch.tensor(ids[:num_sink_tokens], dtype=torch.int64)


class DocumentOffsets:
    """Character offset of each token boundary of an encoded text.

    ``boundary(i)`` is where token ``i`` starts in the text (``i = num_tokens`` gives ``len(text)``), non-decreasing
    in ``i``, so consecutive spans of tokens map to consecutive, gap-free character ranges. With a fast tokenizer the
    offsets come from its offset mapping; otherwise (``offsets=None``) from decoding token prefixes and matching them
    against the text (quadratic, so only the boundaries asked for are decoded).
    """

    def __init__(self, tokenizer: Any, text: str, ids: list[int], offsets: list[tuple[int, int]] | None) -> None:
        self.tokenizer, self.text, self.ids = tokenizer, text, ids
        self._cache: dict[int, int] = {0: 0, len(ids): len(text)}
        if offsets is not None:
            running = 0
            for i, (start, _) in enumerate(offsets):
                running = min(max(running, int(start)), len(text))
                if i:
                    self._cache[i] = running

    def _decoded(self, i: int) -> int:
        prefix = self.tokenizer.decode(self.ids[:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        limit = min(len(prefix), len(self.text))
        n = 0
        while n < limit and prefix[n] == self.text[n]:
            n += 1
        return n

    def boundaries(self, token_idx: torch.Tensor) -> torch.Tensor:
        """``[n]`` int64 character offsets of the token boundaries ``token_idx`` (``[n]``, values in [0, T])."""
        wanted = sorted({int(i) for i in token_idx.tolist()})
        missing = [i for i in wanted if i not in self._cache]
        for i in missing:
            self._cache[i] = self._decoded(i)
        if missing:  # keep the decoded boundaries non-decreasing
            running = 0
            for i in sorted(self._cache):
                running = self._cache[i] = min(max(running, self._cache[i]), len(self.text))
        return torch.tensor([self._cache[int(i)] for i in token_idx.tolist()], dtype=torch.int64)


def encode_document(tokenizer: Any, text: str) -> tuple[torch.Tensor, DocumentOffsets]:
    """``(ids [T] int64, offsets)`` of a document, without special tokens (the sink prefix carries the BOS)."""
    offsets = None
    if getattr(tokenizer, "is_fast", False):
        try:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            offsets = [tuple(o) for o in enc["offset_mapping"]]
            ids = list(enc["input_ids"])
        except (NotImplementedError, KeyError, TypeError, ValueError):
            offsets = None
    if offsets is None:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.int64), DocumentOffsets(tokenizer, text, ids, offsets)


# ------------------------------------------------------------------------------------------------ ingest / load
@torch.inference_mode()
def ingest_document(model: nn.Module, config: LtriConfig, sink_ids: torch.Tensor, ids: torch.Tensor,
                    offsets: DocumentOffsets, *, doc_id: str, collection: str,
                    metadata: Mapping[str, Any]) -> DocumentRecord:
    """Read one document after the sink prefix and return what the store keeps of it.

    Args:
        model: The causal LM.
        config: Engine configuration (a mode with span memory: ``ltri`` or ``infllm``).
        sink_ids: ``[num_sink_tokens]`` sink prefix ids.
        ids: ``[T]`` the document's token ids.
        offsets: Its character offsets (from :func:`encode_document`).

    Returns:
        A :class:`DocumentRecord`: per global layer the ``[T, Hkv, D]`` K/V, the spans' document-local token and
        character offsets, and the ``[N, Hkv, D]`` index vectors with their owning spans.
    """
    session = LtriSession(model, config)
    if sink_ids.numel():
        session.feed(sink_ids)
    first_slot = session.cache.memory_tokens()
    session.feed(ids)
    session.flush()
    memory = session.export_memory(first_slot)
    num_tokens = int(ids.numel())
    expected = torch.arange(sink_ids.numel(), sink_ids.numel() + num_tokens)
    if not torch.equal(memory.positions.cpu(), expected):  # the stored offsets rely on this
        raise RuntimeError(f"document {doc_id!r}: the span memory holds positions {memory.positions[:4].tolist()}..., "
                           f"expected {sink_ids.numel()}..{sink_ids.numel() + num_tokens - 1}")
    layers = []
    for layer, parts in sorted(memory.layers.items()):
        starts, ends = parts["starts"].cpu(), parts["ends"].cpu()
        layers.append(LayerRecord(layer=layer, keys=parts["keys"].cpu(), values=parts["values"].cpu(),
                                  token_starts=starts, token_ends=ends, char_starts=offsets.boundaries(starts),
                                  char_ends=offsets.boundaries(ends), vectors=parts["vectors"].cpu(),
                                  owner=parts["owner"].cpu()))
    return DocumentRecord(doc_id=doc_id, collection=collection, text=offsets.text, num_tokens=num_tokens,
                          layers=tuple(layers), metadata=dict(metadata))


def record_bytes(record: DocumentRecord) -> int:
    """Bytes of a record's tensors (to bound how many records are held before writing them)."""
    return sum(t.numel() * t.element_size() for rec in record.layers
               for t in (rec.keys, rec.values, rec.vectors))


def load_document_memory(store: SpanStore, doc_id: str, collection: str, layers: Sequence[int], num_sinks: int,
                         dtype: torch.dtype) -> tuple[MemoryExport, dict[int, tuple[SpanRecord, ...]]]:
    """A stored document as a :class:`MemoryExport` for :meth:`LtriSession.import_memory`, with its spans.

    Args:
        layers: The model's global layers (every one must be stored).
        num_sinks: Length of the sink prefix: the document's token ``i`` was read at position ``num_sinks + i``.
        dtype: The model's K/V dtype (index vectors are stored as float32).

    Returns:
        ``(memory, {layer: spans in span order})``.
    """
    for _ in range(3):  # a writer may replace the document between two layers' reads: read it again then
        loaded = [store.load_spans(doc_id, layer, collection=collection) for layer in layers]
        if len({spans.version for spans in loaded}) <= 1:
            break
    else:
        raise StoreError(f"document {doc_id!r} kept changing while it was read (a writer replacing it)")
    parts: dict[int, dict[str, torch.Tensor]] = {}
    records: dict[int, tuple[SpanRecord, ...]] = {}
    num_tokens = None
    for layer, spans in zip(layers, loaded):
        if num_tokens is None:
            num_tokens = int(spans.keys.shape[0])
        elif spans.keys.shape[0] != num_tokens:
            raise RuntimeError(f"document {doc_id!r}: layer {layer} holds {spans.keys.shape[0]} tokens, "
                               f"earlier layers {num_tokens}")
        records[layer] = spans.spans
        parts[layer] = {"starts": torch.tensor([s.token_start for s in spans.spans], dtype=torch.int64),
                        "ends": torch.tensor([s.token_end for s in spans.spans], dtype=torch.int64),
                        "vectors": spans.vectors.to(dtype), "owner": spans.owner.to(torch.int64),
                        "keys": spans.keys.to(dtype), "values": spans.values.to(dtype)}
    positions = torch.arange(num_sinks, num_sinks + (num_tokens or 0), dtype=torch.int64)
    return MemoryExport(positions=positions, layers=parts), records
