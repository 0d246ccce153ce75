"""A layer's memory part in one device launch: the slot arithmetic on the host (NumPy), then one gather.

The memory part of a retrieving layer is ``[sink tokens | selected pool slots]`` per (sequence, KV head), keys
moved to the positions the scheme gives them. Built from torch operations it costs a few dozen launches per layer
and step (slot lists, page lookups per tier, zero-filled buffers, copies, the rotation), and the engine is
host-bound on launches. Here the host, which holds the selection, the span tables, the page tables and the slot
positions anyway, works out for every output row where it comes from and how far it moves, copies that plan over
in one asynchronous transfer, and :func:`~ltri_rag.kernels.triton_rope.gather_rotate_triton` builds the keys and
values in one launch. Pages in the pool's host tier are first gathered into a staging buffer (one copy per tensor).

Used by :class:`ltri_rag.layer.GlobalLayerState` when the Triton backend runs and spans are selected on the
host; the torch path (``layer_memory.HostMemory._memory`` / ``_place``) computes the same tensors and is the reference.
"""

from __future__ import annotations

import numpy as np
import torch

from ltri_rag.kernels.transfer import to_device
from ltri_rag.pool import PagedKVPool

__all__ = ["MemoryPlan", "build_memory", "plan_memory", "slot_lists"]


def slot_lists(selected: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Slots of the selected spans in text order, one row per selection row, padded with -1.

    Args:
        selected: ``[rows, num_spans]`` bool.
        starts, ends: ``[num_spans]`` int64 slot ranges of the spans (ends exclusive, starts increasing).

    Returns:
        ``[rows, width]`` int64, ``width`` the most tokens a row selected (what
        :meth:`ltri_rag.span_memory.SpanTable.slot_matrix` returns before expanding to the KV heads).
    """
    rows = selected.shape[0]
    per_row = []
    for row in range(rows):
        ids = np.flatnonzero(selected[row])
        lengths = ends[ids] - starts[ids]
        total = int(lengths.sum())
        before = np.cumsum(lengths) - lengths
        per_row.append(np.repeat(starts[ids] - before, lengths) + np.arange(total, dtype=np.int64))
    width = max((r.size for r in per_row), default=0)
    out = np.full((rows, width), -1, dtype=np.int64)
    for row, slots in enumerate(per_row):
        out[row, : slots.size] = slots
    return out


class MemoryPlan:
    """Where each row of a layer's memory part comes from, worked out on the host.

    Attributes:
        source: ``[B, Hkv, W]`` int64: ``>= 0`` the element offset of a row in the pool's device tier
            (``(token * Hkv + head) * D``); -1 an empty row; ``<= -2`` row ``-2 - source`` of the auxiliary rows
            (the sinks, ``[B * Hkv * num_sinks, D]`` in (sequence, head, sink) order, then the staged host-tier rows).
        positions: ``[B, Hkv, W]`` int64 position each row's key was read at (0 for empty rows).
        host_rows: ``[m]`` int64 host-tier rows (``token * Hkv + head``, tokens from the host tier's first) staged
            after the sinks, in order.
        slots: Per sequence the ``[rows, n]`` slot lists (-1 padded; ``rows`` 1 when one selection serves every
            KV head; None without spans), for reporting.
    """

    def __init__(self, source: np.ndarray, positions: np.ndarray, host_rows: np.ndarray,
                 slots: list[np.ndarray | None]) -> None:
        self.source = source
        self.positions = positions
        self.host_rows = host_rows
        self.slots = slots

    @property
    def valid(self) -> np.ndarray:
        """``[B, Hkv, W]`` bool: rows that hold a key."""
        return self.source != -1


def plan_memory(pool: PagedKVPool | None, selections: list[np.ndarray | None], starts: list[np.ndarray | None],
                ends: list[np.ndarray | None], num_sinks: int, num_kv_heads: int, head_dim: int) -> MemoryPlan | None:
    """The plan of a memory part (see :class:`MemoryPlan`), or None when it is empty.

    Args:
        pool: The pool the slots live in (None: sinks only).
        selections: Per sequence ``[rows, num_spans]`` bool (``rows`` 1 or ``num_kv_heads``), or None (no spans).
        starts, ends: Per sequence the span tables' slot ranges (host int64), or None.
        num_sinks: Sink tokens per (sequence, KV head), laid first.
        num_kv_heads, head_dim: Of the layer.
    """
    batch = len(selections)
    reported: list[np.ndarray | None] = []  # [rows, n] per sequence
    for selected, first, last in zip(selections, starts, ends):
        reported.append(None if selected is None or pool is None else slot_lists(selected, first, last))
    width = num_sinks + max((s.shape[1] for s in reported if s is not None), default=0)
    if width == 0:
        return None
    source = np.full((batch, num_kv_heads, width), -1, dtype=np.int64)
    positions = np.zeros((batch, num_kv_heads, width), dtype=np.int64)
    if num_sinks:
        sink = np.arange(num_sinks, dtype=np.int64)
        head = np.arange(batch * num_kv_heads, dtype=np.int64).reshape(batch, num_kv_heads, 1)
        source[:, :, :num_sinks] = -2 - (head * num_sinks + sink)
        positions[:, :, :num_sinks] = sink
    host_first = None if pool is None else pool.host_tier_first_token
    staged: list[np.ndarray] = []
    aux_next = batch * num_kv_heads * num_sinks
    all_heads = np.arange(num_kv_heads, dtype=np.int64)[:, None]
    for seq, lists in enumerate(reported):
        if lists is None or lists.shape[1] == 0:
            continue
        slot_positions = pool.positions_host(seq)
        shared = lists.shape[0] == 1  # one selection for every KV head
        for r in range(lists.shape[0]):
            taken = lists[r, : int((lists[r] >= 0).sum())]  # a row's slots are a prefix, -1 after
            if taken.size == 0:
                continue
            token = pool.token_index_host(seq, taken)  # [n]
            heads = slice(None) if shared else slice(r, r + 1)
            rows = token[None, :] * num_kv_heads + (all_heads if shared else r)  # [h, n]: token * Hkv + head
            cols = slice(num_sinks, num_sinks + taken.size)
            positions[seq, heads, cols] = slot_positions[taken][None, :]
            offsets = rows * head_dim
            if host_first is not None and int(token.max()) >= host_first:
                on_host = np.broadcast_to(token[None, :] >= host_first, rows.shape)
                count = int(on_host.sum())
                staged.append(rows[on_host] - host_first * num_kv_heads)
                offsets[on_host] = -2 - np.arange(aux_next, aux_next + count)
                aux_next += count
            source[seq, heads, cols] = offsets
    host_rows = np.concatenate(staged) if staged else np.zeros(0, dtype=np.int64)
    return MemoryPlan(source, positions, host_rows, reported)


def position_shifts(plan: MemoryPlan, scheme: str, first_local: int) -> np.ndarray | None:
    """``[B, Hkv, W]`` int64 shift of each row's key for ``scheme`` (None for ``absolute``: keys stay).

    ``contiguous``: the rows laid in order right before the local part, which starts at ``first_local``;
    ``fixed``: every key moved to position 0 (the queries are moved instead, see ``layer._memory_queries``).
    """
    if scheme == "absolute":
        return None
    valid = plan.valid
    if scheme == "fixed":
        return np.where(valid, -plan.positions, 0)
    # the valid rows of each (sequence, head) form a prefix: rank = column
    count = valid.sum(axis=2, keepdims=True)
    column = np.arange(valid.shape[2], dtype=np.int64)
    return np.where(valid, first_local - count + column - plan.positions, 0)


def build_memory(plan: MemoryPlan, shifts: np.ndarray | None, pool: PagedKVPool | None, layer: int,
                 sink_k: torch.Tensor | None, sink_v: torch.Tensor | None, inv_freq: torch.Tensor,
                 device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The memory part described by ``plan``: ``(mem_k, mem_v, mask)``, ``[B, Hkv, W, D]`` twice (keys shifted by
    ``shifts``) and ``[B, Hkv, W]`` bool, on ``device``, in one plan copy and one launch (plus the staging of
    host-tier rows, if any).

    Args:
        plan: From :func:`plan_memory`.
        shifts: From :func:`position_shifts`.
        pool: The pool of the plan's slots.
        layer: The layer whose pages are read.
        sink_k, sink_v: ``[B, Hkv, num_sinks, D]`` sink tokens (None without sinks).
        inv_freq: ``[rot_dim / 2]`` rotary inverse frequencies of the layer.
        device, dtype: Of the result (the model's).
    """
    from ltri_rag.kernels.triton_rope import gather_rotate_triton

    batch, num_kv_heads, width = plan.source.shape
    packed = plan.source if shifts is None else np.stack([plan.source, shifts])
    packed = to_device(torch.from_numpy(np.ascontiguousarray(packed)), device)
    source = packed if shifts is None else packed[0]
    delta = None if shifts is None else packed[1]
    aux_k = aux_v = None
    if sink_k is not None:
        head_dim = sink_k.shape[3]
        aux_k, aux_v = sink_k.reshape(-1, head_dim), sink_v.reshape(-1, head_dim)
    if plan.host_rows.size:
        hk, hv = pool.gather_host_rows(layer, torch.from_numpy(plan.host_rows), device)
        aux_k = hk if aux_k is None else torch.cat([aux_k, hk.to(aux_k.dtype)])
        aux_v = hv if aux_v is None else torch.cat([aux_v, hv.to(aux_v.dtype)])
    rows = None if pool is None else pool.device_rows(layer)
    main_k, main_v = rows if rows is not None else (aux_k, aux_v)
    k, v = gather_rotate_triton(main_k, main_v, source, delta, inv_freq, aux_k=aux_k, aux_v=aux_v, out_dtype=dtype)
    head_dim = k.shape[1]
    mask = source.view(batch, num_kv_heads, width) != -1
    return k.view(batch, num_kv_heads, width, head_dim), v.view(batch, num_kv_heads, width, head_dim), mask
