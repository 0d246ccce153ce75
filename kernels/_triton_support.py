"""What the Triton kernel modules share outside their kernels: the optional ``triton`` import, the interpreter
switch and small launch helpers (block-size checks, the GPU's multiprocessor count).

``triton`` / ``tl`` are None where triton does not import (it ships for Linux x86_64 only). Each kernel module
evaluates ``interpreted()`` itself when it is imported, because Triton decides how to build a kernel when it is
decorated: ``TRITON_INTERPRET`` must be set before that module is imported (or the module reloaded). The jit
helpers the kernels call stay in each kernel module for the same reason.
"""

from __future__ import annotations

import functools
import os

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux x86_64 only
    triton = None
    tl = None

__all__ = ["interpreted", "multiprocessors", "next_pow2", "pow2_block", "tl", "triton", "triton_available"]


def interpreted() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter (CPU tensors) now."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in (
        "1", "true", "yes", "on", "y")


def triton_available() -> bool:
    """Whether triton imported (the kernels run on CUDA tensors, or on CPU tensors under the interpreter)."""
    return triton is not None


def pow2_block(value: int | None, default: int, name: str) -> int:
    """An explicit block size ``value`` (a power of two >= 16, else ``ValueError`` naming ``name``), or
    ``default`` when None."""
    if value is None:
        return default
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return value


def next_pow2(value: int) -> int:
    """The smallest power of two >= ``value`` (1 for ``value <= 1``)."""
    return 1 << max(0, value - 1).bit_length()


@functools.cache
def multiprocessors(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (asked once)."""
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count
