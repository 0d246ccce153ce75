"""The state of a sliding-window attention layer (Gemma 3's local layers): its own window, attended exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ltri_rag.kernels.attention import attention_with_lse

if TYPE_CHECKING:
    from ltri_rag.layer import StepPlan

__all__ = ["SlidingLayerState"]


class SlidingLayerState:
    """A sliding-window layer: keeps the last ``sliding_window - 1`` keys; exact.

    Like :class:`GlobalLayerState`, :meth:`attend` changes no state: the new window is kept by :meth:`commit`.
    """

    def __init__(self, sliding_window: int) -> None:
        self.sliding_window = sliding_window
        self.k: torch.Tensor | None = None  # [B, Hkv, w, D]
        self.v: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # window after the pass being run

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float,
               softcap: float | None, dry: bool = False) -> torch.Tensor:
        """``q: [B, H, C, D]``, ``k, v: [B, Hkv, C, D]`` -> ``[B, H, C, D]`` float32 (``dry``: keep no state)."""
        keys = k if self.k is None else torch.cat([self.k, k], dim=2)
        values = v if self.v is None else torch.cat([self.v, v], dim=2)
        offset = keys.shape[2] - q.shape[2]
        out, _ = attention_with_lse(q, keys, values, scaling=scaling, causal_offset=offset,
                                    sliding_window=self.sliding_window, softcap=softcap)
        if not dry:
            keep = self.sliding_window - 1
            self._pending = (keys[:, :, -keep:], values[:, :, -keep:]) if keep else (keys[:, :, :0], values[:, :, :0])
        return out

    def commit(self, plan: StepPlan) -> None:
        """Keep the window of the pass just attended (called once every layer has attended)."""
        if self._pending is not None:
            self.k, self.v = self._pending
        self._pending = None

    def discard(self) -> None:
        """Forget the pass just attended (the forward failed)."""
        self._pending = None
