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


class _RecordedLaunches:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **flags)`` launches it as before and notes the
    value of one constexpr flag."""

    def __init__(self, kernel: object, flag: str, seen: list[object]) -> None:
        self._kernel, self._flag, self._seen = kernel, flag, seen

    def __getitem__(self, grid: object):
        launch = self._kernel[grid]  # type: ignore[index]

        def run(*args: object, **flags: object) -> object:
            self._seen.append(flags.get(self._flag))
            return launch(*args, **flags)

        return run


def record_launch_flag(monkeypatch: pytest.MonkeyPatch, module: ModuleType, kernels: tuple[str, ...],
                       flag: str) -> list[object]:
    """Have every launch of ``module``'s ``kernels`` (their module attributes, which the launchers look up at each
    call) note the value of constexpr ``flag``; returns the list the values go into, in launch order."""
    seen: list[object] = []
    for name in kernels:
        monkeypatch.setattr(module, name, _RecordedLaunches(getattr(module, name), flag, seen))
    return seen
