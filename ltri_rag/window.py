"""The local window's tensors kept in place: a view over a larger allocation that grows at its end.

A layer's window K / V (``[B, Hkv, w, D]``), its keys' attention mass (``[B, Hkv, w]``) and band (``[B, w, band]``)
grow by a chunk (or one decoded token) per pass and lose their oldest tokens at each eviction. Concatenating a new
tensor every pass copies the whole window each time, and moves it, so nothing that holds its address (a captured
CUDA graph) can keep using it. :class:`WindowBuffer` writes new entries after the current ones in an allocation
with spare room (grown by a quarter when full), and an eviction moves the survivors to the front of the same
allocation: the window starts at the same address from one pass to the next while the allocation stays.
"""

from __future__ import annotations

import torch

__all__ = ["WindowBuffer"]

_MIN_SPARE = 64  # entries of spare room at least, when the allocation (re)grows


class WindowBuffer:
    """A tensor growing along ``dim``: ``view`` is the first ``length`` entries of ``storage``.

    Args:
        dim: The growing dimension (2 for ``[B, H, w, D]`` / ``[B, H, w]``, 1 for ``[B, w, band]``).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.storage: torch.Tensor | None = None
        self.length = 0

    @property
    def view(self) -> torch.Tensor | None:
        """The current entries (a view of ``storage``), or None before the first append."""
        if self.storage is None:
            return None
        return self.storage.narrow(self.dim, 0, self.length)

    @property
    def capacity(self) -> int:
        return 0 if self.storage is None else self.storage.shape[self.dim]

    def _reserve(self, like: torch.Tensor, total: int) -> None:
        """Room for ``total`` entries of ``like``'s other dims, dtype and device, keeping the current ones."""
        if self.storage is not None and total <= self.capacity:
            return
        capacity = total + max(_MIN_SPARE, total // 4)
        shape = list(like.shape)
        shape[self.dim] = capacity
        storage = like.new_empty(shape)
        if self.storage is not None and self.length:
            storage.narrow(self.dim, 0, self.length).copy_(self.view)
        self.storage = storage

    def reserve(self, total: int) -> None:
        """Room for ``total`` entries (after the first append; a no-op when there is room already). A captured
        decode step needs the room for a whole eviction cycle before it is captured: the allocation must not move
        while the graph replays."""
        if self.storage is None:
            raise ValueError("reserve before the first append: the entries' shape is not known yet")
        if not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be an int >= 0, got {total!r}")
        self._reserve(self.storage, total)

    def stage_at(self, new: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Write ``new`` (one entry along ``dim``) at entry ``index`` (a one-element int64 tensor on ``storage``'s
        device, normally holding ``length``: where :meth:`stage` would write) and return the whole allocation. The
        write position comes from device memory, so a captured CUDA graph can replay it at any length; the caller
        passes the length to whatever reads the allocation (a kernel's ``win_len``)."""
        if self.storage is None:
            raise ValueError("stage_at before the first append: there is no allocation yet")
        if new.shape[self.dim] != 1 or index.numel() != 1:
            raise ValueError(f"stage_at writes one entry at one index, got {new.shape[self.dim]} entries at "
                             f"{index.numel()} indices")
        self.storage.index_copy_(self.dim, index.reshape(1), new)
        return self.storage

    def stage(self, new: torch.Tensor) -> torch.Tensor:
        """Write ``new`` right after the current entries, without counting it yet; returns the view of the current
        entries followed by ``new`` (what attention reads). :meth:`advance` counts it in; a later :meth:`stage`
        overwrites it."""
        count = new.shape[self.dim]
        self._reserve(new, self.length + count)
        self.storage.narrow(self.dim, self.length, count).copy_(new)
        return self.storage.narrow(self.dim, 0, self.length + count)

    def advance(self, count: int) -> torch.Tensor:
        """Count ``count`` staged entries in; returns the new view."""
        if count < 0 or self.length + count > self.capacity:
            raise ValueError(f"cannot advance {count} entries: {self.length} held, capacity {self.capacity}")
        self.length += count
        return self.view

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """:meth:`stage` then :meth:`advance`: ``new`` joins the entries; returns the new view."""
        self.stage(new)
        return self.advance(new.shape[self.dim])

    def drop_front(self, count: int) -> torch.Tensor | None:
        """Forget the ``count`` oldest entries, moving the rest to the front of the allocation; returns the view."""
        if count < 0 or count > self.length:
            raise ValueError(f"cannot drop {count} of {self.length} entries")
        keep = self.length - count
        if count and keep:
            survivors = self.storage.narrow(self.dim, count, keep).clone()  # the ranges may overlap
            self.storage.narrow(self.dim, 0, keep).copy_(survivors)
        self.length = keep
        return self.view

    def remove(self, start: int, count: int) -> torch.Tensor | None:
        """Forget entries ``[start, start + count)``, moving the later ones down; returns the view."""
        if start < 0 or count < 0 or start + count > self.length:
            raise ValueError(f"cannot remove [{start}, {start + count}) of {self.length} entries")
        tail = self.length - start - count
        if count and tail:
            moved = self.storage.narrow(self.dim, start + count, tail).clone()
            self.storage.narrow(self.dim, start, tail).copy_(moved)
        self.length -= count
        return self.view
