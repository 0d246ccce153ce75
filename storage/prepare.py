"""Checking a :class:`~ltri_rag.store.DocumentRecord` against a store and laying it out for the file and the tables.

Everything here runs before the store is touched, so bad input leaves it unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ltri_rag.store import DocumentRecord, Fingerprint

from .schema import MAX_SPAN_VECTORS


@dataclass(frozen=True, kw_only=True)
class PreparedLayer:
    """One layer laid out for storage.

    Attributes:
        layer: Layer index.
        spans: ``[num_spans, 6]`` int64 rows ``(token_start, token_end, char_start, char_end, vector_start,
            vector_end)``; the vector range indexes ``vectors``.
        vectors: ``[num_vectors, num_kv_heads, head_dim]`` float32, grouped by span (stable order within a span).
        owner: ``[num_vectors]`` int64 span index of each vector (non-decreasing).
    """

    layer: int
    spans: np.ndarray
    vectors: torch.Tensor
    owner: torch.Tensor

    @property
    def flat_vectors(self) -> np.ndarray:
        """``[num_vectors, num_kv_heads * head_dim]`` float32 rows for FAISS."""
        return self.vectors.reshape(self.vectors.shape[0], -1).numpy()


@dataclass(frozen=True, kw_only=True)
class PreparedDocument:
    record: DocumentRecord
    layers: tuple[PreparedLayer, ...]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's tensors: ``layer{L}.k``, ``.v``, ``.vectors``, ``.owner`` per layer (CPU, contiguous)."""
        out: dict[str, torch.Tensor] = {}
        by_layer = {rec.layer: rec for rec in self.record.layers}
        for p in self.layers:
            rec = by_layer[p.layer]
            out[f"layer{p.layer}.k"] = rec.keys.detach().cpu().contiguous()
            out[f"layer{p.layer}.v"] = rec.values.detach().cpu().contiguous()
            out[f"layer{p.layer}.vectors"] = p.vectors
            out[f"layer{p.layer}.owner"] = p.owner
        return out


def prepare_document(doc: DocumentRecord, fingerprint: Fingerprint) -> PreparedDocument:
    """Check ``doc`` against the store's dims and dtype and lay it out.

    Raises:
        TypeError: ``doc`` is not a DocumentRecord, or its K/V dtype differs from the store's.
        ValueError: a layer is out of range, heads / head_dim differ from the store's, or a span has more than
            :data:`~ltri_rag.storage.schema.MAX_SPAN_VECTORS` index vectors.
    """
    if not isinstance(doc, DocumentRecord):
        raise TypeError(f"expected a DocumentRecord, got {type(doc).__name__}")
    heads, head_dim = int(fingerprint["num_kv_heads"]), int(fingerprint["head_dim"])  # type: ignore[arg-type]
    num_layers, dtype = int(fingerprint["num_layers"]), fingerprint.torch_dtype  # type: ignore[arg-type]
    layers = []
    for rec in sorted(doc.layers, key=lambda r: r.layer):
        where = f"document {doc.doc_id!r} layer {rec.layer}"
        if rec.layer >= num_layers:
            raise ValueError(f"{where}: layer out of range, the store has {num_layers} layers")
        if tuple(rec.keys.shape[1:]) != (heads, head_dim):
            raise ValueError(f"{where}: keys are [*, {rec.keys.shape[1]}, {rec.keys.shape[2]}], the store holds "
                             f"[*, num_kv_heads={heads}, head_dim={head_dim}]")
        if rec.keys.dtype != dtype:
            raise TypeError(f"{where}: K/V dtype {rec.keys.dtype}, the store holds {dtype}")
        owner = rec.owner.detach().cpu()
        order = torch.argsort(owner, stable=True)
        owner_sorted = owner[order].contiguous()
        vectors = rec.vectors.detach().cpu().to(torch.float32)[order].contiguous()  # [num_vectors, heads, head_dim]
        counts = torch.bincount(owner_sorted, minlength=rec.num_spans)
        if len(counts) and int(counts.max()) > MAX_SPAN_VECTORS:
            raise ValueError(f"{where}: span {int(counts.argmax())} has {int(counts.max())} index vectors, a span may "
                             f"hold at most {MAX_SPAN_VECTORS}")
        ends = torch.cumsum(counts, 0)
        starts = ends - counts
        spans = torch.stack([rec.token_starts.cpu(), rec.token_ends.cpu(), rec.char_starts.cpu(), rec.char_ends.cpu(),
                             starts, ends], dim=1).numpy().astype(np.int64).reshape(-1, 6)
        layers.append(PreparedLayer(layer=rec.layer, spans=spans, vectors=vectors, owner=owner_sorted))
    return PreparedDocument(record=doc, layers=tuple(layers))


def check_ids(ids: Sequence[str]) -> list[str]:
    """Validate a list of document ids: non-empty strings, no duplicates.

    Raises:
        TypeError: ``ids`` is a bare string or holds a non-string.
        ValueError: an id is empty, or ids repeat.
    """
    if isinstance(ids, str):
        raise TypeError(f"ids must be a sequence of strings, got the string {ids!r}")
    out = list(ids)
    for i in out:
        if not isinstance(i, str):
            raise TypeError(f"document ids must be strings, got {i!r} ({type(i).__name__})")
        if not i.strip():
            raise ValueError(f"document ids must be non-empty, got {i!r}")
    dups = sorted(i for i, n in Counter(out).items() if n > 1)
    if dups:
        raise ValueError(f"document ids repeat within one call: {dups}")
    return out
