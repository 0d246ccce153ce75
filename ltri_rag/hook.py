"""The hook into transformers: an attention function registered through ``AttentionInterface``.

Nothing in the model is forked or rebound. While the engine runs a model it switches the model's attention
implementation to ``"ltri"`` (:func:`ltri_attention_enabled`) and passes its :class:`~ltri_rag.cache.LtriCache`
both as the model's cache and as the ``ltri_cache`` keyword argument, which transformers forwards to every
attention call. Called without ``ltri_cache``, the function behaves like the SDPA implementation.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = ["ATTENTION_NAME", "cache_kwarg_name", "ltri_attention", "ltri_attention_enabled", "model_lock"]

ATTENTION_NAME = "ltri"


def ltri_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, H, C, D]``, ``key/value [B, Hkv, C, D]`` -> ``[B, C, H, D]``."""
    cache = kwargs.pop("ltri_cache", None)
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return cache.attend(module.layer_idx, query, key, value, scaling=scaling, softcap=softcap), None


AttentionInterface.register(ATTENTION_NAME, ltri_attention)


_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The one lock of ``model`` that every user of it in this process takes around a model call: a session switches
    the model's attention function for its pass (:func:`ltri_attention_enabled`), so two calls overlapping on one
    model object would undo each other's switch. ``KVMemory`` and the LangChain / LlamaIndex adapters share it."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def ltri_attention_enabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with the ``ltri`` attention implementation inside the block, then restore the previous one."""
    configs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text is not model.config:
        configs.append(text)
    previous = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = ATTENTION_NAME
        yield
    finally:
        for c, impl in zip(configs, previous):
            c._attn_implementation = impl


def cache_kwarg_name(model: nn.Module) -> str:
    """``cache`` (transformers >= 5.24) or ``past_key_values`` (earlier 5.x), per the model's forward signature."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
