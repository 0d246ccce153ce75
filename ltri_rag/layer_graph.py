"""Decode steps that reuse a memory part, and their graph form (what a CUDA graph captures and replays).

A graph-form step (``StepPlan.graph``, driven by :mod:`ltri_rag.decode_graph`) does only device work at fixed
addresses: the layer's reused memory part sits in buffers of fixed width (:meth:`GraphFormSteps.load_graph_memory`),
the new token's K/V go into the window's allocation at a device index, and the decode kernel reads the window length
from device memory. :class:`GraphFormSteps` holds these methods; :class:`~ltri_rag.layer.GlobalLayerState` inherits
them and sets the attributes they read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from ltri_rag.kernels.attention import decode_attention, decode_attention_backend

if TYPE_CHECKING:
    from ltri_rag.config import LtriConfig
    from ltri_rag.layer import StepPlan
    from ltri_rag.span_memory import SpanTable
    from ltri_rag.window import WindowBuffer

__all__ = ["GraphFormSteps"]


class GraphFormSteps:
    """Reuse of a decode memory part and graph-form decode steps of one global layer (a base of
    :class:`~ltri_rag.layer.GlobalLayerState`)."""

    layer_idx: int
    cfg: LtriConfig
    band_width: int
    _win_buffers: tuple[WindowBuffer, WindowBuffer, WindowBuffer, WindowBuffer]
    _decode_memory: tuple | None
    _pending_decode_memory: tuple | None
    _pending: tuple[torch.Tensor, ...] | None
    _graph_memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    _graph_memory_source: torch.Tensor | None
    win_k: torch.Tensor | None
    sink_k: torch.Tensor | None
    tables: list[SpanTable]

    def _memory_key(self, plan: StepPlan) -> tuple:
        """What a reused decode memory part depends on: the position its placement anchors to (the window's
        first position), the sink count and the span counts."""
        win_len = 0 if self.win_k is None else self.win_k.shape[2]
        sinks = 0 if self.sink_k is None else self.sink_k.shape[2]
        return plan.pos0 - win_len, sinks, tuple(len(t) for t in self.tables)

    def reuses_memory(self, plan: StepPlan) -> bool:
        """Whether the decode step ``plan`` reuses the memory part of an earlier step (``decode_retrieval_stride``
        > 1, the part still valid and used fewer than ``stride`` times)."""
        stride = self.cfg.decode_retrieval_stride
        if not (plan.decode and not plan.dry and stride > 1):
            return False
        cached = self._decode_memory
        return cached is not None and cached[0] == self._memory_key(plan) and cached[1] < stride

    # --------------------------------------------------------------------------------------------- graph form
    def reserve_window(self, total: int) -> None:
        """Room for ``total`` window tokens in the K / V buffers (the window must exist), so that the buffers keep
        their address while a captured graph uses them."""
        for buffer in self._win_buffers[:2]:
            buffer.reserve(total)

    def window_storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's K / V allocations ``[B, Hkv, capacity, D]`` (what a graph-form step reads)."""
        return self._win_buffers[0].storage, self._win_buffers[1].storage

    def load_graph_memory(self, min_width: int = 0) -> bool:
        """Copy the reused memory part into the buffers a graph-form step reads, unless they hold it already.

        The buffers are ``max(min_width, M)`` keys wide (``M``: the part's width), with the mask False past ``M``;
        they are reallocated only when a part is wider than they are. Returns True when they were (re)allocated
        (a graph captured over the old ones must be captured again).

        Raises:
            RuntimeError: there is no memory part to reuse.
        """
        if self._decode_memory is None:
            raise RuntimeError(f"layer {self.layer_idx} has no decode memory part to load")
        _, _, mem_k, mem_v, mask = self._decode_memory
        if self._graph_memory_source is mem_k:
            return False
        batch, num_kv_heads, width, head_dim = mem_k.shape
        buffers = self._graph_memory
        grown = buffers is None or buffers[0].shape[2] < width or buffers[0].shape[:2] != mem_k.shape[:2] \
            or buffers[0].dtype != mem_k.dtype or buffers[0].device != mem_k.device
        if grown:
            capacity = max(width, min_width)
            buffers = (mem_k.new_zeros(batch, num_kv_heads, capacity, head_dim),
                       mem_v.new_zeros(batch, num_kv_heads, capacity, head_dim),
                       torch.zeros(batch, num_kv_heads, capacity, dtype=torch.bool, device=mem_k.device))
            self._graph_memory = buffers
        buf_k, buf_v, buf_mask = buffers
        buf_k[:, :, :width].copy_(mem_k)
        buf_v[:, :, :width].copy_(mem_v)
        if mask is None:
            buf_mask[:, :, :width] = True
        else:
            buf_mask[:, :, :width].copy_(mask)
        buf_mask[:, :, width:] = False
        self._graph_memory_source = mem_k
        return grown

    def _stage_reuse(self, plan: StepPlan) -> None:
        """Stage one more use of the reused memory part (what :meth:`_placed_memory` does on reuse)."""
        if not self.reuses_memory(plan):
            raise RuntimeError(f"layer {self.layer_idx}: the step does not reuse a memory part")
        key, uses, mem_k, mem_v, mask = self._decode_memory
        self._pending_decode_memory = (key, uses + 1, mem_k, mem_v, mask)

    def staged_step(self) -> tuple[torch.Tensor, ...]:
        """What the step just attended staged for :meth:`commit`: ``(k, v, key_mass, band)`` of its tokens."""
        if self._pending is None:
            raise RuntimeError(f"layer {self.layer_idx} staged nothing")
        return self._pending

    def stage_graph_step(self, staged: tuple[torch.Tensor, ...], plan: StepPlan) -> None:
        """Stage what a replayed graph-form step computed (``staged``: :meth:`staged_step` of the captured step,
        holding the replay's results), as if :meth:`attend` had run."""
        self._stage_reuse(plan)
        self._pending = staged

    def _attend_graph(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan, scaling: float,
                      softcap: float | None, graph_window: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """A decode step as a CUDA graph captures it: only device work at fixed addresses. The memory part is the
        reused one from :meth:`load_graph_memory`'s buffers; the new token goes into the window's allocation at
        device index ``graph_window[0]``, and the kernel reads the window length from ``graph_window[1]``. The
        staged changes are those of the eager reuse step (``key_mass`` has the allocation's width; :meth:`_absorb`
        cuts it)."""
        self._stage_reuse(plan)
        if self._graph_memory is None or self._graph_memory_source is not self._decode_memory[2]:
            raise RuntimeError(f"layer {self.layer_idx}: a graph-form step needs the memory part loaded "
                               "(load_graph_memory)")
        buf_k, buf_v, buf_mask = self._graph_memory
        index, length = graph_window
        wk, wv = self._win_buffers[:2]
        win_k, win_v = wk.stage_at(k, index), wv.stage_at(v, index)
        fused = decode_attention_backend(self.cfg.attention_backend, q.device) or decode_attention
        with record_function("ltri.attend_decode"):
            local = fused(q, buf_k, buf_v, buf_mask, win_k, win_v, scaling=scaling, band_width=self.band_width,
                          want_key_mass=self.cfg.retrieves, softcap=softcap, win_len=length)
        self._pending = (k, v, local.key_mass, local.band)
        return local.out
