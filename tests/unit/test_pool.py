"""Unit tests for ``ltri_rag.pool.PagedKVPool`` (paged K/V storage of evicted tokens)."""

from __future__ import annotations

import pytest
import torch

from ltri_rag.pool import PagedKVPool

CPU = torch.device("cpu")


class Mirror:
    """Reference copy of what was written: ``data[(layer, seq)] = (k, v)`` as ``[slots, Hkv, D]`` tensors."""

    def __init__(self) -> None:
        self.data: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def write(self, layer, seq, first, k, v):
        if (layer, seq) not in self.data:
            shape = (0, *k.shape[1:])
            self.data[(layer, seq)] = (torch.zeros(shape, dtype=k.dtype), torch.zeros(shape, dtype=v.dtype))
        old_k, old_v = self.data[(layer, seq)]
        need = first + k.shape[0]
        if old_k.shape[0] < need:
            pad = (need - old_k.shape[0], *k.shape[1:])
            old_k = torch.cat([old_k, torch.full(pad, float("nan"), dtype=k.dtype)])
            old_v = torch.cat([old_v, torch.full(pad, float("nan"), dtype=v.dtype)])
        old_k[first:need] = k
        old_v[first:need] = v
        self.data[(layer, seq)] = (old_k, old_v)

    def gather(self, layer, seq, slots):
        k, v = self.data[(layer, seq)]
        heads = torch.arange(slots.shape[0])[:, None].expand_as(slots)
        return k[slots, heads], v[slots, heads]


def check_all(pool: PagedKVPool, mirror: Mirror, gen: torch.Generator, n: int = 37) -> None:
    for (layer, seq), (k_ref, _) in mirror.data.items():
        num_slots, num_kv_heads = k_ref.shape[0], k_ref.shape[1]
        # every slot, same for every head
        every = torch.arange(num_slots)[None, :].expand(num_kv_heads, -1)
        k, v = pool.gather(layer, seq, every, CPU)
        rk, rv = mirror.gather(layer, seq, every)
        assert torch.equal(k, rk) and torch.equal(v, rv), (layer, seq)
        # random slots, different per head
        slots = torch.randint(0, num_slots, (num_kv_heads, n), generator=gen)
        k, v = pool.gather(layer, seq, slots, CPU)
        rk, rv = mirror.gather(layer, seq, slots)
        assert k.shape == (num_kv_heads, n, k_ref.shape[2])
        assert torch.equal(k, rk) and torch.equal(v, rv), (layer, seq)
        # the same slots gathered with the slot arithmetic on the device (here the CPU), reading host-tier pages
        # in place (zero_copy_host_pages); without host pages allowed only a pool wholly in its first tier qualifies
        assert pool.readable_on(seq, CPU) == pool.on_device_tier(seq, CPU)
        assert pool.readable_on(seq, CPU, host_pages=True)
        k, v = pool.gather_on_device(layer, seq, slots)
        assert torch.equal(k, rk) and torch.equal(v, rv), (layer, seq)


def test_reserve_returns_first_new_slot_and_builds_page_tables():
    pool = PagedKVPool(batch_size=2, page_size=4, device=CPU)
    assert pool.reserve(3) == 0
    assert pool.num_slots == [3, 3]
    assert pool.reserve(6) == 3
    assert pool.num_slots == [9, 9]
    assert pool.reserve(0) == 9
    # 9 slots need 3 pages per sequence; pages are distinct across sequences
    assert [len(t) for t in pool.page_tables] == [3, 3]
    all_pages = [p for t in pool.page_tables for p in t]
    assert len(set(all_pages)) == len(all_pages) == pool.num_pages == 6
    assert pool.reserve(4) == 9
    assert [len(t) for t in pool.page_tables] == [4, 4]
    assert pool.num_pages == 8
    # each table increases (on_device_tier reads its last page as its largest)
    assert all(all(a < b for a, b in zip(t, t[1:])) for t in pool.page_tables)


def test_reserve_rejects_sequences_out_of_step():
    pool = PagedKVPool(batch_size=2, page_size=4, device=CPU)
    pool.reserve(2)
    pool.num_slots[1] = 5
    with pytest.raises(RuntimeError):
        pool.reserve(1)


@pytest.mark.parametrize("device_pages", [None, 0, 1, 5, 20, 1000])
def test_round_trip_across_pages_sequences_and_layers(device_pages):
    # device_pages: the first tier holds that many pages, the rest spill to the host tier (both tiers are host
    # memory here; the split, writes straddling it and gathers mixing both tiers are what is checked)
    gen = torch.Generator().manual_seed(0)
    batch, page_size = 3, 4
    pool = PagedKVPool(batch_size=batch, page_size=page_size, device=CPU, device_pages=device_pages)
    mirror = Mirror()
    layer_shapes = {0: (2, 8), 1: (2, 8), 5: (1, 4)}  # layers may differ in heads / head_dim
    for step, num_new in enumerate([3, 1, 6, 9, 2, 4]):  # chunks straddle page boundaries
        first = pool.reserve(num_new)
        for layer, (num_kv_heads, head_dim) in layer_shapes.items():
            for seq in range(batch):
                k = torch.randn(num_new, num_kv_heads, head_dim, generator=gen)
                v = torch.randn(num_new, num_kv_heads, head_dim, generator=gen)
                pool.write(layer, seq, first, k, v)
                mirror.write(layer, seq, first, k, v)
        check_all(pool, mirror, gen)
    assert pool.num_slots == [25] * batch
    assert pool.num_pages == batch * 7  # ceil(25 / 4) pages per sequence
    fast = pool._fast.k[0].shape[0]
    if device_pages is None:
        assert fast >= batch * 7 and pool._slow is None
    else:  # the first tier never grows past its limit
        assert fast <= device_pages and pool._slow.k[0].shape[0] >= batch * 7 - device_pages


def test_tiered_growth_keeps_both_tiers_and_rejects_a_bad_limit():
    gen = torch.Generator().manual_seed(5)
    pool = PagedKVPool(batch_size=2, page_size=2, device=CPU, device_pages=7)
    mirror = Mirror()
    while pool.num_pages < 90:  # both tiers grow many times; chunks straddle the tier split
        first = pool.reserve(3)
        for seq in (0, 1):
            k = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
            pool.write(2, seq, first, k, -k)
            mirror.write(2, seq, first, k, -k)
    check_all(pool, mirror, gen, n=301)
    with pytest.raises(ValueError, match="device_pages"):
        PagedKVPool(batch_size=1, page_size=2, device=CPU, device_pages=-1)


def test_write_in_pieces_and_overwrite():
    gen = torch.Generator().manual_seed(1)
    pool = PagedKVPool(batch_size=1, page_size=5, device=CPU)
    mirror = Mirror()
    pool.reserve(12)
    for first, n in [(0, 4), (4, 5), (9, 3), (2, 6)]:  # the last write overwrites slots 2..7
        k = torch.randn(n, 2, 3, generator=gen)
        v = torch.randn(n, 2, 3, generator=gen)
        pool.write(0, 0, first, k, v)
        mirror.write(0, 0, first, k, v)
    check_all(pool, mirror, gen)


def test_per_head_slots_pick_per_head_values():
    # k[slot, head, :] = 100 * slot + head: gathered values identify (slot, head)
    pool = PagedKVPool(batch_size=1, page_size=3, device=CPU)
    num_slots, num_kv_heads = 10, 4
    pool.reserve(num_slots)
    ids = 100 * torch.arange(num_slots)[:, None] + torch.arange(num_kv_heads)[None, :]
    k = ids[:, :, None].float().expand(-1, -1, 2).clone()
    pool.write(0, 0, 0, k, -k)
    slots = torch.tensor([[0, 9, 3], [5, 5, 1], [2, 8, 7], [9, 0, 4]])
    gk, gv = pool.gather(0, 0, slots, CPU)
    assert gk.shape == (num_kv_heads, 3, 2)
    expected = 100 * slots + torch.arange(num_kv_heads)[:, None]
    assert torch.equal(gk[..., 0], expected.float())
    assert torch.equal(gv[..., 1], -expected.float())


def test_growth_past_initial_capacity_keeps_earlier_data():
    gen = torch.Generator().manual_seed(2)
    page_size = 2
    pool = PagedKVPool(batch_size=2, page_size=page_size, device=CPU)
    mirror = Mirror()
    first = pool.reserve(5)
    for layer in (0, 1):
        for seq in (0, 1):
            k = torch.randn(5, 2, 4, generator=gen, dtype=torch.float64)
            v = torch.randn(5, 2, 4, generator=gen, dtype=torch.float64)
            pool.write(layer, seq, first, k, v)
            mirror.write(layer, seq, first, k, v)
    # grow to ~150 pages, many times any reasonable initial capacity, one chunk at a time
    total = 5
    while pool.num_pages < 150:
        n = 7
        first = pool.reserve(n)
        total += n
        for layer in (0, 1):
            for seq in (0, 1):
                k = torch.randn(n, 2, 4, generator=gen, dtype=torch.float64)
                v = torch.randn(n, 2, 4, generator=gen, dtype=torch.float64)
                pool.write(layer, seq, first, k, v)
                mirror.write(layer, seq, first, k, v)
    # a layer first written after growth
    k = torch.randn(total, 1, 2, generator=gen, dtype=torch.float64)
    pool.write(3, 1, 0, k, k + 1)
    mirror.write(3, 1, 0, k, k + 1)
    check_all(pool, mirror, gen)
    assert pool.num_slots == [total, total]


def test_gather_and_write_unreserved_slot_raise_index_error():
    pool = PagedKVPool(batch_size=2, page_size=4, device=CPU)
    pool.reserve(6)
    k = torch.randn(6, 2, 3)
    pool.write(0, 0, 0, k, k)
    pool.write(0, 1, 0, k, k)
    with pytest.raises(IndexError, match="6"):
        pool.gather(0, 0, torch.tensor([[0, 6], [1, 2]]), CPU)
    # slot 7 is still inside the last page, but not reserved
    with pytest.raises(IndexError):
        pool.gather(0, 1, torch.tensor([[7], [0]]), CPU)
    with pytest.raises(IndexError):
        pool.write(0, 0, 4, torch.randn(3, 2, 3), torch.randn(3, 2, 3))  # slots 4, 5, 6
    # the last reserved slot is fine
    gk, _ = pool.gather(0, 0, torch.tensor([[5], [5]]), CPU)
    assert torch.equal(gk[:, 0], k[5])


def test_positions_across_many_small_reserves_and_an_unreserve():
    """A stream reserves a slot or two per step (the position buffer grows by doubling, not per call): every slot
    keeps its position, fresh slots read -1, unreserved slots are out of range, and re-reserved ones start fresh;
    the K/V of slots written before and after new pages were added gather back unchanged."""
    pool = PagedKVPool(batch_size=1, page_size=4, device=CPU)
    want, kv = [], []
    for step in range(150):
        n = 1 + step % 2
        first = pool.reserve(n)
        assert torch.equal(pool.positions(0, torch.arange(first, first + n)), torch.full((n,), -1))
        pos = torch.arange(1000 + len(want), 1000 + len(want) + n)
        pool.set_positions(0, first, pos)
        k = torch.randn(n, 2, 3)
        pool.write(0, 0, first, k, -k)
        want += pos.tolist()
        kv.append(k)
    total = len(want)
    assert torch.equal(pool.positions(0, torch.arange(total)), torch.tensor(want))
    k_all = torch.cat(kv)
    slots = torch.tensor([[0, 5, total - 1], [3, total // 2, 1]])
    gk, gv = pool.gather(0, 0, slots, CPU)
    for h in range(2):
        assert torch.equal(gk[h], k_all[slots[h], h]) and torch.equal(gv[h], -k_all[slots[h], h])
    pool.unreserve(total - 3)
    with pytest.raises(IndexError):
        pool.positions(0, torch.tensor([total - 1]))
    first = pool.reserve(3)
    assert first == total - 3
    assert torch.equal(pool.positions(0, torch.arange(first, first + 3)), torch.full((3,), -1))
    assert torch.equal(pool.positions(0, torch.arange(first)), torch.tensor(want[:first]))


def test_gather_empty_and_dtype_cast():
    pool = PagedKVPool(batch_size=1, page_size=4, device=CPU)
    pool.reserve(3)
    k = torch.randn(3, 2, 4, dtype=torch.float32)
    pool.write(0, 0, 0, k, k)
    gk, gv = pool.gather(0, 0, torch.zeros(2, 0, dtype=torch.int64), CPU)
    assert gk.shape == (2, 0, 4) and gv.shape == (2, 0, 4)
    # storage dtype is fixed by the first write of the layer; later writes are cast to it
    pool.write(0, 0, 1, k[:1].double(), k[:1].double())
    gk, _ = pool.gather(0, 0, torch.tensor([[1], [1]]), CPU)
    assert gk.dtype == torch.float32
    assert torch.equal(gk[:, 0], k[0])


def test_reserve_capacity_sizes_the_tiers_once_and_keeps_data():
    """A known total (a prompt's length) sizes each tier exactly, split at ``device_pages``; reserving up to it
    grows nothing; data written before and after stay; past it growth doubles again; small exact requests
    double like ordinary growth (so many of them stay linear)."""
    gen = torch.Generator().manual_seed(4)
    pool = PagedKVPool(batch_size=2, page_size=4, device=CPU, device_pages=10)
    mirror = Mirror()
    first = pool.reserve(6)
    for seq in (0, 1):
        k, v = torch.randn(6, 2, 3, generator=gen), torch.randn(6, 2, 3, generator=gen)
        pool.write(0, seq, first, k, v)
        mirror.write(0, seq, first, k, v)
    pool.reserve_capacity(70)  # 18 pages per sequence: 36 in all, 10 in the first tier and 26 in the second
    assert (pool._fast.capacity, pool._slow.capacity) == (10, 26)
    stored = (pool._fast.k[0], pool._slow.k[0])
    while pool.num_slots[0] < 70:
        n = min(9, 70 - pool.num_slots[0])
        first = pool.reserve(n)
        for seq in (0, 1):
            k, v = torch.randn(n, 2, 3, generator=gen), torch.randn(n, 2, 3, generator=gen)
            pool.write(0, seq, first, k, v)
            mirror.write(0, seq, first, k, v)
    assert pool._fast.k[0] is stored[0] and pool._slow.k[0] is stored[1]  # never regrown
    check_all(pool, mirror, gen)
    pool.reserve(8)  # past the reserved total: doubling growth again
    assert pool._slow.capacity == 52
    pool.reserve_capacity(pool.num_slots[0] + 8)  # a small exact request: doubles, does not creep
    assert pool._slow.capacity in (52, 104)
    with pytest.raises(ValueError, match="num_slots must be >= 0"):
        pool.reserve_capacity(-1)


def test_a_reservation_whose_tier_cannot_grow_reserves_nothing(monkeypatch):
    """Out of memory while the tiers grow: no slot is reserved (before, the slot counts had moved on, leaving
    reserved slots no span covers), and the next reservation starts where the failed one would have."""
    pool = PagedKVPool(batch_size=2, page_size=4, device=CPU)
    assert pool.reserve(3) == 0

    def no_memory(*args, **kwargs):
        raise MemoryError("no room")

    monkeypatch.setattr(pool._fast, "grow", no_memory)
    with pytest.raises(MemoryError):
        pool.reserve(6)
    assert pool.num_slots == [3, 3]
    monkeypatch.undo()
    assert pool.reserve(6) == 3 and pool.num_slots == [9, 9]
    assert all(len(t) == 3 for t in pool.page_tables)
