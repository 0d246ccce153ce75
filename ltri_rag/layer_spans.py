"""The span tables of one global layer: creating them, forgetting persistence, and moving a sequence's spans out
of one cache and into another (a document's memory read elsewhere). A base of
:class:`~ltri_rag.layer.GlobalLayerState`, which sets the attributes these methods read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ltri_rag.kernels.transfer import to_device
from ltri_rag.span_memory import SpanTable

if TYPE_CHECKING:
    from ltri_rag.config import LtriConfig
    from ltri_rag.pool import PagedKVPool

__all__ = ["SpanExchange"]


class SpanExchange:
    """Span-table management of one global layer (a base of :class:`~ltri_rag.layer.GlobalLayerState`)."""

    layer_idx: int
    cfg: LtriConfig
    batch_size: int
    pool: PagedKVPool | None
    sink_k: torch.Tensor | None
    tables: list[SpanTable]

    def _ensure_tables(self, keys: torch.Tensor) -> None:
        """Create the per-sequence span tables on first use (``keys``: ``[..., num_kv_heads, tokens, head_dim]``
        K of this layer on the compute device)."""
        if not self.tables:
            quantized = self.cfg.index_precision == "int8"
            self.tables = [SpanTable(keys.shape[-3], keys.shape[-1], keys.dtype, keys.device, quantized=quantized)
                           for _ in range(self.batch_size)]

    def reset_recency(self) -> None:
        """Forget the persistence state (after a flush: what the text before recalled says nothing about what
        comes next)."""
        for table in self.tables:
            table.recency = torch.zeros_like(table.recency)

    def export_spans(self, seq: int, first_slot: int) -> dict[str, torch.Tensor]:
        """Spans of ``seq`` from slot ``first_slot`` on, with their index vectors and K/V (slots relative to
        ``first_slot``): ``starts, ends [S]``, ``vectors [N, Hkv, D]``, ``owner [N]``, ``keys, values [T, Hkv, D]``."""
        table = self.tables[seq]
        keep = table.starts >= first_slot
        if keep.any() and int(table.starts[keep][0]) != first_slot:
            raise ValueError(f"slot {first_slot} is inside a span of layer {self.layer_idx}")
        first_span = int((~keep).sum())
        total = self.pool.num_slots[seq] - first_slot
        slots = torch.arange(first_slot, first_slot + total)[None, :].expand(table.num_kv_heads, -1)
        keys, values = self.pool.gather(self.layer_idx, seq, slots, table.device)  # [Hkv, T, D]
        return {"starts": table.starts[keep] - first_slot, "ends": table.ends[keep] - first_slot,
                "vectors": table.vectors_from(first_span),
                "owner": to_device(table.owner_from(first_span), table.device),
                "keys": keys.transpose(0, 1), "values": values.transpose(0, 1)}

    def import_spans(self, seq: int, first_slot: int, starts: torch.Tensor, ends: torch.Tensor,
                     vectors: torch.Tensor, owner: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store spans read elsewhere (``export_spans``' layout) at slots from ``first_slot`` on (reserved)."""
        self._ensure_tables(self.sink_k if self.sink_k is not None else keys.transpose(0, 1))
        self.pool.write(self.layer_idx, seq, first_slot, keys, values)
        self.tables[seq].append(starts + first_slot, ends + first_slot, vectors, owner)
