"""Decode steps that reuse a memory part, and their graph form (what a CUDA graph captures and replays).

A graph-form step (``StepPlan.graph``, driven by :mod:`ltri_rag.decode_graph`) does only device work at fixed
addresses: the layer's memory part sits in buffers of fixed width (:meth:`GraphFormSteps.load_graph_memory`), the
new token's K/V go into the window's allocation at a device index, and the decode kernel reads the window length
from device memory. Two kinds:

* a *reuse* step attends over the memory part an earlier step placed;
* a *retrieving* step selects spans on the device (scores, ranking, budget fill, cross-layer votes, persistence:
  nothing read back, nothing copied from the host; the step's position is read from a device tensor), gathers and
  places them, and writes the memory part into the same buffers, which the reuse steps after it read.

:class:`GraphFormSteps` holds these methods; :class:`~ltri_rag.layer.GlobalLayerState` inherits them and sets the
attributes they read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from ltri_rag.kernels.attention_decode import decode_attention, decode_attention_backend

if TYPE_CHECKING:
    from ltri_rag.config import LtriConfig
    from ltri_rag.consensus import LayerConsensus
    from ltri_rag.layer import StepPlan
    from ltri_rag.pool import PagedKVPool
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
    pool: PagedKVPool | None
    consensus: LayerConsensus | None
    _pending_recency: dict[int, torch.Tensor]
    _last_slots: list[torch.Tensor]

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

    def _graph_buffers(self, batch: int, num_kv_heads: int, width: int, head_dim: int, like: torch.Tensor,
                       min_width: int) -> bool:
        """Make the memory buffers at least ``width`` keys wide (``max(width, min_width)`` when they are
        reallocated), of ``like``'s dtype and device; returns True when they were (re)allocated."""
        buffers = self._graph_memory
        grown = buffers is None or buffers[0].shape[2] < width or buffers[0].shape[:2] != (batch, num_kv_heads) \
            or buffers[0].dtype != like.dtype or buffers[0].device != like.device
        if grown:
            capacity = max(width, min_width)
            self._graph_memory = (like.new_zeros(batch, num_kv_heads, capacity, head_dim),
                                  like.new_zeros(batch, num_kv_heads, capacity, head_dim),
                                  torch.zeros(batch, num_kv_heads, capacity, dtype=torch.bool, device=like.device))
            self._graph_memory_source = None
        return grown

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
        grown = self._graph_buffers(batch, num_kv_heads, width, head_dim, mem_k, min_width)
        buf_k, buf_v, buf_mask = self._graph_memory
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
                      softcap: float | None, graph_window: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A decode step as a CUDA graph captures it: only device work at fixed addresses. The memory part is the
        reused one from :meth:`load_graph_memory`'s buffers; the new token goes into the window's allocation at
        device index ``graph_window[0]``, and the kernel reads the window length from ``graph_window[1]``. The
        staged changes are those of the eager reuse step (``key_mass`` has the allocation's width; :meth:`_absorb`
        cuts it). A step that does not reuse its memory part retrieves (:meth:`_attend_graph_retrieve`)."""
        if not self.reuses_memory(plan):
            return self._attend_graph_retrieve(q, k, v, plan, scaling, softcap, graph_window)
        self._stage_reuse(plan)
        if self._graph_memory is None or self._graph_memory_source is not self._decode_memory[2]:
            raise RuntimeError(f"layer {self.layer_idx}: a graph-form step needs the memory part loaded "
                               "(load_graph_memory)")
        buf_k, buf_v, buf_mask = self._graph_memory
        index, length = graph_window[:2]
        wk, wv = self._win_buffers[:2]
        win_k, win_v = wk.stage_at(k, index), wv.stage_at(v, index)
        fused = decode_attention_backend(self.cfg.attention_backend, q.device) or decode_attention
        with record_function("ltri.attend_decode"):
            local = fused(q, buf_k, buf_v, buf_mask, win_k, win_v, scaling=scaling, band_width=self.band_width,
                          want_key_mass=self.cfg.retrieves, softcap=softcap, win_len=length)
        self._pending = (k, v, local.key_mass, local.band)
        return local.out

    # ------------------------------------------------------------------------------- graph form: retrieving steps
    def graph_retrievable(self, device: torch.device) -> str | None:
        """Why this layer's retrieving decode steps cannot run in graph form (None when they can): selection on
        the device needs every sequence's spans, sinks, and every pool page readable from the device (its device
        tier, or the pinned host tier with ``zero_copy_host_pages``: :meth:`~ltri_rag.pool.PagedKVPool.readable_on`)."""
        cfg = self.cfg
        if self.pool is None:
            return "the mode keeps no span memory"
        if cfg.pin_prompt_spans:
            return "pin_prompt_spans keeps a host selection"
        if self.sink_k is None or not self.tables or not all(len(t) for t in self.tables):
            return "a sequence has no sinks or no spans yet"
        if not all(self.pool.readable_on(seq, device, cfg.zero_copy_host_pages) for seq in range(len(self.tables))):
            return "pool pages live in host memory (kv_offload; zero_copy_host_pages reads them from the step)"
        return None

    def prepare_graph_retrieval(self, min_width: int) -> None:
        """Put on the compute device, eagerly, everything a retrieving graph-form step reads (persistence state,
        span geometry, starts and layout, pool page tables and positions, the cross-layer prior, the pool's
        host-row cache), and make the memory buffers ``min_width`` keys wide, so that the step itself copies
        nothing from the host."""
        device = self.sink_k.device
        for seq, table in enumerate(self.tables):
            table.recency_on(device)
            table.geometry_on(device)
            table.layout()
            table.starts_on(device)
            self.pool.prepare_on_device(seq, device)
            if self.consensus is not None:
                self.consensus.prior_on(seq, device)
        self.pool.host_cache(self.layer_idx, device)  # the host-row cache, allocated before any capture
        batch, num_kv_heads, _, head_dim = self.sink_k.shape
        self._graph_buffers(batch, num_kv_heads, min_width, head_dim, self.sink_k, min_width)

    def graph_inputs(self) -> list[torch.Tensor]:
        """The state tensors a retrieving step reads that change between its replays (the persistence state, one
        per sequence): a captured graph keeps the ones it was captured with and is refilled from these."""
        return [table.recency for table in self.tables] if self.cfg.persistence else []

    def graph_effects(self) -> tuple:
        """What the step just attended staged for :meth:`commit` (restored after each replay by
        :meth:`restore_graph_effects`)."""
        return (self._pending, dict(self._pending_recency), self._pending_decode_memory, list(self._last_slots))

    def restore_graph_effects(self, effects: tuple) -> None:
        """Stage what a replayed step computed (``effects``: :meth:`graph_effects` of the captured step, holding
        the replay's results), as if :meth:`attend` had run."""
        pending, recency, decode_memory, slots = effects
        self._pending, self._pending_recency = pending, dict(recency)
        self._pending_decode_memory, self._last_slots = decode_memory, list(slots)

    def _attend_graph_retrieve(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan,
                               scaling: float, softcap: float | None,
                               graph_window: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A retrieving decode step as a CUDA graph captures it: spans selected, gathered and placed on the device
        (the step's position read from ``graph_window[2]``), the memory part written into the fixed buffers the
        reuse steps read, the new token into the window at a device index."""
        if self._graph_memory is None or len(graph_window) < 3:
            raise RuntimeError(f"layer {self.layer_idx}: a retrieving graph-form step needs "
                               "prepare_graph_retrieval and the step's position")
        index, length, position = graph_window
        key = self._memory_key(plan)  # before the step: what the reuse steps after it compare against
        buf_k, buf_v, buf_mask = self._graph_memory
        with record_function("ltri.retrieve"):
            if self._assembles_on_device(q, position):  # one launch per sequence, straight into the buffers
                placed = self._device_assembled_memory(q, plan, scaling, position, out=self._graph_memory)
                if placed is None:
                    raise RuntimeError(f"layer {self.layer_idx}: no memory part to retrieve")
                q_mem, mem_k = placed[0], placed[1]
            else:
                memory = self._memory(q, plan, scaling, position)
                if memory is None:
                    raise RuntimeError(f"layer {self.layer_idx}: no memory part to retrieve")
                mem_k, mem_v, mask, pos, host_mask = memory
                q_mem, mem_k = self._place(q, mem_k, host_mask, pos, plan)
                if mem_k.shape[2] > buf_k.shape[2]:
                    raise RuntimeError(f"layer {self.layer_idx}: a memory part of {mem_k.shape[2]} keys exceeds "
                                       f"the graph buffers' {buf_k.shape[2]}")
                buf_k[:, :, :mem_k.shape[2]].copy_(mem_k)
                buf_v[:, :, :mem_k.shape[2]].copy_(mem_v)
                buf_mask[:, :, :mem_k.shape[2]].copy_(mask)
        width = mem_k.shape[2]
        buf_mask[:, :, width:] = False
        self._graph_memory_source = buf_k
        if self.cfg.decode_retrieval_stride > 1:  # reused by the next steps, as the eager step's part would be
            self._pending_decode_memory = (key, 1, buf_k, buf_v, buf_mask)
        wk, wv = self._win_buffers[:2]
        win_k, win_v = wk.stage_at(k, index), wv.stage_at(v, index)
        fused = decode_attention_backend(self.cfg.attention_backend, q.device) or decode_attention
        with record_function("ltri.attend_decode"):
            local = fused(q, buf_k, buf_v, buf_mask, win_k, win_v, scaling=scaling, band_width=self.band_width,
                          want_key_mass=self.cfg.retrieves, softcap=softcap, win_len=length, q_mem=q_mem)
        self._pending = (k, v, local.key_mass, local.band)
        return local.out

    def graph_addresses(self) -> tuple:
        """``(address, shape)`` of every state tensor a retrieving graph-form step reads besides
        :meth:`graph_inputs` (window and memory buffers, sinks, span tables, the layer's pool rows, page tables and
        positions): a captured step is valid while these stay where they were."""
        device = self.sink_k.device
        tensors = [*self.window_storage(), *self._graph_memory, self.sink_k, self.sink_v]
        tensors.extend(self.pool.device_rows(self.layer_idx) or ())
        tensors.extend(self.pool.host_rows(self.layer_idx) or ())  # read in place with zero_copy_host_pages
        tensors.extend(self.pool.host_cache(self.layer_idx, device) or ())
        for seq, table in enumerate(self.tables):
            padded, valid, _, scale = table.layout()
            tensors.extend((padded, valid, scale, table.starts_on(device),
                            *table.geometry_on(device), *self.pool.device_lookups(seq)))
        return tuple((t.data_ptr(), tuple(t.shape)) for t in tensors if t is not None)
