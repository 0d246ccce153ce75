"""The span table of one sequence in one layer: spans over pool slots, their index vectors, persistence."""

from __future__ import annotations

import torch

from ltri_rag.kernels.scoring import SpanLayout, span_layout, span_scores
from ltri_rag.kernels.transfer import extend_mirror, to_device

__all__ = ["SpanTable"]


class SpanTable:
    """Spans of one (layer, sequence), as ranges of pool slots, with their index vectors.

    Attributes:
        starts: ``[num_spans]`` int64 first slot of each span (CPU), increasing.
        ends: ``[num_spans]`` int64 end slot (exclusive).
        vectors: ``[num_vectors, num_kv_heads, head_dim]`` position-free index vectors (compute device).
        owner: ``[num_vectors]`` int64 span id of each vector (compute device).
        recency: ``[num_spans]`` float32 persistence state, where selection runs (the host, or the compute device
            when the engine selects there: see :meth:`recency_on`).

    The dense per-span layout of the vectors that scoring reads (:func:`~ltri_rag.kernels.scoring.span_layout`) is
    kept with the table and extended as spans arrive, so scoring a chunk or a decoded token neither rebuilds it nor
    waits for the device. Building or extending it reads a host copy of ``owner``, so that does not wait either.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.starts = torch.zeros(0, dtype=torch.int64)
        self.ends = torch.zeros(0, dtype=torch.int64)
        self.vectors = torch.zeros(0, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.owner = torch.zeros(0, dtype=torch.int64, device=device)
        self._owner_host = torch.zeros(0, dtype=torch.int64)  # the same, on the host (layout arithmetic)
        self.recency = torch.zeros(0, dtype=torch.float32)
        self._layout: SpanLayout | None = None
        # span id of each slot (-1: a slot no span covers), on the host, grown by doubling and filled only when
        # asked for (selection on the device): entries up to ``_slot_end`` cover the first ``_slot_mapped`` spans.
        # A device copy is kept, of which the first ``_slot_synced`` entries are current.
        self._slot_span = torch.zeros(0, dtype=torch.int64)
        self._slot_end = 0
        self._slot_mapped = 0
        self._slot_device: torch.Tensor | None = None
        self._slot_synced = 0
        # device copies of the span geometry (selection on the device), dropped when spans are appended
        self._geometry: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.starts.numel())

    @property
    def lengths(self) -> torch.Tensor:
        return self.ends - self.starts

    @property
    def num_tokens(self) -> int:
        """Tokens in all spans."""
        return int(self.lengths.sum())

    def append(self, starts: torch.Tensor, ends: torch.Tensor, vectors: torch.Tensor, owner: torch.Tensor) -> None:
        """Add spans (slot ranges) with vectors whose ``owner`` counts from 0 within the new spans.

        ``starts``, ``ends`` and ``owner`` are best passed on the host (the engine does): a device copy would be read
        back, synchronising the device.
        """
        offset = len(self)
        owner = owner.to("cpu", torch.int64)
        self._extend_layout(vectors, owner, int(starts.numel()))
        self.starts = torch.cat([self.starts, starts.cpu()])
        self.ends = torch.cat([self.ends, ends.cpu()])
        self.vectors = torch.cat([self.vectors, vectors.to(self.vectors.device, self.vectors.dtype)])
        self._owner_host = torch.cat([self._owner_host, owner + offset])
        self.owner = torch.cat([self.owner, to_device(owner + offset, self.owner.device)])
        self.recency = torch.cat([self.recency, torch.zeros(starts.numel(), device=self.recency.device)])
        self._geometry = None

    def _map_slots(self) -> None:
        """Record the spans appended since the last call in the slot -> span map."""
        offset = self._slot_mapped
        starts, ends = self.starts[offset:], self.ends[offset:]
        if starts.numel() == 0:
            return
        lengths = ends - starts
        total = int(lengths.sum())
        end = int(ends.max())
        if self._slot_span.numel() < end:
            grown = torch.full((max(end, 2 * self._slot_span.numel(), 64),), -1, dtype=torch.int64)
            grown[: self._slot_end] = self._slot_span[: self._slot_end]
            self._slot_span = grown
        ids = torch.repeat_interleave(torch.arange(offset, offset + starts.numel()), lengths, output_size=total)
        first = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths, output_size=total)
        self._slot_span[first + torch.arange(total)] = ids
        self._slot_end = max(self._slot_end, end)
        self._slot_mapped = len(self)
        self._slot_synced = min(self._slot_synced, int(starts.min()))  # the device copy is stale from here on

    def slot_spans(self, device: torch.device) -> torch.Tensor:
        """``[num_slots]`` int64 span id of each slot up to the last span's end (-1 where no span is), on
        ``device``; on a GPU the copy is extended asynchronously with only the entries that changed."""
        self._map_slots()
        if device.type == "cpu":
            return self._slot_span[: self._slot_end]
        self._slot_device = extend_mirror(self._slot_span, self._slot_end, self._slot_device, self._slot_synced,
                                          device)
        self._slot_synced = self._slot_end
        return self._slot_device

    def geometry_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The span lengths and their partition bounds on ``device``, copied once per set of spans (what selecting
        on the device reads, so that a step there copies nothing from the host: a CUDA graph can capture it).

        Returns:
            ``lengths`` ``[S]`` int64 and ``bounds`` ``[2, S]`` int64: row 0 the running sum of the lengths (each
            span's end when the spans are laid end to end from slot 0, as :class:`~ltri_rag.consensus.LayerConsensus`
            counts them), row 1 that minus the lengths (each span's start).
        """
        device = torch.device(device)
        cached = self._geometry
        if cached is None or cached[0] != device:
            lengths = self.lengths
            ends = torch.cumsum(lengths, 0)
            cached = self._geometry = (device, to_device(lengths, device),
                                       to_device(torch.stack([ends, ends - lengths]), device))
        return cached[1], cached[2]

    def recency_on(self, device: torch.device) -> torch.Tensor:
        """The persistence state, moved to ``device`` (where selection runs) and kept there."""
        if self.recency.device != device:
            self.recency = to_device(self.recency, device)
        return self.recency

    def _extend_layout(self, vectors: torch.Tensor, owner: torch.Tensor, num_new: int) -> None:
        """Append the new spans' rows to the kept layout (rebuilt lazily when a new span is wider than the rest);
        ``owner``: ``[num_new_vectors]`` host int64, counting from 0 within the new spans."""
        if self._layout is None or num_new == 0:
            return
        padded, valid, width = self._layout
        vectors = vectors.to(padded.device, padded.dtype)
        new_padded, new_valid, new_width = span_layout(vectors, owner, num_new, dtype=padded.dtype, min_width=width)
        if new_width != width:
            self._layout = None
            return
        self._layout = (torch.cat([padded, new_padded]), torch.cat([valid, new_valid]), width)

    def layout(self) -> SpanLayout:
        """The vectors laid out densely per span, in the vectors' dtype (built on first use, then kept)."""
        if self._layout is None:
            self._layout = span_layout(self.vectors, self._owner_host, len(self), dtype=self.vectors.dtype)
        return self._layout

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """``[num_heads, num_spans]`` scores of a position-free query summary ``[num_heads, head_dim]``."""
        return span_scores(query, self.vectors, self.owner, len(self), layout=self.layout())

    def slot_matrix_fixed(self, selected: torch.Tensor, num_kv_heads: int, width: int) -> torch.Tensor:
        """:meth:`slot_matrix` at a fixed ``width``, on ``selected``'s device and without reading anything back.

        Args:
            selected: ``[rows, num_spans]`` bool, ``rows`` 1 or ``num_kv_heads``; no row may select more than
                ``width`` tokens (tokens past it are dropped).
            num_kv_heads: Rows of the result.
            width: Columns of the result.

        Returns:
            ``[num_kv_heads, width]`` int64 on ``selected``'s device: each row's selected slots in text order, then
            -1. Equal to :meth:`slot_matrix` padded with -1 to ``width``.
        """
        rows = selected.shape[0]
        if rows not in (1, num_kv_heads):
            raise ValueError(f"selected has {rows} rows, expected 1 or {num_kv_heads}")
        device = selected.device
        span_of = self.slot_spans(device)  # [T]
        tokens = selected[:, span_of.clamp(min=0)] & (span_of >= 0)  # [rows, T] slots of selected spans
        column = torch.cumsum(tokens, dim=1) - 1  # where each selected slot goes
        column = torch.where(tokens & (column < width), column, width)  # the rest to a spare column
        out = torch.full((rows, width + 1), -1, dtype=torch.int64, device=device)
        out.scatter_(1, column, torch.arange(span_of.numel(), device=device).expand(rows, -1))
        out = out[:, :width]
        return out.expand(num_kv_heads, -1) if rows == 1 else out

    def slot_matrix(self, selected: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """Slots of the selected spans in text order, one row per KV head, padded with -1.

        Args:
            selected: ``[rows, num_spans]`` bool (host; a device tensor is read back), ``rows`` 1 (one selection
                for every head) or ``num_kv_heads``.
            num_kv_heads: Rows of the result.

        Returns:
            ``[num_kv_heads, width]`` int64 (host), ``width`` the most tokens any row selected.
        """
        selected = selected.cpu()
        rows = selected.shape[0]
        if rows not in (1, num_kv_heads):
            raise ValueError(f"selected has {rows} rows, expected 1 or {num_kv_heads}")
        row, span = torch.nonzero(selected, as_tuple=True)  # row-major: text order within each row
        if row.numel() == 0:
            return torch.full((num_kv_heads, 0), -1, dtype=torch.int64)
        lengths = self.lengths[span]
        total = int(lengths.sum())
        per_row = torch.zeros(rows, dtype=torch.int64).index_add_(0, row, lengths)
        before = torch.cumsum(lengths, 0) - lengths  # tokens of earlier (row, span) pairs
        row_first = torch.cumsum(per_row, 0) - per_row  # first token of each row among them
        token = torch.arange(total)
        slot = torch.repeat_interleave(self.starts[span] - before, lengths, output_size=total) + token
        column = token - torch.repeat_interleave(row_first[row], lengths, output_size=total)
        out = torch.full((rows, int(per_row.max())), -1, dtype=torch.int64)
        out[torch.repeat_interleave(row, lengths, output_size=total), column] = slot
        return out.expand(num_kv_heads, -1) if rows == 1 else out
