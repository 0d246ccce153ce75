"""The time budget and the skip decisions: stopping a pass between layers at the deadline, predicting the next
length's time from the last one, and estimating the pinned host memory a retrieving mode's span pool may take."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from benchmarks.e2e.models import ModelInfo, decoder_layers
from ltri_rag import LtriConfig


class BudgetExceeded(RuntimeError):
    """Raised between layers once the run's time limit is reached."""


@contextmanager
def deadline_guard(model: nn.Module, deadline: float) -> Iterator[None]:
    """Raise :class:`BudgetExceeded` at the next decoder layer once ``time.perf_counter()`` passes ``deadline``."""
    layers = list(decoder_layers(model) or []) or [model]

    def check(*_: Any) -> None:
        if time.perf_counter() > deadline:
            raise BudgetExceeded("the run's time limit was reached")

    handles = [layer.register_forward_pre_hook(check) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Track:
    """What one (model, mode) has done so far: the basis of the skip decisions."""

    last_length: int | None = None
    last_prefill_s: float = 0.0
    last_extra_s: float = 0.0  # decode + profiling at that length
    history: list[tuple[int, float]] = field(default_factory=list)
    failed: str | None = None  # "OOM at 524288" etc.

    def exponent(self, mode: str) -> float:
        """Growth exponent of prefill time: measured over the last two lengths, else a default."""
        if len(self.history) >= 2:
            (l0, t0), (l1, t1) = self.history[-2:]
            if t0 > 0 and t1 > 0 and l1 > l0:
                return min(2.2, max(1.0, math.log(t1 / t0) / math.log(l1 / l0)))
        return 2.0 if mode == "full" else 1.15

    def predict(self, mode: str, length: int, with_decode: bool, prefill_repeats: int = 1) -> float | None:
        """Seconds the next length should take (``prefill_repeats`` reads of its prompt), or None before any
        length ran."""
        if self.last_length is None:
            return None
        ratio = length / self.last_length
        extra = self.last_extra_s * (ratio if mode == "full" else 1.2) if with_decode else 0.0
        return prefill_repeats * self.last_prefill_s * ratio ** self.exponent(mode) + extra


def pool_host_bytes(info: ModelInfo, length: int, engine: LtriConfig, device_free_bytes: float = 0.0) -> int:
    """Pinned host memory the span pool of a retrieving mode may hold after a prompt of ``length`` tokens.

    The engine sizes the pool once for a prompt it is fed (``LtriCache.expect_tokens``: the evicted tokens plus a
    sixteenth for decoding), so this is that size, not a doubled capacity. With ``kv_offload="auto"`` the pages that
    fit in the device budget (``kv_device_gib``, else the engine's share of ``device_free_bytes``) are not counted.
    """
    if engine.kv_offload is False:
        return 0
    evicted = max(0, length - engine.local_window - engine.num_sink_tokens)
    if evicted:
        evicted += max(4 * engine.evict_stride, evicted // 16)
    if engine.kv_offload == "auto":
        from ltri_rag.cache import DEVICE_POOL_SHARE

        device_bytes = (engine.kv_device_gib * 2**30 if engine.kv_device_gib is not None
                        else DEVICE_POOL_SHARE * device_free_bytes)
        evicted = max(0, evicted - int(device_bytes // max(info.kv_bytes_per_token, 1)))
    pages = -(-evicted // engine.page_size)
    return pages * engine.page_size * info.kv_bytes_per_token
