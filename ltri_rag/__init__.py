"""ltri-rag: streaming long-context inference with in-model KV retrieval (Ltri-LLM) on Hugging Face models.

Quick use::

    model, tokenizer = ltri_rag.load_model("Qwen/Qwen2.5-0.5B-Instruct")
    text = ltri_rag.generate(model, tokenizer, very_long_prompt, ltri_rag.LtriConfig(mode="ltri"))

The names below are imported on first use (PEP 562), so that ``import ltri_rag`` (and the ``ltri-rag`` command line's
argument parsing) does not import torch and transformers. Using any of them imports :mod:`ltri_rag.hook` first, which
registers the "ltri" attention function with transformers (the engine imports it too).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily through __getattr__
    from ltri_rag.cache import LtriCache  # noqa: F401
    from ltri_rag.config import LtriConfig  # noqa: F401
    from ltri_rag.engine import LtriSession  # noqa: F401
    from ltri_rag.generation import (  # noqa: F401
        GenerationResult,
        encode_prompt,
        generate,
        generate_ids,
        stream_generate,
    )
    from ltri_rag.loading import load_model  # noqa: F401
    from ltri_rag.memory import KVMemory, MemoryAnswer, MemoryStream  # noqa: F401

_EXPORTS: dict[str, str] = {
    "GenerationResult": "ltri_rag.generation",
    "KVMemory": "ltri_rag.memory",
    "LtriCache": "ltri_rag.cache",
    "LtriConfig": "ltri_rag.config",
    "LtriSession": "ltri_rag.engine",
    "MemoryAnswer": "ltri_rag.memory",
    "MemoryStream": "ltri_rag.memory",
    "encode_prompt": "ltri_rag.generation",
    "generate": "ltri_rag.generation",
    "generate_ids": "ltri_rag.generation",
    "load_model": "ltri_rag.loading",
    "stream_generate": "ltri_rag.generation",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public name on first access (and register the "ltri" attention function with transformers)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ltri_rag' has no attribute {name!r}")
    importlib.import_module("ltri_rag.hook")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
