"""Device and host memory around the end-to-end benchmark's runs: synchronising, peak GPU memory, the host's
resident, total and pinned memory, freeing memory between runs, and telling an out-of-memory error."""

from __future__ import annotations

import gc
import os
from contextlib import suppress

import torch

GIB = 1024 ** 3


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window on ``device`` (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last :func:`reset_peak` (GiB); None off CUDA."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def rss_gib() -> float | None:
    """Resident memory of this process (GiB), pinned host memory included."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / GIB
    except ImportError:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
        except (OSError, ValueError, IndexError):
            return None


def host_total_gib() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().total / GIB
    except ImportError:
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemTotal:"):
                        return int(line.split()[1]) / 1024 ** 2
        except (OSError, ValueError):  # no readable /proc/meminfo: unknown
            return None
    return None


def pinned_stats() -> dict[str, float]:
    """GiB figures of torch's pinned host allocator (empty where torch keeps none)."""
    try:
        stats = torch.cuda.host_memory_stats() if torch.cuda.is_available() else {}
    except Exception:  # noqa: BLE001 - older or CPU-only builds
        return {}
    return {k: v / GIB for k, v in stats.items() if "bytes" in k and isinstance(v, (int, float))}


def _empty_host_cache() -> None:
    """Give cached pinned host memory back (the pool's buffers outlive their session in torch's cache)."""
    for fn in (getattr(torch.accelerator, "empty_host_cache", None), getattr(torch._C, "_host_emptyCache", None)):
        if fn is not None:
            with suppress(Exception):  # no accelerator / nothing cached
                fn()
            return


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached device (and pinned host) memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        _empty_host_cache()


def is_oom(err: BaseException) -> bool:
    """``torch.OutOfMemoryError``, or an allocator error that says out of memory."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                       and "out of memory" in str(err).lower())
