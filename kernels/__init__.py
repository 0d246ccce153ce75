"""Attention and scoring kernels (installed as ``ltri_rag.kernels``).

Each function validates its inputs and runs a plain-torch reference path; Triton backends plug in behind the
same signatures. Only torch (and triton) are imported by the kernel modules.

Exports are resolved lazily: in a source checkout the folder ``kernels/`` is also visible as a top-level name,
and transformers probes a top-level ``kernels`` package on import; an eager import here would then pull in
``ltri_rag`` (and transformers) in the middle of that probe.

That name belongs to another distribution too: Hugging Face's ``kernels``, a dependency of transformers since
5.25, which imports it (``from kernels import CUDAProperties, ...``) as soon as it is installed. Run from a
checkout's root (``python -m pytest``, ``python -m ltri_rag.cli``), the folder here would shadow it. So when this
file is imported under the top-level name and that distribution is installed elsewhere on ``sys.path``, the import
is handed to it (:func:`_defer_to_installed`): ``import kernels`` then gives the installed package, and this
library's kernels stay ``ltri_rag.kernels``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any


def _defer_to_installed() -> bool:
    """Put the installed top-level ``kernels`` package (found on ``sys.path`` outside this checkout) in
    ``sys.modules`` in place of this folder; False if there is none, or it fails to import (this module stays)."""
    here = os.path.realpath(__file__)
    path = [entry for entry in sys.path
            if os.path.realpath(os.path.join(entry or os.curdir, "kernels", "__init__.py")) != here]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None or os.path.realpath(spec.origin or "") == here:
        return False
    module = importlib.util.module_from_spec(spec)
    mine = sys.modules.get(__name__)
    sys.modules[__name__] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - a broken install: keep this folder under the name, as before
        sys.modules[__name__] = mine  # type: ignore[assignment]
        return False
    return True  # the import statement returns sys.modules["kernels"]: the installed package


if __name__ == "kernels":
    _defer_to_installed()

_EXPORTS = {
    "LocalAttention": "attention",
    "attention_with_lse": "attention",
    "decode_attention": "attention_decode",
    "decode_attention_triton": "triton_decode",
    "local_attention": "attention",
    "local_attention_backend": "attention",
    "local_attention_triton": "triton_local",
    "merge_attention": "attention",
    "span_probabilities": "scoring",
    "span_probabilities_triton": "triton_scoring",
    "span_scores": "scoring",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ltri_rag.kernels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ltri_rag.kernels' has no attribute {name!r}")
