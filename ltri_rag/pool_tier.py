"""One tier of the span pool's pages (:class:`~ltri_rag.pool.PagedKVPool`): per layer ``k, v: [capacity, page_size,
Hkv, D]`` on one device (the GPU, or host memory, pinned for copies to and reads by a GPU), growing by doubling up to
a limit."""

from __future__ import annotations

import torch

from ltri_rag.host_memory import pinned_empty

__all__ = ["PoolTier"]


class PoolTier:
    """Pages of one tier: per layer ``k, v: [capacity, page_size, Hkv, D]`` on ``device``, growing by doubling
    up to ``limit`` pages (None: no limit)."""

    def __init__(self, device: torch.device, pin_memory: bool, limit: int | None) -> None:
        self.device = device
        self.pin_memory = pin_memory and device.type == "cpu"
        self.limit = limit
        self.capacity = 0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised pages of this tier (pinned host pages: :func:`~ltri_rag.host_memory.pinned_empty`)."""
        if self.pin_memory:
            return pinned_empty(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _empty(self, pages: int, like: torch.Tensor) -> torch.Tensor:
        return self._alloc((pages, *like.shape[1:]), like.dtype)

    def grow(self, pages: int, exact: bool = False) -> None:
        """Room for ``pages`` pages (at most ``limit``); existing pages are copied over. The capacity at least
        doubles (amortised O(1) per page); ``exact`` (a size known in advance) takes ``pages`` as it is when that is
        at least a doubling (smaller requests still double, so many small exact requests stay linear)."""
        pages = pages if self.limit is None else min(pages, self.limit)
        if pages <= self.capacity:
            return
        if exact and pages >= 2 * self.capacity:
            new_capacity = max(pages, 16)
        else:
            new_capacity = max(pages, 2 * self.capacity, 16)
        if self.limit is not None:
            new_capacity = min(new_capacity, self.limit)
        if self.pin_memory and self.k and torch.cuda.is_available():
            # kernels may still be reading the old pinned pages in place (zero_copy_host_pages), and a freed pinned
            # block can be handed out again at once: let the device finish with them first (growth is rare)
            torch.cuda.synchronize()
        for store in (self.k, self.v):
            for layer, old in store.items():
                new = self._empty(new_capacity, old)
                new[: old.shape[0]].copy_(old)
                store[layer] = new
        self.capacity = new_capacity

    def ensure_layer(self, layer: int, page_size: int, num_kv_heads: int, head_dim: int,
                     dtype: torch.dtype) -> None:
        if layer not in self.k:
            shape = (self.capacity, page_size, num_kv_heads, head_dim)
            self.k[layer] = self._alloc(shape, dtype)
            self.v[layer] = self._alloc(shape, dtype)

    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V seen as ``[pages * page_size * Hkv, D]`` rows."""
        k, v = self.k[layer], self.v[layer]
        return k.view(-1, k.shape[3]), v.view(-1, v.shape[3])
