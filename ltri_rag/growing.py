"""Row buffers appended to in place, with spare capacity (:class:`GrowingRows`).

A span table gains a few dozen spans per layer with every prompt chunk. Concatenating each time copies everything
kept so far, so a prompt's appends cost O(n^2) bytes: at 1M tokens of an 8B model a layer's index-vector layout is
~270 MB, copied 32 times per chunk (4.4 ms of an H200's time per chunk at the end of a 1M prompt, session 30). Here
the rows go into a buffer that grows by a factor when full, so the bytes copied stay a constant multiple of the
rows kept.
"""

from __future__ import annotations

import torch

__all__ = ["GROWTH", "SPARE_APPENDS", "GrowingRows"]

GROWTH = 1.125
"""Default capacity factor of :class:`GrowingRows`: a full buffer is replaced by one at least this many times its
size. 1.125 keeps the spare rows under an eighth of those kept (at 1M tokens of an 8B model at most ~1 GiB of index
vectors over all layers) and copies each row about nine times over a prompt. None: exact sizes (every append copies
all rows, as ``torch.cat`` did; kept for comparisons)."""

SPARE_APPENDS = 8
"""A growth also leaves room for at least this many more appends of the size of the one that filled the buffer. The
factor alone grows a young table at almost every append (a prompt chunk adds about as many spans as the table
holds after its first chunks), and each growth is an allocation and a copy the host issues per layer (~0.4 ms of
host time each in a 32K prefill's profile, session 31). The spare room is a few appends' rows: ~10 MB per layer's
index vectors for an 8B model."""


class GrowingRows:
    """Rows ``[n, *row_shape]`` of one dtype on one device, appended in place.

    :attr:`rows` is a view of the rows appended so far. A view taken earlier stays valid and unchanged by later
    appends: they write past its end, or into a new buffer once the old one is full.

    Args:
        empty: A tensor with no rows whose row shape, dtype and device the rows take.
        growth: Capacity factor (> 1), or None for exact sizes; default :data:`GROWTH` (read at every growth).
    """

    def __init__(self, empty: torch.Tensor, growth: float | None | str = "default") -> None:
        if empty.shape[0] != 0:
            raise ValueError(f"empty must have no rows, got shape {tuple(empty.shape)}")
        if growth not in ("default", None) and not (isinstance(growth, (int, float)) and growth > 1):
            raise ValueError(f"growth must be a number > 1 or None, got {growth!r}")
        self._growth = growth
        self._buffer = empty
        self._used = 0

    def __len__(self) -> int:
        return self._used

    @property
    def rows(self) -> torch.Tensor:
        """``[n, *row_shape]``: the rows appended so far (a view of the buffer)."""
        return self._buffer[: self._used]

    @property
    def capacity(self) -> int:
        """Rows the current buffer holds before the next growth."""
        return int(self._buffer.shape[0])

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Append ``new`` (``[m, *row_shape]``, converted to the rows' dtype and device); returns :attr:`rows`."""
        if tuple(new.shape[1:]) != tuple(self._buffer.shape[1:]):
            raise ValueError(f"rows of shape {tuple(new.shape[1:])} cannot join rows of shape "
                             f"{tuple(self._buffer.shape[1:])}")
        total = self._used + int(new.shape[0])
        if total > self.capacity:
            self._grow(total, int(new.shape[0]))
        self._buffer[self._used:total].copy_(new)
        self._used = total
        return self.rows

    def reset(self, rows: torch.Tensor) -> torch.Tensor:
        """Replace every row by ``rows`` (any row shape: e.g. a layout made wider), in a new buffer with spare
        capacity; returns :attr:`rows`."""
        self._buffer = rows[:0]
        self._used = 0
        return self.append(rows)

    def _grow(self, total: int, appended: int) -> None:
        growth = GROWTH if self._growth == "default" else self._growth
        capacity = total if growth is None else max(total + SPARE_APPENDS * appended, int(self.capacity * growth) + 1)
        with torch.inference_mode(False):  # a plain tensor: appended to in and out of inference mode
            buffer = torch.empty((capacity, *self._buffer.shape[1:]), dtype=self._buffer.dtype,
                                 device=self._buffer.device)
        buffer[: self._used].copy_(self._buffer[: self._used])
        self._buffer = buffer
