"""A paged pool for the K/V of evicted tokens.

Layout per layer: ``k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim]`` (token-major pages, heads
inside, as in paged-attention engines). Each sequence has one page table, shared by every layer (all layers evict
the same tokens at the same time); a sequence's evicted tokens get consecutive *slots* ``0, 1, 2, ...``, and slot
``s`` lives at ``page_table[s // page_size]``, offset ``s % page_size``. Spans of any length are slot ranges, so
variable-length spans, a device cache, kernels and persistence all read the same layout.

Each slot also records the position its token was read at (host ``int64``), set by whoever fills the slot: a
stream evicts its tokens in order, a stored document's tokens keep the positions they had when it was read.
"""

from __future__ import annotations

import torch

from ltri_rag.kernels.transfer import to_device

__all__ = ["PagedKVPool"]


class PagedKVPool:
    """Per-layer paged K/V storage with one page table per sequence.

    Args:
        batch_size: Number of sequences.
        page_size: Tokens per page.
        device: Where pages live (``cpu`` for offload).
        pin_memory: Pin host pages (faster, asynchronous copies to a GPU).
    """

    def __init__(self, batch_size: int, page_size: int, device: torch.device, pin_memory: bool = False) -> None:
        self.page_size = page_size
        self.device = device
        self.pin_memory = pin_memory and device.type == "cpu"
        self.page_tables: list[list[int]] = [[] for _ in range(batch_size)]
        self.num_slots: list[int] = [0] * batch_size
        self._next_page = 0
        self._capacity = 0
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}
        # host int64 position per slot, in buffers that grow by doubling (slot s of sequence q at _positions[q][s];
        # entries at or past num_slots[q] are unused); the page tables as tensors, rebuilt only when pages are added
        self._positions = [torch.zeros(0, dtype=torch.int64) for _ in range(batch_size)]
        self._table_tensors: list[torch.Tensor | None] = [None] * batch_size

    @property
    def num_pages(self) -> int:
        """Pages handed out so far."""
        return self._next_page

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
                self._table_tensors[seq] = None
            self.num_slots[seq] = first + num_new
            buf = self._positions[seq]
            if buf.numel() < first + num_new:  # amortised O(1) per slot: a stream reserves a few slots per step
                grown = torch.empty(max(first + num_new, 2 * buf.numel(), 64), dtype=torch.int64)
                grown[:first] = buf[:first]
                self._positions[seq] = buf = grown
            buf[first:first + num_new] = -1
        self._grow(self._next_page)
        return first

    def unreserve(self, first_slot: int) -> None:
        """Give back slots from ``first_slot`` on (a step that reserved them failed); their pages stay for reuse."""
        if any(n < first_slot for n in self.num_slots):
            raise ValueError(f"cannot unreserve from slot {first_slot}: sequences hold {self.num_slots}")
        self.num_slots = [first_slot] * len(self.num_slots)

    def set_positions(self, seq: int, first_slot: int, positions: torch.Tensor) -> None:
        """Record the positions ``[n]`` (int64) of the tokens at slots ``first_slot .. first_slot + n - 1``."""
        positions = positions.to("cpu", torch.int64).reshape(-1)
        end = first_slot + positions.numel()
        if first_slot < 0 or end > self.num_slots[seq]:
            raise IndexError(f"slots {first_slot}..{end - 1} not reserved (sequence {seq} has {self.num_slots[seq]})")
        self._positions[seq][first_slot:end] = positions

    def positions(self, seq: int, slots: torch.Tensor) -> torch.Tensor:
        """Positions (host ``int64``, the shape of ``slots``) of the tokens at ``slots`` (reserved slots only)."""
        return self._positions[seq][: self.num_slots[seq]][slots.to("cpu", torch.int64)]

    def _grow(self, pages: int) -> None:
        if pages <= self._capacity:
            return
        new_capacity = max(pages, 2 * self._capacity, 16)
        for store in (self._k, self._v):
            for layer, old in store.items():
                new = self._empty(new_capacity, old.shape[2], old.shape[3], old.dtype)
                new[: old.shape[0]].copy_(old)
                store[layer] = new
        self._capacity = new_capacity

    def _empty(self, pages: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(pages, self.page_size, num_kv_heads, head_dim, dtype=dtype, device=self.device,
                           pin_memory=self.pin_memory)

    def _flat_index(self, seq: int, slots: torch.Tensor) -> torch.Tensor:
        table = self._table_tensors[seq]
        if table is None:
            table = self._table_tensors[seq] = torch.tensor(self.page_tables[seq], dtype=torch.int64)
        slots = slots.to("cpu", torch.int64)
        if slots.numel() and (int(slots.max()) >= self.num_slots[seq] or int(slots.min()) < 0):
            bad = int(slots.max()) if int(slots.max()) >= self.num_slots[seq] else int(slots.min())
            raise IndexError(f"slot {bad} not reserved (sequence {seq} has {self.num_slots[seq]})")
        return table[slots // self.page_size] * self.page_size + slots % self.page_size

    def write(self, layer: int, seq: int, first_slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v: [num_tokens, num_kv_heads, head_dim]`` at slots ``first_slot, first_slot + 1, ...``."""
        if layer not in self._k:
            self._k[layer] = self._empty(self._capacity, k.shape[1], k.shape[2], k.dtype)
            self._v[layer] = self._empty(self._capacity, k.shape[1], k.shape[2], k.dtype)
        flat = self._flat_index(seq, torch.arange(first_slot, first_slot + k.shape[0]))
        hk = self._k[layer].view(-1, k.shape[1], k.shape[2])
        hv = self._v[layer].view(-1, k.shape[1], k.shape[2])
        flat = to_device(flat, self.device)  # slot arithmetic on the host, copied without a device sync
        hk[flat] = k.to(self.device, hk.dtype)
        hv[flat] = v.to(self.device, hv.dtype)

    def gather(self, layer: int, seq: int, slots: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """K/V of ``slots: [num_kv_heads, n]`` (per head) as ``[num_kv_heads, n, head_dim]`` tensors on ``device``.

        One ``index_select`` per tensor over the pool seen as ``[slots * num_kv_heads, head_dim]`` rows. From pinned
        host pages to a GPU the rows are gathered into a pinned buffer and copied asynchronously (torch's pinned
        allocator keeps the buffer alive until the copy is done), so the host does not wait for the transfer.
        """
        num_kv_heads, n = slots.shape
        flat = self._flat_index(seq, slots.reshape(-1)).view(num_kv_heads, n)
        pk, pv = self._k[layer], self._v[layer]
        head_dim = pk.shape[3]
        rows = to_device((flat * pk.shape[2] + torch.arange(num_kv_heads)[:, None]).reshape(-1), self.device)
        staged = self.pin_memory and device.type == "cuda"
        out = []
        for store in (pk, pv):
            src = store.view(-1, head_dim)
            if staged:
                buf = torch.empty(rows.numel(), head_dim, dtype=store.dtype, pin_memory=True)
                torch.index_select(src, 0, rows, out=buf)
                out.append(buf.view(num_kv_heads, n, head_dim).to(device, non_blocking=True))
            else:
                out.append(src.index_select(0, rows).view(num_kv_heads, n, head_dim).to(device))
        return out[0], out[1]
