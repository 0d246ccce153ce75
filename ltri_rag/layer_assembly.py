"""A layer's memory part from a selection made on the device, in one launch per sequence (a base of
:class:`~ltri_rag.layer.GlobalLayerState`).

Where a layer selects its spans on the device (captured decode steps, ``LtriConfig.selection_on_device``), the torch
path builds the memory part from the slot lists in some twenty-five launches per layer (``HostMemory._memory``
and ``_place``). With ``FUSED_DEVICE_ASSEMBLY`` each sequence's part is one launch of
:func:`~ltri_rag.kernels.triton_assemble.assemble_memory`, written straight into the destination (the graph
buffers of a captured step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ltri_rag.kernels import triton_assemble
from ltri_rag.kernels.triton_assemble import assemble_memory
from ltri_rag.layer_memory import HostMemory
from ltri_rag.rope import _triton_rotates

if TYPE_CHECKING:
    from ltri_rag.layer import StepPlan

__all__ = ["FUSED_DEVICE_ASSEMBLY", "DeviceAssembly"]

FUSED_DEVICE_ASSEMBLY = True
"""Whether a layer that selects its spans on the device (captured decode steps, ``selection_on_device``) builds its
memory part in one Triton launch per sequence (:mod:`ltri_rag.kernels.triton_assemble`: sinks and selected slots
looked up, rotated and written straight into the destination) instead of the torch path (some twenty-five launches
per layer). False keeps the torch path (for comparisons). On an H200 (Llama-3-8B shape, one run) decode went from
21.3 to 18.6 ms per token at 8K and 23.8 to 21.6 at 128K with it, and from 22.1 to 17.1 / 24.7 to 20.1 with device
selection for prompts too (``benchmarks/results/e2e_llama8b_h200/session18``)."""


class DeviceAssembly(HostMemory):
    """The one-launch memory assembly of a device-side selection (a base of
    :class:`~ltri_rag.layer.GlobalLayerState`, which sets the attributes read here; the layer attributes are
    declared by :class:`~ltri_rag.layer_memory.HostMemory`, whose torch path it replaces and whose
    ``_memory_queries`` it uses)."""

    def _assembles_on_device(self, q: torch.Tensor, position: torch.Tensor | None = None) -> bool:
        """Whether this pass selects on the device and builds its memory part there in one launch per sequence
        (``FUSED_DEVICE_ASSEMBLY``, the Triton backend on ``q``'s device, a span pool)."""
        if not FUSED_DEVICE_ASSEMBLY or self.pool is None or not _triton_rotates(self.cfg.attention_backend, q.device):
            return False
        return position is not None or self._selects_on_device(q)

    def _device_assembled_memory(self, q: torch.Tensor, plan: StepPlan, scaling: float,
                                 position: torch.Tensor | None = None,
                                 out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """:meth:`_placed_memory`'s ``(q_mem, mem_k, mem_v, mask)`` with the spans selected on the device and the
        part built by :func:`~ltri_rag.kernels.triton_assemble.assemble_memory` (into ``out``, ``[B, Hkv, cap, D]``
        twice and ``[B, Hkv, cap]``, when given: the graph buffers), or None when the memory is empty."""
        if self.sink_k is None and not any(len(t) for t in self.tables):
            return None
        batch = q.shape[0]
        selections = self._selections(q, plan, scaling, True, position) if self.tables else [None] * batch
        num_kv_heads, head_dim, dtype = self._kv_shape(q)
        num_sinks = 0 if self.sink_k is None else self.sink_k.shape[2]
        widths = [0 if s is None else min(self.cfg.budget, self.tables[i].num_tokens)
                  for i, s in enumerate(selections)]
        total = num_sinks + max(widths, default=0)
        if total == 0:
            return None
        fresh = out is None
        if fresh:
            make = torch.zeros if batch > 1 else torch.empty  # rows a shorter sequence leaves must read as empty
            out = (make(batch, num_kv_heads, total, head_dim, dtype=dtype, device=q.device),
                   make(batch, num_kv_heads, total, head_dim, dtype=dtype, device=q.device),
                   make(batch, num_kv_heads, total, dtype=torch.bool, device=q.device))
        win_len = 0 if self.win_k is None else self.win_k.shape[2]
        empty = torch.full((num_kv_heads, 0), -1, dtype=torch.int64, device=q.device)
        slot_lists = []
        for seq, selected in enumerate(selections):
            slots = empty if selected is None else self.tables[seq].slot_matrix_fixed(selected, num_kv_heads,
                                                                                        widths[seq])
            table, positions, fast_k, fast_v, slow_k, slow_v, split_row = self.pool.device_sources(
                self.layer_idx, seq, q.device)
            if fast_k is None:  # nothing stored yet, so no slot to read: any rows of the right width stand in
                fast_k = fast_v = out[0][seq].reshape(-1, head_dim)
            cache = None if slow_k is None else self.pool.host_cache(self.layer_idx, q.device)
            stats = self.pool.host_cache_stats if cache is not None and triton_assemble.COUNT_HOST_CACHE else None
            assemble_memory(slots, table, self.pool.page_size, positions, fast_k, fast_v, slow_k, slow_v, split_row,
                            None if self.sink_k is None else self.sink_k[seq],
                            None if self.sink_v is None else self.sink_v[seq], plan.pos0 - win_len, self.inv_freq,
                            self.cfg.position_scheme, out=(out[0][seq], out[1][seq], out[2][seq]), cache=cache,
                            stats=stats)
            if selected is not None:
                slot_lists.append(slots)
            if not fresh and num_sinks + widths[seq] < total:  # a shorter part than another sequence's
                out[2][seq, :, num_sinks + widths[seq]:total] = False
        self._last_slots = slot_lists
        return self._memory_queries(q, plan), out[0][:, :, :total], out[1][:, :, :total], out[2][:, :, :total]
