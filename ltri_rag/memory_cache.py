"""A bounded LRU cache of stored documents' span memory, kept on the model's device.

Answering a question imports the candidate documents' span memory (K/V, index vectors, spans) into a session; read
from the store that is a file read, a checksum and a host-to-device copy per document and layer. The cache keeps the
loaded memory of recently used documents on the model's device (GPU memory on a GPU: the memory's first tier, before
host files), up to a byte budget, and drops the least recently used beyond it.

An entry is keyed by ``(collection, doc_id, created)``: a document replaced (by this process or by another writer
of the store) has a new ``created`` time, so a stale entry is never returned; it is only dropped later, by
:meth:`DocumentCache.forget` or by the LRU order. Entries are never modified by their users (importing memory
copies it into the session's pool).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ltri_rag.cache import MemoryExport

__all__ = ["CacheInfo", "DocumentCache", "memory_bytes"]

T = TypeVar("T")


@dataclass(frozen=True)
class CacheInfo:
    """Counters of a :class:`DocumentCache`: hits, misses, entries held, bytes held, byte budget."""

    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int


def memory_bytes(memory: MemoryExport) -> int:
    """Bytes of a document's span memory (every tensor of every layer, and the positions)."""
    total = memory.positions.numel() * memory.positions.element_size()
    for part in memory.layers.values():
        total += sum(t.numel() * t.element_size() for t in part.values())
    return total


class DocumentCache:
    """Least-recently-used cache of loaded documents, bounded in bytes (thread-safe).

    Args:
        max_bytes: Byte budget; 0 disables the cache (every lookup loads). An entry larger than the budget is not
            kept.
        device: Where cached memory is kept (the model's device); loaded memory is moved there once.
    """

    def __init__(self, max_bytes: int, device: torch.device) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.device = device
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get_or_load(self, key: Hashable, load: Callable[[], tuple[MemoryExport, T]]) -> tuple[MemoryExport, T]:
        """The cached ``(memory, extra)`` of ``key``, or ``load()``'s, moved to the device and cached.

        ``key`` must change whenever the document does (the memory keys on the document's ``created`` time).
        """
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return hit[0]  # type: ignore[return-value]
            self._misses += 1
        memory, extra = load()
        memory = _on_device(memory, self.device)
        size = memory_bytes(memory)
        if self.max_bytes and size <= self.max_bytes:
            with self._lock:
                if key not in self._entries:
                    self._entries[key] = ((memory, extra), size)
                    self._bytes += size
                    while self._bytes > self.max_bytes:
                        _, (_, dropped) = self._entries.popitem(last=False)
                        self._bytes -= dropped
        return memory, extra

    def forget(self, match: Callable[[Hashable], bool]) -> int:
        """Drop the entries whose key ``match`` accepts (e.g. deleted documents); returns how many."""
        with self._lock:
            gone = [key for key in self._entries if match(key)]
            for key in gone:
                self._bytes -= self._entries.pop(key)[1]
            return len(gone)

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def info(self) -> CacheInfo:
        """Current counters."""
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._entries), self._bytes, self.max_bytes)


def _on_device(memory: MemoryExport, device: torch.device) -> MemoryExport:
    """``memory`` with its tensors on ``device`` (span offsets and positions stay on the host, where the engine
    reads them)."""
    host = ("starts", "ends", "owner")
    layers = {layer: {name: t if name in host else t.to(device) for name, t in part.items()}
              for layer, part in memory.layers.items()}
    return MemoryExport(positions=memory.positions, layers=layers)
