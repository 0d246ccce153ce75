"""The span table of one sequence in one layer: spans over pool slots, their index vectors, persistence."""

from __future__ import annotations

import torch

from ltri_rag.kernels.scoring import SpanLayout, span_layout, span_scores
from ltri_rag.kernels.transfer import to_device

__all__ = ["SpanTable"]


class SpanTable:
    """Spans of one (layer, sequence), as ranges of pool slots, with their index vectors.

    Attributes:
        starts: ``[num_spans]`` int64 first slot of each span (CPU), increasing.
        ends: ``[num_spans]`` int64 end slot (exclusive).
        vectors: ``[num_vectors, num_kv_heads, head_dim]`` position-free index vectors (compute device).
        owner: ``[num_vectors]`` int64 span id of each vector (compute device).
        recency: ``[num_spans]`` float32 persistence state (compute device).

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
        self.recency = torch.zeros(0, dtype=torch.float32, device=device)
        self._layout: SpanLayout | None = None

    def __len__(self) -> int:
        return int(self.starts.numel())

    @property
    def lengths(self) -> torch.Tensor:
        return self.ends - self.starts

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

    def slots(self, selected: torch.Tensor) -> list[torch.Tensor]:
        """Slots of the selected spans in text order, per selection row.

        Args:
            selected: ``[rows, num_spans]`` bool.

        Returns:
            ``rows`` int64 tensors of slots (CPU).
        """
        out = []
        for row in selected.cpu():
            idx = torch.nonzero(row).flatten()
            if idx.numel() == 0:
                out.append(torch.zeros(0, dtype=torch.int64))
                continue
            starts, lengths = self.starts[idx], self.lengths[idx]
            first = torch.repeat_interleave(starts - torch.cumsum(lengths, 0) + lengths, lengths)
            out.append(first + torch.arange(int(lengths.sum())))
        return out
