"""A layer's memory part on the torch path: gathered from the pool, laid out and positioned (a base of
:class:`~ltri_rag.layer.GlobalLayerState`).

This is the path of the plain-torch backend (the CPU; a GPU run with ``attention_backend="torch"``) and of the
reuse steps of captured decode graphs: the selected spans' slot lists are turned into ``[B, Hkv, M, D]`` memory
K/V (sinks first), a key mask and the keys' positions, and the keys are moved to the positions of the scheme.

**Placed memory reused between decode steps** (``REUSE_PLACED_MEMORY``): a decoded token may select exactly the spans
the token before it selected (Qwen2.5-0.5B greedy decoding after essays: 23% of layer-steps at 8K, 6% at 16K;
``benchmarks/results/cpu_decode``), and between two evictions the memory part's position anchor (``pos0 - window
length``) does not move either. The placed memory is a function of the slot lists, that anchor, the sinks and the pool's
contents alone, so a decode step whose slot lists and anchor equal the last step's (and whose pool and sinks are
unchanged) takes the last step's placed K/V and mask instead of gathering and rotating them again: the same tensors, bit
for bit. The selection itself runs at every step (it decides the slot lists, and its votes and persistence are state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from ltri_rag.kernels.transfer import to_device
from ltri_rag.rope import rotate

if TYPE_CHECKING:
    from ltri_rag.config import LtriConfig
    from ltri_rag.layer import StepPlan
    from ltri_rag.pool import PagedKVPool
    from ltri_rag.span_memory import SpanTable

__all__ = ["REUSE_PLACED_MEMORY", "HostMemory"]

REUSE_PLACED_MEMORY = True
"""Whether a decode step on the torch path whose slot lists, position anchor, sinks and pool equal the last decode
step's reuses that step's placed memory K/V and mask (the same values; see the module docstring). False builds it
at every step (for comparisons)."""

Placed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (q_mem, mem_k, mem_v, mask)


class HostMemory:
    """The torch path's memory part (a base of :class:`~ltri_rag.layer.GlobalLayerState`, which sets the attributes
    read here and provides ``_selections`` / ``_selects_on_device``)."""

    layer_idx: int
    cfg: LtriConfig
    pool: PagedKVPool | None
    tables: list[SpanTable]
    inv_freq: torch.Tensor
    sink_k: torch.Tensor | None
    sink_v: torch.Tensor | None
    win_k: torch.Tensor | None
    _last_slots: list[torch.Tensor]
    _placed_reuse: tuple | None  # (key, sinks, slot lists, mem_k, mem_v, mask) of the last decode step, or None
    placed_reuses: int  # decode steps that reused the placed memory (for reporting and tests)

    def _kv_shape(self, q: torch.Tensor) -> tuple[int, int, torch.dtype]:
        """``(num_kv_heads, head_dim, dtype)`` of this layer's K/V: from the sinks or the window, or, in a pass
        before either holds a token (no sinks configured, memory imported into a fresh session), from the span
        table and the queries."""
        ref = self.sink_k if self.sink_k is not None else self.win_k
        if ref is not None:
            return ref.shape[1], ref.shape[3], ref.dtype
        table = self.tables[0]
        return table.num_kv_heads, table.head_dim, q.dtype

    def _slot_lists(self, q: torch.Tensor, plan: StepPlan, scaling: float,
                    position: torch.Tensor | None = None) -> tuple[list[torch.Tensor | None], bool]:
        """``(slots, on_device)``: per sequence the ``[Hkv, n]`` slot matrix of its selected spans (-1 past a row's
        tokens), or None for a sequence without spans; on the host with ``n`` the most tokens a row selected, or,
        selecting on the device (``on_device``), there with ``n`` the most any row can select. A graph-form step
        (``position`` given) selects on the device."""
        on_device = position is not None or self._selects_on_device(q)
        num_kv_heads = self._kv_shape(q)[0]
        out: list[torch.Tensor | None] = []
        for seq, selected in enumerate(self._selections(q, plan, scaling, on_device, position)):
            if selected is None:
                out.append(None)
            elif on_device:  # a fixed width: no row selects more than the budget (nor more than the memory holds)
                table = self.tables[seq]
                out.append(table.slot_matrix_fixed(selected, num_kv_heads, min(self.cfg.budget, table.num_tokens)))
            else:
                out.append(self.tables[seq].slot_matrix(selected, num_kv_heads))
        return out, on_device

    def _retrieved(self, slot_lists: list[torch.Tensor | None], on_device: bool,
                   device: torch.device) -> list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
        """Per sequence: ``(k, v, slots)`` of the slot lists of :meth:`_slot_lists`, ``k, v: [Hkv, n, D]`` on
        ``device``, or three Nones for a sequence without spans."""
        out = []
        for seq, slots in enumerate(slot_lists):
            if slots is None:
                out.append((None, None, None))
                continue
            with record_function("ltri.retrieve.gather"):
                if on_device:
                    k, v = self.pool.gather_on_device(self.layer_idx, seq, slots.clamp(min=0))
                else:
                    k, v = self.pool.gather(self.layer_idx, seq, slots.clamp(min=0), device)
            out.append((k, v, slots))
        return out

    def _memory(self, q: torch.Tensor, plan: StepPlan, scaling: float, position: torch.Tensor | None = None,
                slots: tuple[list[torch.Tensor | None], bool] | None = None) -> tuple[torch.Tensor, ...] | None:
        """Memory K/V ``[B, Hkv, M, D]``, key mask ``[B, Hkv, M]`` (on the device, and where the slot lists were
        made), positions ``[B, Hkv, M]`` (where the slot lists were made), or None if empty:
        ``(mem_k, mem_v, mask, pos, slot_mask)``. ``position``: see :meth:`_selections`; ``slots``: the pass's
        :meth:`_slot_lists` when already made."""
        if self.sink_k is None and not any(len(t) for t in self.tables):
            return None
        batch = q.shape[0]
        if not self.tables:
            parts = [(None, None, None)] * batch
        else:
            slot_lists, on_device = slots if slots is not None else self._slot_lists(q, plan, scaling, position)
            parts = self._retrieved(slot_lists, on_device, q.device)
        num_sinks = 0 if self.sink_k is None else self.sink_k.shape[2]
        num_kv_heads, head_dim, dtype = self._kv_shape(q)
        width = num_sinks + max((p[0].shape[1] if p[0] is not None else 0) for p in parts)
        if width == 0:
            return None
        mem_k = torch.zeros(batch, num_kv_heads, width, head_dim, dtype=dtype, device=q.device)
        mem_v = torch.zeros(batch, num_kv_heads, width, head_dim, dtype=dtype, device=q.device)
        # built where the slot lists are (the host, or the device when selecting there): no read-back either way
        where = next((p[2].device for p in parts if p[2] is not None), torch.device("cpu"))
        host_mask = torch.zeros(batch, num_kv_heads, width, dtype=torch.bool, device=where)
        pos = torch.zeros(batch, num_kv_heads, width, dtype=torch.int64, device=where)
        if num_sinks:
            mem_k[:, :, :num_sinks] = self.sink_k
            mem_v[:, :, :num_sinks] = self.sink_v
            host_mask[:, :, :num_sinks] = True
            pos[:, :, :num_sinks] = torch.arange(num_sinks, device=where)
        for seq, (k, v, slot_list) in enumerate(parts):
            if k is None:
                continue
            n = k.shape[1]
            mem_k[seq, :, num_sinks:num_sinks + n] = k
            mem_v[seq, :, num_sinks:num_sinks + n] = v
            host_mask[seq, :, num_sinks:num_sinks + n] = slot_list >= 0
            pos[seq, :, num_sinks:num_sinks + n] = self.pool.positions(seq, slot_list.clamp(min=0))
        self._last_slots = [p[2] for p in parts if p[2] is not None]
        return mem_k, mem_v, to_device(host_mask, q.device), pos, host_mask

    def _place(self, q: torch.Tensor, mem_k: torch.Tensor, host_mask: torch.Tensor, pos: torch.Tensor,
               plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the position scheme (``host_mask``, ``pos``: from :meth:`_memory`, where the slot lists were made):
        returns (queries for the memory part, memory keys)."""
        scheme = self.cfg.position_scheme
        if scheme == "absolute":
            return q, mem_k
        if scheme == "fixed":  # every memory key at distance local_window from every query
            return self._memory_queries(q, plan), rotate(mem_k, -pos, self.inv_freq, self.cfg.attention_backend)
        # contiguous: memory tokens laid in order right before the local window
        count = host_mask.sum(dim=2, keepdim=True)  # [B, Hkv, 1]
        rank = torch.cumsum(host_mask.long(), dim=2) - 1
        win_len = 0 if self.win_k is None else self.win_k.shape[2]
        new_pos = (plan.pos0 - win_len) - count + rank  # the local part starts at pos0 - win_len
        delta = torch.where(host_mask, new_pos - pos, torch.zeros_like(pos))
        return q, rotate(mem_k, delta, self.inv_freq, self.cfg.attention_backend)

    def _memory_queries(self, q: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """The queries of the memory part (only the ``fixed`` scheme moves them)."""
        if self.cfg.position_scheme != "fixed":
            return q
        q_pos = torch.arange(plan.pos0, plan.pos0 + plan.q_len)
        return rotate(q, self.cfg.local_window - q_pos, self.inv_freq, self.cfg.attention_backend)

    # ------------------------------------------------------------------------------------------------ reuse
    def _reuse_key(self, q: torch.Tensor, plan: StepPlan) -> tuple:
        """What the placed memory depends on besides the slot lists and the sinks: the position anchor, the pool's
        contents (its write count), the device and dtype."""
        win_len = 0 if self.win_k is None else self.win_k.shape[2]
        writes = None if self.pool is None else self.pool.writes
        return plan.pos0 - win_len, writes, q.device, q.dtype

    def _host_placed(self, q: torch.Tensor, plan: StepPlan, scaling: float) -> Placed | None:
        """The torch path's ``(q_mem, mem_k, mem_v, mask)`` of this pass, or None when the memory is empty; a decode
        step reuses the last decode step's placed memory when it would build the same (``REUSE_PLACED_MEMORY``)."""
        if self.sink_k is None and not any(len(t) for t in self.tables):
            return None
        slots = self._slot_lists(q, plan, scaling) if self.tables else None
        reusable = REUSE_PLACED_MEMORY and plan.decode and q.shape[2] == 1 and (slots is None or not slots[1])
        key = self._reuse_key(q, plan) if reusable else None
        if not reusable:
            self._placed_reuse = None  # prompt passes: hold nothing
        elif self._placed_reuse is not None and _same(self._placed_reuse, key, self.sink_k, slots):
            _, _, _, mem_k, mem_v, mask = self._placed_reuse
            self._last_slots = [s for s in slots[0] if s is not None] if slots is not None else []
            self.placed_reuses += 1
            return self._memory_queries(q, plan), mem_k, mem_v, mask
        memory = self._memory(q, plan, scaling, slots=slots)
        if memory is None:
            self._placed_reuse = None
            return None
        mem_k, mem_v, mask, pos, host_mask = memory
        q_mem, mem_k = self._place(q, mem_k, host_mask, pos, plan)
        if reusable:
            self._placed_reuse = (key, self.sink_k, None if slots is None else slots[0], mem_k, mem_v, mask)
        return q_mem, mem_k, mem_v, mask


def _same(cached: tuple, key: tuple, sinks: torch.Tensor | None,
          slots: tuple[list[torch.Tensor | None], bool] | None) -> bool:
    """Whether ``cached`` (see :meth:`HostMemory._host_placed`) was built from ``key``, the same sink tensor (a new
    one whenever the sinks change; the cache holds the old one, so its identity cannot be reused) and the same slot
    lists."""
    if cached[0] != key or cached[1] is not sinks:
        return False
    old, new = cached[2], None if slots is None else slots[0]
    if old is None or new is None:
        return old is None and new is None
    return len(old) == len(new) and all(
        (a is None and b is None) or (a is not None and b is not None and a.shape == b.shape and torch.equal(a, b))
        for a, b in zip(old, new))
