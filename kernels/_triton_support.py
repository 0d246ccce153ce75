"""What the Triton kernel modules share outside their kernels: the optional ``triton`` import and the interpreter
switch.

``triton`` / ``tl`` are None where triton does not import (it ships for Linux x86_64 only). Each kernel module
evaluates ``interpreted()`` itself when it is imported, because Triton decides how to build a kernel when it is
decorated: ``TRITON_INTERPRET`` must be set before that module is imported (or the module reloaded). The jit
helpers the kernels call stay in each kernel module for the same reason.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships for Linux x86_64 only
    triton = None
    tl = None

__all__ = ["interpreted", "tl", "triton", "triton_available"]


def interpreted() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the Triton interpreter (CPU tensors) now."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in (
        "1", "true", "yes", "on", "y")


def triton_available() -> bool:
    """Whether triton imported (the kernels run on CUDA tensors, or on CPU tensors under the interpreter)."""
    return triton is not None
