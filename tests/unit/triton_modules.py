"""How the kernel tests get a Triton kernel module: built for the interpreter on a CPU, compiled on a GPU.

``TRITON_INTERPRET`` is read when a kernel module is imported (Triton decides then how to build its kernels), so on a
CPU it is set before the import, and a module an earlier test imported in this process without it is reloaded.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_module(name: str) -> ModuleType:
    """``ltri_rag.kernels.<name>`` as the tests run it (under the interpreter on a CPU); skips the calling test module
    where triton is not installed."""
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    module = importlib.import_module(f"ltri_rag.kernels.{name}")
    if DEVICE == "cpu" and not module.INTERPRETED:  # imported earlier in this process without the interpreter
        module = importlib.reload(module)
    return module
