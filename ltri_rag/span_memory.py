"""The span table of one sequence in one layer: spans over pool slots, their index vectors, persistence."""

from __future__ import annotations

import torch

from ltri_rag.growing import GrowingRows
from ltri_rag.kernels.scoring import SpanLayout, dequantize_rows, span_layout, span_scores
from ltri_rag.kernels.transfer import to_device
from ltri_rag.kernels.triton_slots import place_slots
from ltri_rag.kernels.triton_slots import triton_available as _slots_kernel_available

__all__ = ["SpanTable"]

FUSED_SLOTS = True
"""Whether :meth:`SpanTable.slot_matrix_fixed` on CUDA places the slots in one Triton launch after the running sum
(:func:`ltri_rag.kernels.triton_slots.place_slots`, the same matrix) instead of a binary search and some ten torch
operations; False keeps the torch path (for comparisons)."""


class SpanTable:
    """Spans of one (layer, sequence), as ranges of pool slots, with their index vectors.

    Attributes:
        starts: ``[num_spans]`` int64 first slot of each span (CPU), increasing.
        ends: ``[num_spans]`` int64 end slot (exclusive).
        recency: ``[num_spans]`` float32 persistence state, where selection runs (the host, or the compute device
            when the engine selects there: see :meth:`recency_on`).
        num_kv_heads, head_dim, dtype, device: The index vectors' heads, size, dtype and device (the compute
            device).
        quantized: Whether the layout keeps the vectors as int8 codes with a float32 scale per (vector, KV head)
            (``LtriConfig.index_precision="int8"``): half the bytes that scoring reads; :attr:`vectors` gives
            them back dequantized, in ``dtype``.

    The index vectors are kept once, in the dense per-span layout that scoring reads
    (:func:`~ltri_rag.kernels.scoring.span_layout`: :meth:`layout`), extended in place as spans arrive (buffers
    with spare capacity, :class:`~ltri_rag.growing.GrowingRows`; widened when a span brings more vectors than any
    before), so scoring a chunk or a decoded token neither rebuilds it nor waits
    for the device. Extending it reads a host copy of the vectors' owners, so that does not wait either. The
    vectors in their compact form (:attr:`vectors`, :attr:`owner`) are made from the layout when asked for (export,
    tests): at 1M tokens of an 8B model a second, compact copy on the GPU was 8 GiB.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 quantized: bool = False) -> None:
        self.num_kv_heads, self.head_dim, self.dtype, self.quantized = num_kv_heads, head_dim, dtype, quantized
        self.device = torch.device(device)
        # rows appended in place with spare capacity (ltri_rag.growing): a prompt's appends copy O(n) bytes
        self._starts_rows = GrowingRows(torch.zeros(0, dtype=torch.int64))
        self._ends_rows = GrowingRows(torch.zeros(0, dtype=torch.int64))
        self._owner_rows = GrowingRows(torch.zeros(0, dtype=torch.int64))  # span of each vector, host, sorted
        self.recency = torch.zeros(0, dtype=torch.float32)
        self._num_tokens = 0
        self._padded_rows = GrowingRows(
            torch.zeros(0, num_kv_heads, head_dim, dtype=torch.int8 if quantized else dtype, device=self.device))
        self._valid_rows = GrowingRows(torch.zeros(0, dtype=torch.bool, device=self.device))
        self._scale_rows = GrowingRows(torch.zeros(0, num_kv_heads, dtype=torch.float32, device=self.device)) \
            if quantized else None
        self._layout = SpanLayout(self._padded_rows.rows, self._valid_rows.rows, 1,
                                  None if self._scale_rows is None else self._scale_rows.rows)
        # device copies of the span geometry (selection on the device), dropped when spans are appended
        self._geometry: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None
        self._starts: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._starts_rows)

    @property
    def starts(self) -> torch.Tensor:
        """``[num_spans]`` int64 first slot of each span (host), increasing."""
        return self._starts_rows.rows

    @starts.setter
    def starts(self, value: torch.Tensor) -> None:
        self._starts_rows.reset(value.to("cpu", torch.int64))
        self._geometry = self._starts = None

    @property
    def ends(self) -> torch.Tensor:
        """``[num_spans]`` int64 end slot of each span (exclusive, host)."""
        return self._ends_rows.rows

    @ends.setter
    def ends(self, value: torch.Tensor) -> None:
        self._ends_rows.reset(value.to("cpu", torch.int64))
        self._geometry = None

    @property
    def _owner_host(self) -> torch.Tensor:
        """``[num_vectors]`` int64 span of each vector (host), increasing."""
        return self._owner_rows.rows

    @property
    def lengths(self) -> torch.Tensor:
        return self.ends - self.starts

    @property
    def num_tokens(self) -> int:
        """Tokens in all spans (kept as spans arrive: no pass over the spans)."""
        return self._num_tokens

    @property
    def num_vectors(self) -> int:
        """Index vectors of all spans."""
        return int(self._owner_host.numel())

    @property
    def vectors(self) -> torch.Tensor:
        """``[num_vectors, num_kv_heads, head_dim]`` the index vectors grouped by span (each span's in the order it
        brought them), made from the layout (a copy; on a GPU it waits for the device)."""
        return self.vectors_from(0)

    @property
    def owner(self) -> torch.Tensor:
        """``[num_vectors]`` int64 span of each of :attr:`vectors` (increasing), on the compute device."""
        return to_device(self._owner_host, self.device)

    def vectors_from(self, first_span: int) -> torch.Tensor:
        """The vectors of spans ``first_span`` onwards (:attr:`vectors`' tail), made from that part of the layout
        only (exporting a document's spans copies that document's vectors, not the whole table's)."""
        padded, valid, width, scale = self._layout
        keep = valid[first_span * width:]
        if scale is None:
            return padded[first_span * width:][keep]
        return dequantize_rows(padded[first_span * width:][keep], scale[first_span * width:][keep], self.dtype)

    def owner_from(self, first_span: int) -> torch.Tensor:
        """``[n]`` host int64 owners of :meth:`vectors_from`, counting from ``first_span`` as 0."""
        first_vector = int(torch.searchsorted(self._owner_host, first_span))
        return self._owner_host[first_vector:] - first_span

    def append(self, starts: torch.Tensor, ends: torch.Tensor, vectors: torch.Tensor, owner: torch.Tensor) -> None:
        """Add spans (slot ranges) with vectors whose ``owner`` counts from 0 within the new spans.

        ``starts``, ``ends`` and ``owner`` are best passed on the host (the engine does): a device copy would be read
        back, synchronising the device. Vectors may come in any order of their owners; each span keeps its own in
        the order given.
        """
        offset = len(self)
        owner = owner.to("cpu", torch.int64)
        starts, ends = starts.cpu(), ends.cpu()
        num_new = int(starts.numel())
        if owner.numel() and (int(owner.min()) < 0 or int(owner.max()) >= num_new):
            raise ValueError(f"owner must lie in [0, {num_new}) for {num_new} new spans, got "
                             f"[{int(owner.min())}, {int(owner.max())}]")
        self._extend_layout(vectors, owner, num_new)
        self._starts_rows.append(starts)
        self._ends_rows.append(ends)
        self._num_tokens += int((ends - starts).sum())
        self._owner_rows.append(torch.sort(owner, stable=True).values + offset)
        self.recency = torch.cat([self.recency, torch.zeros(num_new, device=self.recency.device)])
        self._geometry = self._starts = None

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

    def starts_on(self, device: torch.device) -> torch.Tensor:
        """``[S]`` int64 first slot of each span on ``device``, copied once per set of spans (with
        :meth:`geometry_on`)."""
        device = torch.device(device)
        cached = self._starts
        if cached is None or cached.device != device:
            cached = self._starts = to_device(self.starts, device)
        return cached

    def recency_on(self, device: torch.device) -> torch.Tensor:
        """The persistence state, moved to ``device`` (where selection runs) and kept there."""
        if self.recency.device != device:
            self.recency = to_device(self.recency, device)
        return self.recency

    def _extend_layout(self, vectors: torch.Tensor, owner: torch.Tensor, num_new: int) -> None:
        """Append the new spans' rows to the layout, widening it first when a new span has more vectors than its
        width; ``owner``: ``[num_new_vectors]`` host int64, counting from 0 within the new spans."""
        padded, valid, width, scale = self._layout
        vectors = vectors.to(self.device, self.dtype)
        new = span_layout(vectors, owner, num_new, dtype=self.dtype, min_width=width, quantize=self.quantized)
        parts = [(self._padded_rows, padded, new.padded), (self._valid_rows, valid, new.valid)]
        if self._scale_rows is not None:
            parts.append((self._scale_rows, scale, new.scale))
        if new.width != width:  # each span's rows move to the start of a wider group (the rest padding)
            num_spans = len(self)

            def widen(rows: torch.Tensor) -> torch.Tensor:
                wide = rows.new_zeros(num_spans, new.width, *rows.shape[1:])
                wide[:, :width] = rows.view(num_spans, width, *rows.shape[1:])
                return wide.view(num_spans * new.width, *rows.shape[1:])

            for store, kept, _ in parts:
                store.reset(widen(kept))
        for store, _, rows in parts:
            store.append(rows)
        self._layout = SpanLayout(self._padded_rows.rows, self._valid_rows.rows, new.width,
                                  None if self._scale_rows is None else self._scale_rows.rows)

    def layout(self) -> SpanLayout:
        """The vectors laid out densely per span (``[num_spans * width, num_kv_heads, head_dim]`` padded rows, their
        ``[num_spans * width]`` validity, ``width``, and with :attr:`quantized` their scales), in the vectors' dtype
        (int8 codes when quantized) on the compute device."""
        return self._layout

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """``[num_heads, num_spans]`` scores of a position-free query summary ``[num_heads, head_dim]``."""
        return span_scores(query, None, None, len(self), layout=self._layout)

    def slot_matrix_fixed(self, selected: torch.Tensor, num_kv_heads: int, width: int) -> torch.Tensor:
        """:meth:`slot_matrix` at a fixed ``width``, on ``selected``'s device and without reading anything back.

        Made from the selected spans alone: each row's running sum of selected span lengths places every span's
        tokens at output columns, and each column finds its span by a binary search of those sums, so the work is
        ``O(S + width log S)`` per row, not proportional to the tokens in memory (at 1M tokens ~30x more than spans).
        On CUDA (``FUSED_SLOTS``) the spans write their slots at those columns in one launch instead.

        Args:
            selected: ``[rows, num_spans]`` bool, ``rows`` 1 or ``num_kv_heads``; no row may select more than
                ``width`` tokens (tokens past it are dropped).
            num_kv_heads: Rows of the result.
            width: Columns of the result.

        Returns:
            ``[num_kv_heads, width]`` int64 on ``selected``'s device: each row's selected slots in span order (text
            order), then -1. Equal to :meth:`slot_matrix` padded with -1 to ``width``.
        """
        rows, num_spans = selected.shape
        if rows not in (1, num_kv_heads):
            raise ValueError(f"selected has {rows} rows, expected 1 or {num_kv_heads}")
        device = selected.device
        if num_spans == 0 or width == 0:
            return torch.full((num_kv_heads, width), -1, dtype=torch.int64, device=device)
        lengths, _ = self.geometry_on(device)
        starts = self.starts_on(device)
        taken = torch.where(selected, lengths, 0)  # [rows, S] tokens each span gives
        ends = torch.cumsum(taken, dim=1)  # [rows, S] output column past each span's last token
        if FUSED_SLOTS and selected.is_cuda and _slots_kernel_available():  # the rest in one launch
            out = place_slots(taken, ends, starts, width)
            return out.expand(num_kv_heads, -1) if rows == 1 else out
        column = torch.arange(width, device=device).expand(rows, -1)  # [rows, width]
        span = torch.searchsorted(ends, column.contiguous(), right=True).clamp_(max=num_spans - 1)  # [rows, width]
        first = ends.gather(1, span) - taken.gather(1, span)  # output column of the span's first token
        out = torch.where(column < ends[:, -1:], starts[span] + (column - first), -1)
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
