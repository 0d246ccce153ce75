"""Page-locked host memory of an exact size for the span pool's host tier (:func:`pinned_empty`)."""

from __future__ import annotations

import mmap
import weakref

import numpy as np
import torch

__all__ = ["REGISTER_HOST_MEMORY", "pinned_empty"]

REGISTER_HOST_MEMORY = True
"""Whether :func:`pinned_empty` page-locks exact-size pageable memory with ``cudaHostRegister`` (True) or takes
torch's pinned allocator (False: each block rounded up to a power of two; kept for comparisons)."""

_PORTABLE_MAPPED = 3  # cudaHostRegisterPortable | cudaHostRegisterMapped


def _unregister(ptr: int) -> None:
    """Undo :func:`pinned_empty`'s registration of the region at ``ptr`` (called just before its memory is freed).
    The device is drained first, unless a CUDA graph is being captured (nothing would then still read it): a kernel
    may still be reading the region in place."""
    if not torch.cuda.is_initialized():
        return
    if not torch.cuda.is_current_stream_capturing():
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaHostUnregister(ptr)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor in page-locked memory that a GPU can copy from asynchronously and read or write
    in place (Triton kernels take it like a device tensor).

    Large buffers (the span pool's host tier: one per layer and K / V, sized for the prompt) are the reason: torch's
    pinned allocator (``torch.empty(..., pin_memory=True)``) rounds every block up to a power of two (a 192 MiB
    layer takes 256 MiB) and keeps freed blocks cached. Here the memory is pageable NumPy memory of the exact size
    (rounded to whole pages, page-aligned, so that no two registrations share a page) page-locked with
    ``cudaHostRegister`` (portable, mapped), and unregistered just before it is freed, when the last tensor viewing
    it goes. On the H200 host, 12 GiB in 64 pieces took 3.7-4.8 s instead of 5.7-9.6 s (and 16 GiB) with torch's
    allocator (``benchmarks/results/host_alloc_h200``).

    Falls back to torch's pinned allocator without CUDA (which then raises as it always did), for an empty tensor,
    with ``REGISTER_HOST_MEMORY`` off, or when the registration fails.

    Args:
        shape: Tensor shape.
        dtype: Tensor dtype.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    nbytes = numel * dtype.itemsize
    if nbytes == 0 or not REGISTER_HOST_MEMORY or not torch.cuda.is_available():
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    page = mmap.PAGESIZE
    size = -(-nbytes // page) * page
    raw = np.empty(size + page, dtype=np.uint8)
    offset = (-raw.ctypes.data) % page
    region = raw[offset:offset + size]
    ptr = int(region.ctypes.data)
    if int(torch.cuda.cudart().cudaHostRegister(ptr, size, _PORTABLE_MAPPED)) != 0:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    # the tensor views ``region`` (which holds ``raw``): when the last view goes, ``raw`` goes, and this runs first
    weakref.finalize(raw, _unregister, ptr).atexit = False
    return torch.from_numpy(region)[:nbytes].view(dtype).view(shape)
