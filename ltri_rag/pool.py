"""A paged pool for the K/V of evicted tokens, in two tiers: the compute device first, pinned host memory beyond.

Layout per layer: pages ``[num_pages, page_size, num_kv_heads, head_dim]`` (token-major pages, heads inside, as in
paged-attention engines). Each sequence has one page table, shared by every layer (all layers evict the same tokens
at the same time); a sequence's evicted tokens get consecutive *slots* ``0, 1, 2, ...``, and slot ``s`` lives at
``page_table[s // page_size]``, offset ``s % page_size``. Spans of any length are slot ranges, so variable-length
spans, kernels and persistence all read the same layout.

Tiers: pages ``0 .. device_pages - 1`` live on ``device`` (the GPU: a retrieval gathers them at HBM speed), pages
from ``device_pages`` on live in host memory (pinned: the GPU reads and writes them in place with ``zero_copy``;
otherwise a retrieval gathers their rows into a pinned buffer and copies it over PCIe). Pages are handed out in
order, so a stream's first ``device_pages`` pages (across its sequences) stay on the device and the rest spill to
the host; nothing moves between tiers. With ``device_pages`` None there is one tier.

``zero_copy``: the GPU reads and writes pinned host pages itself (:mod:`ltri_rag.kernels.triton_gather`), so the
host neither gathers nor scatters rows nor waits for a device-to-host copy. Its writes land in stream order; a
host-side read of a tier the device wrote waits for them first (:meth:`PagedKVPool._await_device_writes`).

Host-row cache (``host_cache_tokens`` > 0, with a host tier): per layer a direct-mapped device copy of host-tier rows
that recent retrievals read (``host_cache_tokens * Hkv`` rows; :mod:`ltri_rag.host_cache`), read and filled by the
one-launch assembly (:mod:`ltri_rag.kernels.triton_assemble` explains lines and tags). A decode step mostly
retrieves what the step before it did, so after the first steps most selected host rows are read from HBM instead
of over PCIe. Writes into the host tier drop the lines of the rows they overwrite.

Each slot also records the position its token was read at (host ``int64``), set by whoever fills the slot: a
stream evicts its tokens in order, a stored document's tokens keep the positions they had when it was read.
"""

from __future__ import annotations

import numpy as np
import torch

from ltri_rag.host_cache import HostRowCache
from ltri_rag.pool_tier import PoolTier
from ltri_rag.kernels.transfer import extend_mirror, to_device
from ltri_rag.kernels.triton_gather import gather_two_tiers, scatter_rows, triton_available

__all__ = ["PagedKVPool"]

_CPU = torch.device("cpu")


class PagedKVPool:
    """Per-layer paged K/V storage with one page table per sequence.

    Args:
        batch_size: Number of sequences.
        page_size: Tokens per page.
        device: Where pages live (``cpu`` for offload): the first tier.
        pin_memory: Pin host pages (faster, asynchronous copies to a GPU).
        device_pages: Most pages kept on ``device`` (a GPU); pages past them live in (pinned) host memory. None:
            every page on ``device`` (with ``device`` the CPU, both tiers are host memory).
        zero_copy: A GPU reads and writes the pinned host pages in place (module docstring); needs
            ``pin_memory`` and Triton, and is ignored without them.
        host_cache_tokens: Tokens per layer of the device cache of host-tier rows (module docstring); 0: none.
            Allocated on ``device`` for a layer when it first reads a host tier through :meth:`host_cache`.
    """

    def __init__(self, batch_size: int, page_size: int, device: torch.device, pin_memory: bool = False,
                 device_pages: int | None = None, zero_copy: bool = False, host_cache_tokens: int = 0) -> None:
        if device_pages is not None and (not isinstance(device_pages, int) or device_pages < 0):
            raise ValueError(f"device_pages must be a non-negative int or None, got {device_pages!r}")
        if not isinstance(host_cache_tokens, int) or host_cache_tokens < 0:
            raise ValueError(f"host_cache_tokens must be a non-negative int, got {host_cache_tokens!r}")
        self.host_cache_tokens = host_cache_tokens
        self._host_cache = HostRowCache(host_cache_tokens, device) if host_cache_tokens else None
        self.page_size = page_size
        self.device = device
        self.pin_memory = pin_memory and device.type == "cpu"
        self.device_pages = device_pages
        self.zero_copy = bool(zero_copy) and pin_memory and triton_available()
        self._device_writes: torch.cuda.Event | None = None  # the last in-place write into a host tier
        self.page_tables: list[list[int]] = [[] for _ in range(batch_size)]
        self.num_slots: list[int] = [0] * batch_size
        self._next_page = 0
        self._fast = PoolTier(device, pin_memory, device_pages)
        # the overflow tier (pages from device_pages on): host memory, pinned for copies to a GPU
        self._slow = None if device_pages is None else PoolTier(_CPU, pin_memory, None)
        self._split = device_pages  # first page of the overflow tier
        # host int64 position per slot, in buffers that grow by doubling (slot s of sequence q at _positions[q][s];
        # entries at or past num_slots[q] are unused); the page tables as tensors, rebuilt only when pages are added
        self._positions = [torch.zeros(0, dtype=torch.int64) for _ in range(batch_size)]
        self._table_tensors: list[torch.Tensor | None] = [None] * batch_size
        # device copies for lookups without the host (see gather_on_device): page tables, rebuilt when pages are
        # added, and positions, of which the first ``_positions_synced[q]`` entries are current
        self._device_tables: list[torch.Tensor | None] = [None] * batch_size
        self._device_positions: list[torch.Tensor | None] = [None] * batch_size
        self._positions_synced = [0] * batch_size
        self.writes = 0  # K/V or position writes so far: what was read from the pool before may have changed since

    @property
    def num_pages(self) -> int:
        """Pages handed out so far."""
        return self._next_page

    @property
    def pages_on_device(self) -> int:
        """Pages handed out that live on the (GPU) device tier; the rest live in host memory."""
        if self.device.type == "cpu":
            return 0
        return self._next_page if self._split is None else min(self._next_page, self._split)

    def reserve(self, num_new: int) -> int:
        """Give every sequence room for ``num_new`` more slots; return the first new slot (same for all)."""
        first = self.num_slots[0]
        if any(n != first for n in self.num_slots):
            raise RuntimeError(f"sequences are out of step: slots {self.num_slots}")
        for seq, table in enumerate(self.page_tables):
            needed = -(-(first + num_new) // self.page_size)
            while len(table) < needed:
                table.append(self._next_page)
                self._next_page += 1
                self._table_tensors[seq] = self._device_tables[seq] = None
            self.num_slots[seq] = first + num_new
            buf = self._positions[seq]
            if buf.numel() < first + num_new:  # amortised O(1) per slot: a stream reserves a few slots per step
                grown = torch.empty(max(first + num_new, 2 * buf.numel(), 64), dtype=torch.int64)
                grown[:first] = buf[:first]
                self._positions[seq] = buf = grown
            buf[first:first + num_new] = -1
            self._positions_synced[seq] = min(self._positions_synced[seq], first)
        try:
            self._fast.grow(self._next_page)
            if self._slow is not None:
                self._slow.grow(max(self._next_page - self._split, 0))
        except BaseException:  # out of memory, say: no slot is reserved (the new pages stay listed, for reuse)
            self.num_slots = [first] * len(self.num_slots)
            raise
        return first

    def reserve_capacity(self, num_slots: int) -> None:
        """Make room, at once and without doubling, for every sequence to hold ``num_slots`` slots in all (e.g. a
        prompt of known length about to be read): the tiers are sized to the pages that needs, so they are not
        regrown (copied) while it is read, and hold no doubling's spare room (at 1M tokens of an 8B model, tens of
        GiB of pinned host memory). Growth past it doubles as usual."""
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        per_seq = -(-num_slots // self.page_size)
        pages = self._next_page + sum(max(0, per_seq - len(table)) for table in self.page_tables)
        self._fast.grow(pages, exact=True)
        if self._slow is not None and pages > self._split:
            self._slow.grow(pages - self._split, exact=True)

    def unreserve(self, first_slot: int) -> None:
        """Give back slots from ``first_slot`` on (a step that reserved them failed); their pages stay for reuse."""
        if any(n < first_slot for n in self.num_slots):
            raise ValueError(f"cannot unreserve from slot {first_slot}: sequences hold {self.num_slots}")
        self.writes += 1
        self.num_slots = [first_slot] * len(self.num_slots)

    def set_positions(self, seq: int, first_slot: int, positions: torch.Tensor) -> None:
        """Record the positions ``[n]`` (int64) of the tokens at slots ``first_slot .. first_slot + n - 1``."""
        positions = positions.to("cpu", torch.int64).reshape(-1)
        end = first_slot + positions.numel()
        if first_slot < 0 or end > self.num_slots[seq]:
            raise IndexError(f"slots {first_slot}..{end - 1} not reserved (sequence {seq} has {self.num_slots[seq]})")
        self.writes += 1
        self._positions[seq][first_slot:end] = positions
        self._positions_synced[seq] = min(self._positions_synced[seq], first_slot)

    def positions(self, seq: int, slots: torch.Tensor) -> torch.Tensor:
        """Positions (``int64``, the shape of ``slots``) of the tokens at ``slots`` (reserved slots only): on the
        host for host ``slots``; on ``slots``' device from a device copy (no read-back) otherwise."""
        if slots.device.type == "cpu":
            return self._positions[seq][: self.num_slots[seq]][slots.to(torch.int64)]
        return self._positions_on(seq, slots.device)[slots]

    def _positions_on(self, seq: int, device: torch.device) -> torch.Tensor:
        """``[num_slots]`` positions of ``seq`` on ``device``, extended by copying only the entries that changed."""
        end = self.num_slots[seq]
        self._device_positions[seq] = extend_mirror(self._positions[seq], end, self._device_positions[seq],
                                                    self._positions_synced[seq], device)
        self._positions_synced[seq] = end
        return self._device_positions[seq]

    def _first_tier_on(self, device: torch.device) -> bool:
        """Whether the first tier lives on ``device`` (an unindexed device matches any index of its type)."""
        mine, other = self.device, torch.device(device)
        return mine.type == other.type and (mine.index is None or other.index is None or mine.index == other.index)

    def on_device_tier(self, seq: int, device: torch.device) -> bool:
        """Whether every page of ``seq`` lives in the first tier and that tier is ``device`` (so
        :meth:`gather_on_device` can read them)."""
        if not self._first_tier_on(device):
            return False
        if self._split is None or self._next_page <= self._split:  # every page handed out is in the first tier
            return True
        table = self.page_tables[seq]
        # pages are handed out in increasing order and only appended, so the last is the largest (a max over the
        # table was a pass over ~16K pages per layer and decode step at 1M tokens: 4.9 ms per step on the H200)
        return not table or table[-1] < self._split

    def readable_on(self, seq: int, device: torch.device, host_pages: bool = False) -> bool:
        """Whether :meth:`gather_on_device` can read every page of ``seq`` from ``device``: all of them in the
        first tier on that device (:meth:`on_device_tier`), or, with ``host_pages``, some in the host tier too where
        ``device`` can read it directly (the CPU, or a GPU reading pinned host memory through a Triton kernel:
        :mod:`ltri_rag.kernels.triton_gather`)."""
        if self.on_device_tier(seq, device):
            return True
        if not host_pages or self._slow is None or not self._first_tier_on(device):
            return False
        kind = torch.device(device).type
        return kind == "cpu" or (kind == "cuda" and self._slow.pin_memory and triton_available())

    def host_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The host tier's K and V of ``layer`` as ``[tokens * Hkv, D]`` rows (tokens counted from the tier's
        first), or None without a host tier or before the layer stored anything."""
        if self._slow is None or layer not in self._slow.k:
            return None
        return self._slow.rows(layer)

    def host_cache(self, layer: int, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """The layer's device cache of host-tier rows, ``(tags [C] int64, k [C, D], v [C, D], epoch [1] int64)`` on
        the first tier's device (:mod:`ltri_rag.host_cache`; allocated at the first call, empty), or None: no cache
        configured, no host tier, nothing stored in the layer yet, or ``device`` is not the first tier's."""
        if self._host_cache is None or self._slow is None or layer not in self._slow.k \
                or not self._first_tier_on(device):
            return None
        return self._host_cache.layer(layer, self._slow.k[layer])

    @property
    def host_cache_stats(self) -> torch.Tensor | None:
        """The cache's hit counters (:attr:`ltri_rag.host_cache.HostRowCache.stats`), or None without a cache."""
        return None if self._host_cache is None else self._host_cache.stats

    def _device_table(self, seq: int, device: torch.device) -> torch.Tensor:
        """``[pages]`` int64 page table of ``seq`` on ``device`` (copied again only when pages were added)."""
        table = self._device_tables[seq]
        if table is None or table.device != torch.device(device):
            table = self._device_tables[seq] = to_device(torch.tensor(self.page_tables[seq], dtype=torch.int64),
                                                         device)
        return table

    def prepare_on_device(self, seq: int, device: torch.device) -> None:
        """Bring ``seq``'s page table and slot positions up to date on ``device`` now, so that
        :meth:`gather_on_device` and :meth:`positions` of device slots copy nothing until the pool changes (what
        a step captured as a CUDA graph needs)."""
        self._device_table(seq, device)
        self._positions_on(seq, torch.device(device))

    def device_lookups(self, seq: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The device page table and positions of ``seq`` as last prepared (None where none is kept)."""
        return self._device_tables[seq], self._device_positions[seq]

    def gather_on_device(self, layer: int, seq: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`gather` for ``slots: [num_kv_heads, n]`` (valid, reserved slots) on the first tier's device, with
        the slot arithmetic on that device: nothing is read back. Pages in the host tier are read from there
        directly (:func:`~ltri_rag.kernels.triton_gather.gather_two_tiers`; see :meth:`readable_on`)."""
        num_kv_heads, n = slots.shape
        device = slots.device
        table = self._device_table(seq, device)
        flat = table[slots // self.page_size] * self.page_size + slots % self.page_size  # [Hkv, n]
        rows = (flat * num_kv_heads + torch.arange(num_kv_heads, device=device)[:, None]).reshape(-1)
        k_rows, v_rows, slow_k, slow_v, split_row = self._tier_rows(layer, seq, device)
        head_dim = k_rows.shape[1]
        if slow_k is None:
            k, v = k_rows.index_select(0, rows), v_rows.index_select(0, rows)
        else:  # rows from split_row on live in the host tier
            k, v = gather_two_tiers(k_rows, v_rows, slow_k, slow_v, rows, split_row)
        return k.view(num_kv_heads, n, head_dim), v.view(num_kv_heads, n, head_dim)

    def _tier_rows(self, layer: int, seq: int, device: torch.device) -> tuple:
        """``(fast_k, fast_v, slow_k, slow_v, split_row)``: the layer's tiers as ``[rows, D]`` (the host tier's None
        when every page of ``seq`` is in the device tier; ``split_row`` its first row, the tiers counted as one).
        The layer must have stored something."""
        fast_k, fast_v = self._fast.rows(layer)
        host = None if self.on_device_tier(seq, device) else self.host_rows(layer)
        if host is None:
            return fast_k, fast_v, None, None, fast_k.shape[0]
        num_kv_heads = self._fast.k[layer].shape[2]
        return fast_k, fast_v, host[0], host[1], self._split * self.page_size * num_kv_heads

    def device_sources(self, layer: int, seq: int, device: torch.device) -> tuple:
        """What a one-launch memory assembly reads for ``seq`` (:mod:`ltri_rag.kernels.triton_assemble`), on
        ``device`` (copied only when the pool changed): ``(page_table, positions, fast_k, fast_v, slow_k, slow_v,
        split_row)``, the tiers as ``[rows, D]`` (``slow_k`` / ``slow_v`` None when every page of ``seq`` is in the
        device tier, all four None before the layer stored anything; ``split_row``: the host tier's first row,
        tiers counted as one)."""
        device = torch.device(device)
        table = self._device_table(seq, device)
        positions = self._positions_on(seq, device)
        if layer not in self._fast.k:  # the layer stored nothing yet
            return table, positions, None, None, None, None, 0
        return (table, positions, *self._tier_rows(layer, seq, device))

    def _flat_index(self, seq: int, slots: torch.Tensor) -> torch.Tensor:
        """Host ``int64`` flat token index (``page * page_size + offset``) of each of ``slots``
        (:meth:`token_index_host` on a tensor)."""
        return torch.from_numpy(self.token_index_host(seq, slots.to("cpu", torch.int64).numpy()))

    # ---------------------------------------------------------------- host plans for one-launch gathers
    def token_index_host(self, seq: int, slots: np.ndarray) -> np.ndarray:
        """Flat token index (``page * page_size + offset``, both tiers counted from page 0) of each of ``slots``
        (a NumPy int64 array of reserved slots, any shape), in NumPy: the host arithmetic of a gather planned for
        one device launch (see :mod:`ltri_rag.assembly`).

        Raises:
            IndexError: a slot that is not reserved.
        """
        if slots.size:
            hi, lo = int(slots.max()), int(slots.min())
            if hi >= self.num_slots[seq] or lo < 0:
                bad = hi if hi >= self.num_slots[seq] else lo
                raise IndexError(f"slot {bad} not reserved (sequence {seq} has {self.num_slots[seq]})")
        table = self._table_tensors[seq]
        if table is None:
            table = self._table_tensors[seq] = torch.tensor(self.page_tables[seq], dtype=torch.int64)
        return table.numpy()[slots // self.page_size] * self.page_size + slots % self.page_size

    def positions_host(self, seq: int) -> np.ndarray:
        """``[num_slots]`` positions of ``seq``'s slots as a NumPy view (valid until the next :meth:`reserve`)."""
        return self._positions[seq][: self.num_slots[seq]].numpy()

    @property
    def host_tier_first_token(self) -> int | None:
        """The first flat token index that lives in the host tier (None: one tier)."""
        return None if self._slow is None else self._split * self.page_size

    def device_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first tier's K and V of ``layer`` as ``[tokens * Hkv, D]`` rows (row ``token * Hkv + head``), or
        None if the layer has stored nothing yet."""
        if layer not in self._fast.k:
            return None
        return self._fast.rows(layer)

    def gather_host_rows(self, layer: int, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Rows ``[n]`` (host int64, ``token * Hkv + head`` with tokens counted from the host tier's first) of the
        host tier as ``[n, D]`` K and V on ``device``, copied asynchronously from pinned memory."""
        return self._gather_tier(self._slow, layer, rows, device)

    def _ensure_layer(self, layer: int, k: torch.Tensor) -> None:
        for tier in (self._fast, self._slow):
            if tier is not None:
                tier.ensure_layer(layer, self.page_size, k.shape[1], k.shape[2], k.dtype)

    def write(self, layer: int, seq: int, first_slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v: [num_tokens, num_kv_heads, head_dim]`` at slots ``first_slot, first_slot + 1, ...``."""
        self.write_layers([layer], seq, first_slot, k[None], v[None])

    def write_layers(self, layers: list[int], seq: int, first_slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k[i], v[i]`` (``k, v: [len(layers), num_tokens, num_kv_heads, head_dim]``) for layer
        ``layers[i]`` at slots ``first_slot, first_slot + 1, ...``: the slot arithmetic and its copy to the device
        are done once for every layer (all layers evict the same tokens)."""
        if k.shape[0] != len(layers) or v.shape != k.shape:
            raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match {len(layers)} layers")
        self.writes += 1
        for layer in layers:
            self._ensure_layer(layer, k[0])
        num_tokens, num_kv_heads, head_dim = k.shape[1:]
        flat = self._flat_index(seq, torch.arange(first_slot, first_slot + num_tokens))
        split_row = None if self._slow is None else self._split * self.page_size
        on_fast = None if split_row is None else flat < split_row  # host bool [n]
        for tier, select, offset in ((self._fast, on_fast, 0), (self._slow, None if on_fast is None else ~on_fast,
                                                                 split_row)):
            if tier is None:
                continue
            if select is None:
                idx, src_k, src_v = flat, k, v
            else:
                if not bool(select.any()):
                    continue
                pick = torch.nonzero(select).reshape(-1)  # host; the token rows of k / v going to this tier
                idx = flat[pick] - offset
                pick_dev = to_device(pick, k.device)
                src_k, src_v = k.index_select(1, pick_dev), v.index_select(1, pick_dev)
            if tier is self._slow and self._host_cache is not None:
                self._host_cache.drop(layers, idx, num_kv_heads)
            if self._in_place(tier, k.device):  # the device writes the pinned host pages itself
                self._scatter_in_place(tier, layers, idx, src_k, src_v)
                continue
            idx = to_device(idx, tier.device)  # slot arithmetic on the host, copied without a device sync
            src_k, src_v = src_k.to(tier.device), src_v.to(tier.device)
            for i, layer in enumerate(layers):
                tk = tier.k[layer].view(-1, num_kv_heads, head_dim)
                tv = tier.v[layer].view(-1, num_kv_heads, head_dim)
                tk[idx] = src_k[i].to(tk.dtype)
                tv[idx] = src_v[i].to(tv.dtype)

    def _in_place(self, tier: PoolTier, device: torch.device) -> bool:
        """Whether ``device`` reads and writes ``tier`` in place: ``zero_copy``, a pinned host tier, a GPU."""
        return self.zero_copy and tier.pin_memory and torch.device(device).type == "cuda"

    def _scatter_in_place(self, tier: PoolTier, layers: list[int], idx: torch.Tensor, src_k: torch.Tensor,
                          src_v: torch.Tensor) -> None:
        """Write ``src_k[i], src_v[i]`` (``[L, n, Hkv, D]`` on the GPU) at the tier's token rows ``idx`` (``[n]``
        host int64) of ``layers[i]``, by the GPU into the pinned pages (recorded for host readers)."""
        device = src_k.device
        num_kv_heads, head_dim = src_k.shape[2], src_k.shape[3]
        idx = to_device(idx, device)
        rows = (idx[:, None] * num_kv_heads + torch.arange(num_kv_heads, device=device)).reshape(-1)  # [n * Hkv]
        for i, layer in enumerate(layers):
            dst_k, dst_v = tier.rows(layer)
            scatter_rows(dst_k, dst_v, rows, src_k[i].reshape(-1, head_dim).to(dst_k.dtype).contiguous(),
                         src_v[i].reshape(-1, head_dim).to(dst_v.dtype).contiguous())
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._device_writes = event

    def _await_device_writes(self) -> None:
        """Wait until the device's in-place writes into host pages have landed (before the host reads them)."""
        if self._device_writes is not None:
            self._device_writes.synchronize()
            self._device_writes = None

    def _gather_tier(self, tier: PoolTier, layer: int, rows: torch.Tensor, device: torch.device,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[n]`` (host int64, indices into the tier's ``[pages * page_size * Hkv, D]``) as ``[n, D]`` K
        and V on ``device``. From pinned host pages to a GPU the rows are gathered into a pinned buffer and copied
        asynchronously (torch's pinned allocator keeps the buffer alive until the copy is done), so the host does
        not wait for the transfer; with ``zero_copy`` the GPU reads them in place instead."""
        if self._in_place(tier, device):
            src_k, src_v = tier.rows(layer)
            none = torch.empty(0, src_k.shape[1], dtype=src_k.dtype, device=device)  # no first tier
            return gather_two_tiers(none, none, src_k, src_v, to_device(rows, device), 0)
        staged = tier.pin_memory and device.type == "cuda"
        if tier.device.type == "cpu":
            self._await_device_writes()
        rows = to_device(rows, tier.device)
        out = []
        for src in tier.rows(layer):
            if staged:
                buf = torch.empty(rows.numel(), src.shape[1], dtype=src.dtype, pin_memory=True)
                torch.index_select(src, 0, rows, out=buf)
                out.append(buf.to(device, non_blocking=True))
            else:
                out.append(src.index_select(0, rows).to(device))
        return out[0], out[1]

    def gather(self, layer: int, seq: int, slots: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """K/V of ``slots: [num_kv_heads, n]`` (per head) as ``[num_kv_heads, n, head_dim]`` tensors on ``device``.

        One ``index_select`` per tensor and tier over the pages seen as ``[slots * num_kv_heads, head_dim]`` rows;
        rows of both tiers are put together on ``device``.
        """
        num_kv_heads, n = slots.shape
        flat = self._flat_index(seq, slots.reshape(-1)).view(num_kv_heads, n)
        head_dim = self._fast.k[layer].shape[3]
        rows = (flat * num_kv_heads + torch.arange(num_kv_heads)[:, None]).reshape(-1)  # host [Hkv * n]
        split_row = None if self._slow is None else self._split * self.page_size * num_kv_heads
        if split_row is None or rows.numel() == 0 or int(rows.max()) < split_row:
            k, v = self._gather_tier(self._fast, layer, rows, device)
        elif int(rows.min()) >= split_row:
            k, v = self._gather_tier(self._slow, layer, rows - split_row, device)
        else:
            on_fast = rows < split_row
            fast_at, slow_at = torch.nonzero(on_fast).reshape(-1), torch.nonzero(~on_fast).reshape(-1)
            fk, fv = self._gather_tier(self._fast, layer, rows[fast_at], device)
            sk, sv = self._gather_tier(self._slow, layer, rows[slow_at] - split_row, device)
            k = torch.empty(rows.numel(), head_dim, dtype=fk.dtype, device=device)
            v = torch.empty_like(k)
            fast_dev, slow_dev = to_device(fast_at, device), to_device(slow_at, device)
            k[fast_dev], v[fast_dev] = fk, fv
            k[slow_dev], v[slow_dev] = sk, sv
        return k.view(num_kv_heads, n, head_dim), v.view(num_kv_heads, n, head_dim)
