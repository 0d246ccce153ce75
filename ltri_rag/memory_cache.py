"""A bounded, two-tier LRU cache of stored documents' span memory: the model's device first, host memory second.

Answering a question imports the candidate documents' span memory (K/V, index vectors, spans) into a session; read
from the store that is a file read, a checksum and a host-to-device copy per document and layer. The cache keeps the
loaded memory of recently used documents:

* **device tier** (``max_bytes``): on the model's device (GPU memory on a GPU), used as is;
* **host tier** (``host_bytes``): documents pushed out of the device tier move here (pinned host memory when the
  device is a GPU, so bringing one back is an asynchronous copy), and a hit moves the document back to the device
  tier: no file read, no checksum;
* beyond both, the store's files on disk are the last tier.

Each tier drops its least recently used documents beyond its byte budget. An entry is keyed by
``(collection, doc_id, created)``: a document replaced (by this process or by another writer of the store) has a new
``created`` time, so a stale entry is never returned; it is only dropped later, by :meth:`DocumentCache.forget` or by
the LRU order. Entries are never modified by their users (importing memory copies it into the session's pool).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ltri_rag.cache import MemoryExport
from ltri_rag.kernels.transfer import to_device

__all__ = ["CacheInfo", "DocumentCache", "memory_bytes"]

T = TypeVar("T")
_Entry = tuple[object, int]  # ((memory, extra), bytes)


@dataclass(frozen=True)
class CacheInfo:
    """Counters of a :class:`DocumentCache`.

    Attributes:
        hits: Lookups served by the device tier.
        misses: Lookups served by neither tier (loaded from the store).
        entries: Documents in the device tier.
        bytes: Bytes in the device tier.
        max_bytes: Byte budget of the device tier.
        host_hits: Lookups served by the host tier (the document moved back to the device tier).
        host_entries: Documents in the host tier.
        host_bytes: Bytes in the host tier.
        host_max_bytes: Byte budget of the host tier.
    """

    hits: int
    misses: int
    entries: int
    bytes: int
    max_bytes: int
    host_hits: int = 0
    host_entries: int = 0
    host_bytes: int = 0
    host_max_bytes: int = 0


def memory_bytes(memory: MemoryExport) -> int:
    """Bytes of a document's span memory (every tensor of every layer, and the positions)."""
    total = memory.positions.numel() * memory.positions.element_size()
    for part in memory.layers.values():
        total += sum(t.numel() * t.element_size() for t in part.values())
    return total


def _check_budget(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


class DocumentCache:
    """Two-tier least-recently-used cache of loaded documents, each tier bounded in bytes (thread-safe).

    Args:
        max_bytes: Byte budget of the device tier; 0 turns that tier off. An entry larger than the budget is not
            kept there (it may still go to the host tier).
        device: The model's device, where the device tier keeps memory and where every returned memory lives.
        host_bytes: Byte budget of the host tier (0, the default, turns it off): documents leaving the device tier,
            or too large for it, are kept in host memory (pinned when ``device`` is a GPU) up to this budget.
    """

    def __init__(self, max_bytes: int, device: torch.device, host_bytes: int = 0) -> None:
        self.max_bytes = _check_budget("max_bytes", max_bytes)
        self.host_max_bytes = _check_budget("host_bytes", host_bytes)
        self.device = torch.device(device)
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._host: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._bytes = 0
        self._host_bytes = 0
        self._hits = 0
        self._host_hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get_or_load(self, key: Hashable, load: Callable[[], tuple[MemoryExport, T]]) -> tuple[MemoryExport, T]:
        """The cached ``(memory, extra)`` of ``key`` (from the device tier, or brought back from the host tier), or
        ``load()``'s; either way on the device and kept in the device tier.

        ``key`` must change whenever the document does (the memory keys on the document's ``created`` time).
        """
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return hit[0]  # type: ignore[return-value]
            held = self._host.pop(key, None)
            if held is not None:
                self._host_bytes -= held[1]
                self._host_hits += 1
            else:
                self._misses += 1
        if held is not None:
            memory, extra = held[0]  # type: ignore[misc]
        else:
            memory, extra = load()
        memory = _moved(memory, self.device)
        self._keep(key, (memory, extra), memory_bytes(memory))
        return memory, extra

    def _keep(self, key: Hashable, entry: tuple[MemoryExport, object], size: int) -> None:
        """Put ``entry`` in the device tier (or, too large for it, the host tier); what the device tier pushes out
        goes to the host tier."""
        demoted: list[tuple[Hashable, tuple[MemoryExport, object], int]] = []
        with self._lock:
            if self.max_bytes and size <= self.max_bytes:
                if key not in self._entries:
                    self._entries[key] = (entry, size)
                    self._bytes += size
                    while self._bytes > self.max_bytes:
                        old_key, (old, old_size) = self._entries.popitem(last=False)
                        self._bytes -= old_size
                        demoted.append((old_key, old, old_size))  # type: ignore[arg-type]
            else:
                demoted.append((key, entry, size))
        for old_key, old, old_size in demoted:  # the copies to host memory run outside the lock
            self._keep_on_host(old_key, old, old_size)

    def _keep_on_host(self, key: Hashable, entry: tuple[MemoryExport, object], size: int) -> None:
        if not self.host_max_bytes or size > self.host_max_bytes:
            return
        memory, extra = entry
        held = ((_moved(memory, torch.device("cpu"), pin=self.device.type == "cuda"), extra), size)
        with self._lock:
            if key in self._entries or key in self._host:
                return
            self._host[key] = held
            self._host_bytes += size
            while self._host_bytes > self.host_max_bytes:
                _, (_, dropped) = self._host.popitem(last=False)
                self._host_bytes -= dropped

    def forget(self, match: Callable[[Hashable], bool]) -> int:
        """Drop the entries of both tiers whose key ``match`` accepts (e.g. deleted documents); returns how many."""
        with self._lock:
            gone = 0
            for tier, attr in ((self._entries, "_bytes"), (self._host, "_host_bytes")):
                for key in [key for key in tier if match(key)]:
                    setattr(self, attr, getattr(self, attr) - tier.pop(key)[1])
                    gone += 1
            return gone

    def clear(self) -> None:
        """Drop every entry of both tiers (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._host.clear()
            self._bytes = self._host_bytes = 0

    def info(self) -> CacheInfo:
        """Current counters."""
        with self._lock:
            return CacheInfo(self._hits, self._misses, len(self._entries), self._bytes, self.max_bytes,
                             self._host_hits, len(self._host), self._host_bytes, self.host_max_bytes)


def _moved(memory: MemoryExport, device: torch.device, pin: bool = False) -> MemoryExport:
    """``memory`` with its tensors on ``device`` (span offsets and positions stay on the host, where the engine
    reads them); ``pin``: host copies in pinned memory. Host tensors go to a GPU without a synchronisation."""
    host = ("starts", "ends", "owner")

    def move(t: torch.Tensor) -> torch.Tensor:
        if device.type == "cpu":
            t = t.to(device)
            if pin and not t.is_pinned():
                try:
                    return t.pin_memory()
                except RuntimeError:  # no pinned memory left: pageable memory still works, only slower to copy
                    return t
            return t
        return to_device(t, device)

    layers = {layer: {name: t if name in host else move(t) for name, t in part.items()}
              for layer, part in memory.layers.items()}
    return MemoryExport(positions=memory.positions, layers=layers)
