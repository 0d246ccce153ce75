"""The one-launch memory part from device-side slot lists (``kernels/triton_assemble.py``) equals its torch
reference, and the reference equals the engine's torch path (a gather, then ``rotate`` by the scheme's shifts).
On CPU under ``TRITON_INTERPRET`` (set here, before the kernel module is imported); compiled on a GPU."""

import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module

triton_assemble = kernel_module("triton_assemble")

from ltri_rag.rope import rotate


def _case(num_kv_heads, width, num_sinks, head_dim, half, split_pages, dtype, seed):
    """A pool of 12 pages of 4 slots (pages shuffled in the table), slot positions, per-head slot lists with valid
    prefixes of different lengths, sinks; ``split_pages`` pages in the device tier (None: one tier)."""
    gen = torch.Generator().manual_seed(seed)
    page_size, pages = 4, 12
    rows = pages * page_size * num_kv_heads
    pool_k = torch.randn(rows, head_dim, generator=gen).to(dtype)
    pool_v = torch.randn(rows, head_dim, generator=gen).to(dtype)
    table = torch.randperm(pages, generator=gen)
    positions = torch.randint(0, 100_000, (pages * page_size,), generator=gen)
    slots = torch.full((num_kv_heads, width), -1, dtype=torch.int64)
    for h in range(num_kv_heads):
        n = int(torch.randint(0, width + 1, (1,), generator=gen))
        slots[h, :n] = torch.randperm(pages * page_size, generator=gen)[:n].sort().values
    sinks = None
    if num_sinks:
        sinks = [torch.randn(num_kv_heads, num_sinks, head_dim, generator=gen).to(dtype) for _ in range(2)]
    inv_freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / max(half, 1)))
    split = rows if split_pages is None else split_pages * page_size * num_kv_heads
    fast = (pool_k[:split].to(DEVICE), pool_v[:split].to(DEVICE))
    slow = (None, None) if split_pages is None else (pool_k[split:], pool_v[split:])
    if DEVICE == "cuda" and slow[0] is not None:
        slow = tuple(t.pin_memory() for t in slow)
    return dict(slots=slots.to(DEVICE), page_table=table.to(DEVICE), page_size=page_size,
                positions=positions.to(DEVICE), fast_k=fast[0], fast_v=fast[1], slow_k=slow[0], slow_v=slow[1],
                split_row=split, sink_k=None if sinks is None else sinks[0].to(DEVICE),
                sink_v=None if sinks is None else sinks[1].to(DEVICE), base=123_456,
                inv_freq=inv_freq.float().to(DEVICE)), (pool_k, pool_v)


# (num_kv_heads, width, num_sinks, head_dim, half, split_pages, dtype)
CASES = [
    (2, 7, 3, 32, 16, None, torch.float32),  # one tier, sinks
    (3, 20, 0, 64, 32, 5, torch.float32),  # two tiers (host tier read in place), no sinks
    (4, 9, 5, 48, 12, 7, torch.bfloat16),  # partial rotary dims, head_dim not a power of two, bf16
    (1, 1, 2, 16, 8, 0, torch.float32),  # every page in the host tier
]


@pytest.mark.parametrize("half_tiles", [True, False], ids=["half_tiles", "full_tile"])
@pytest.mark.parametrize("scheme", ["contiguous", "fixed", "absolute"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "H{}W{}s{}D{}r{}t{}-{}".format(*c[:6], str(c[6])[6:]))
def test_kernel_matches_the_reference(case, scheme, half_tiles, monkeypatch) -> None:
    """Both kernel forms (keys as two rotary halves, the default; one tile with gathered partner columns)."""
    monkeypatch.setattr(triton_assemble, "HALF_TILES", half_tiles)
    args, _ = _case(*case, seed=sum(case[:5]))
    want_k, want_v, want_mask = triton_assemble.assemble_memory_torch(**args, scheme=scheme)
    got_k, got_v, got_mask = triton_assemble.assemble_memory(**args, scheme=scheme)
    assert got_k.dtype == case[6] and got_k.shape == want_k.shape
    assert torch.equal(got_mask.cpu(), want_mask.cpu()) and torch.equal(got_v.cpu(), want_v.cpu())
    tol = dict(atol=2e-2, rtol=2e-2) if case[6] == torch.bfloat16 else dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_k.float().cpu(), want_k.float().cpu(), **tol)
    assert (got_k[~got_mask] == 0).all() and (got_v[~got_mask] == 0).all()


@pytest.mark.parametrize("rows", [1, 4, 8])
def test_other_rows_per_program(rows, monkeypatch) -> None:
    """``BLOCK_ROWS`` (output rows per program) changes the launch, not the result: values and mask exact, rotated
    keys to float32 rounding (compiled, another tile shape may contract the rotation's products differently)."""
    case = CASES[1]
    args, _ = _case(*case, seed=5)
    want_k, want_v, want_mask = triton_assemble.assemble_memory(**args, scheme="contiguous")
    monkeypatch.setattr(triton_assemble, "BLOCK_ROWS", rows)
    got_k, got_v, got_mask = triton_assemble.assemble_memory(**args, scheme="contiguous")
    assert torch.equal(got_v.cpu(), want_v.cpu()) and torch.equal(got_mask.cpu(), want_mask.cpu())
    torch.testing.assert_close(got_k.cpu(), want_k.cpu(), atol=2e-5, rtol=1e-5)


def test_writes_into_wider_buffers_and_leaves_the_rest() -> None:
    args, _ = _case(2, 6, 2, 32, 16, 4, torch.float32, seed=5)
    out = (torch.full((2, 12, 32), 7.0, device=DEVICE), torch.full((2, 12, 32), 7.0, device=DEVICE),
           torch.ones(2, 12, dtype=torch.bool, device=DEVICE))
    k, v, mask = triton_assemble.assemble_memory(**args, scheme="contiguous", out=out)
    want = triton_assemble.assemble_memory_torch(**args, scheme="contiguous")
    assert k.data_ptr() == out[0].data_ptr() and k.shape == (2, 8, 32)
    torch.testing.assert_close(out[0][:, :8], want[0], atol=2e-5, rtol=1e-5)
    assert (out[0][:, 8:] == 7).all() and (out[1][:, 8:] == 7).all() and out[2][:, 8:].all()


def test_reference_equals_gather_then_rotate() -> None:
    """The reference against the engine's own arithmetic: rows looked up through the page table, then
    ``ltri_rag.rope.rotate`` by ``base - count + rank - position`` for the contiguous scheme."""
    args, (pool_k, _) = _case(3, 8, 2, 32, 16, None, torch.float32, seed=9)
    k, _, mask = triton_assemble.assemble_memory_torch(**args, scheme="contiguous")
    slots, table = args["slots"].cpu(), args["page_table"].cpu()
    for h in range(3):
        n = int((slots[h] >= 0).sum())
        flat = table[slots[h, :n] // 4] * 4 + slots[h, :n] % 4
        keys = torch.cat([args["sink_k"][h].cpu(), pool_k[flat * 3 + h]])
        pos = torch.cat([torch.arange(2), args["positions"].cpu()[slots[h, :n]]])
        count = 2 + n
        shift = args["base"] - count + torch.arange(count) - pos
        want = rotate(keys[None], shift[None], args["inv_freq"].cpu().double())[0]
        torch.testing.assert_close(k[h, :count].cpu(), want.float(), atol=1e-5, rtol=1e-5)
        assert mask[h, :count].all() and not mask[h, count:].any()


def test_bad_arguments() -> None:
    args, _ = _case(2, 3, 0, 16, 8, None, torch.float32, seed=1)
    with pytest.raises(ValueError, match="scheme"):
        triton_assemble.assemble_memory(**args, scheme="nope")
    small = (torch.empty(2, 2, 16, device=DEVICE), torch.empty(2, 2, 16, device=DEVICE),
             torch.empty(2, 2, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="entries"):
        triton_assemble.assemble_memory(**args, scheme="fixed", out=small)


@pytest.mark.parametrize("scheme", ["contiguous", "fixed", "absolute"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "H{}W{}s{}".format(*c[:3]))
def test_slot_glue_in_the_kernel_changes_nothing(case, scheme, monkeypatch) -> None:
    """``SLOT_GLUE_IN_KERNEL``: the slots read where they lie (an expanded one-row selection too, stride 0) and each
    head's valid count found by a binary search in the kernel give exactly the launcher-side copy and reduction's
    output, for rows with no, some and every slot valid."""
    args, _ = _case(*case, seed=7 + sum(case[:3]))
    num_kv_heads, width = args["slots"].shape
    rows = [args["slots"]]
    if width:
        full = args["slots"].clone()
        full[0] = torch.arange(width, device=full.device)  # every entry valid
        full[-1] = -1  # none valid
        rows.append(full)
        rows.append(args["slots"][:1].expand(num_kv_heads, -1))  # one selection for every head
    for slots in rows:
        call = {**args, "slots": slots, "scheme": scheme}
        monkeypatch.setattr(triton_assemble, "SLOT_GLUE_IN_KERNEL", False)
        want = triton_assemble.assemble_memory(**call)
        monkeypatch.setattr(triton_assemble, "SLOT_GLUE_IN_KERNEL", True)
        got = triton_assemble.assemble_memory(**call)
        for w, g in zip(want, got):
            assert torch.equal(w.cpu(), g.cpu())
        ref = triton_assemble.assemble_memory_torch(**{**call, "slots": slots.contiguous()})
        assert torch.equal(got[2].cpu(), ref[2].cpu())
