"""The device cache of host-tier rows of a :class:`~ltri_rag.pool.PagedKVPool` (``LtriConfig.host_cache_tokens``).

Per global layer a direct-mapped copy, in the compute device's memory, of the pool's host-tier rows that recent
retrievals read: ``tokens * Hkv`` lines of ``head_dim`` K and V elements, a tag per line and a launch count. The
one-launch assembly (:mod:`ltri_rag.kernels.triton_assemble`, which explains tags and lines) reads and fills it;
this module allocates it, keeps the hit counters of benchmark runs, and drops the lines of rows the pool overwrites.

Shapes per layer: ``tags [C]`` int64 (0: an empty line), ``k, v [C, D]`` in the pool's dtype, ``epoch [1]`` int64,
with ``C = tokens * Hkv``; a host row ``r`` (``token * Hkv + head``, tokens counted from the host tier's first) may
sit at line ``r % C``.
"""

from __future__ import annotations

import torch

from ltri_rag.kernels.transfer import to_device
from ltri_rag.kernels.triton_assemble import EPOCH_BITS

__all__ = ["HostRowCache"]


class HostRowCache:
    """Every layer's cache of host-tier rows, allocated per layer on first use.

    Args:
        tokens: Tokens per layer (lines: ``tokens * Hkv``); must be positive.
        device: Where the lines live (the pool's first tier).
    """

    def __init__(self, tokens: int, device: torch.device) -> None:
        if not isinstance(tokens, int) or tokens <= 0:
            raise ValueError(f"tokens must be a positive int, got {tokens!r}")
        self.tokens = tokens
        self.device = device
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._stats: torch.Tensor | None = None

    def __len__(self) -> int:
        """Layers whose cache has been allocated."""
        return len(self._layers)

    def layer(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tags, k, v, epoch)`` of ``layer`` (module docstring), allocated empty at the first call for host pages
        shaped like ``like`` (``[pages, page_size, Hkv, D]``)."""
        cache = self._layers.get(layer)
        if cache is None:
            lines = self.tokens * like.shape[2]
            with torch.inference_mode(False):  # plain tensors: updated in place in and out of inference mode
                cache = (torch.zeros(lines, dtype=torch.int64, device=self.device),
                         torch.zeros(lines, like.shape[3], dtype=like.dtype, device=self.device),
                         torch.zeros(lines, like.shape[3], dtype=like.dtype, device=self.device),
                         torch.zeros(1, dtype=torch.int64, device=self.device))
            self._layers[layer] = cache
            self.stats  # allocated now, not inside a captured step that counts
        return cache

    @property
    def stats(self) -> torch.Tensor:
        """``[2]`` int64 on ``device``: host-tier rows the assembly found in the cache, and host-tier rows it read in
        all, summed over layers and steps while :data:`ltri_rag.kernels.triton_assemble.COUNT_HOST_CACHE` is set
        (zero it to restart the count)."""
        if self._stats is None:
            with torch.inference_mode(False):
                self._stats = torch.zeros(2, dtype=torch.int64, device=self.device)
        return self._stats

    def drop(self, layers: list[int], idx: torch.Tensor, num_kv_heads: int) -> None:
        """Forget cached copies of host-tier rows about to be overwritten: tokens ``idx`` (``[n]`` int64, counted
        from the host tier's first) of ``layers``, every head."""
        caches = [self._layers[layer] for layer in layers if layer in self._layers]
        if not caches:
            return
        rows = (to_device(idx, self.device)[:, None] * num_kv_heads
                + torch.arange(num_kv_heads, device=self.device)).reshape(-1)
        lines = rows % caches[0][0].numel()
        big = torch.iinfo(torch.int64).max
        for tags, *_ in caches:
            # a line holding one of the rows becomes 0 (empty); others keep their tag (min with the largest int)
            drop = torch.where((tags[lines] >> EPOCH_BITS) == rows + 1, 0, big)
            tags.scatter_reduce_(0, lines, drop, reduce="amin")
