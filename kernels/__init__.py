"""Attention and scoring kernels (installed as ``ltri_rag.kernels``).

Each function validates its inputs and runs a plain-torch reference path; Triton backends plug in behind the
same signatures. Only torch (and triton) are imported by the kernel modules.

Exports are resolved lazily: in a source checkout the folder ``kernels/`` is also visible as a top-level name,
and transformers probes a top-level ``kernels`` package on import; an eager import here would then pull in
``ltri_rag`` (and transformers) in the middle of that probe.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LocalAttention": "attention",
    "attention_with_lse": "attention",
    "decode_attention": "attention",
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
