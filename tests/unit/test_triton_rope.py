"""The one-launch gather-and-rotate (``kernels/triton_rope.py``) and the memory assembly built on it
(``ltri_rag/assembly.py``) equal their torch references.

Without CUDA the kernel runs on CPU tensors under the Triton interpreter (``TRITON_INTERPRET`` is set here, at
import, before the kernel module is loaded); with CUDA the same cases run compiled. Skipped where triton does not
import.
"""

import numpy as np
import pytest
import torch

from tests.unit.triton_modules import DEVICE, kernel_module

triton_rope = kernel_module("triton_rope")

from ltri_rag import assembly
from ltri_rag.pool import PagedKVPool
from ltri_rag.rope import rotate


gather_rotate_triton = triton_rope.gather_rotate_triton


def _inv_freq(half: int) -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) / max(half, 1)))


def _reference_rows(main: torch.Tensor, aux: torch.Tensor | None, source: torch.Tensor) -> torch.Tensor:
    """Row ``r``: main's row at element offset ``source[r]``, zeros for -1, aux row ``-2 - source[r]`` below."""
    flat = main.reshape(-1)
    head_dim = main.shape[-1]
    rows = []
    for s in source.tolist():
        if s >= 0:
            rows.append(flat[s:s + head_dim])
        elif s == -1:
            rows.append(torch.zeros(head_dim, dtype=main.dtype, device=main.device))
        else:
            rows.append(aux[-2 - s])
    return torch.stack(rows)


@pytest.mark.parametrize("head_dim,half,dtype", [
    (16, 8, torch.float32), (20, 8, torch.float32), (64, 32, torch.float16), (48, 24, torch.bfloat16),
    (128, 64, torch.bfloat16), (12, 0, torch.float32)])
@pytest.mark.parametrize("half_tiles", [True, False], ids=["half_tiles", "full_tile"])
def test_gather_rotate_matches_the_torch_rotation(head_dim, half, dtype, half_tiles, monkeypatch) -> None:
    """Rows from main (any offset), from aux and empty rows, keys rotated by per-row shifts up to 10M positions
    (partial rotary dims copied), values copied: equal to index + :func:`rotate` (to float32 rounding: the kernel
    reduces the angle in float64 and takes a float32 cosine and sine, ``rotate`` a float64 one), with the rotation
    on two half tiles (the default) or on one tile with gathered partner columns."""
    monkeypatch.setattr(triton_rope, "HALF_TILES", half_tiles)
    gen = torch.Generator().manual_seed(head_dim)
    main_k = torch.randn(40, 3, head_dim, generator=gen).to(dtype).to(DEVICE)
    main_v = torch.randn(40, 3, head_dim, generator=gen).to(dtype).to(DEVICE)
    aux_k = torch.randn(7, head_dim, generator=gen).to(dtype).to(DEVICE)
    aux_v = torch.randn(7, head_dim, generator=gen).to(dtype).to(DEVICE)
    rows = torch.tensor([0, 5, -1, -2, 119, -8, 60, -1, 33, -5, 7])
    source = torch.where(rows >= 0, rows * head_dim, rows).to(DEVICE)
    delta = torch.tensor([3, -3, 0, 10_000_000, -123_456, 1, 0, 9, 65_536, -1, 2]).to(DEVICE)
    inv_freq = _inv_freq(half).to(DEVICE)
    k, v = gather_rotate_triton(main_k, main_v, source, delta, inv_freq, aux_k=aux_k, aux_v=aux_v)
    ref_k = _reference_rows(main_k, aux_k, source)
    ref_v = _reference_rows(main_v, aux_v, source)
    if half:
        ref_k = rotate(ref_k, delta, inv_freq)
    assert k.dtype == v.dtype == dtype and k.shape == (11, head_dim)
    torch.testing.assert_close(v, ref_v, atol=0, rtol=0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(k.float(), ref_k.float(), atol=tol, rtol=tol)
    assert not k[2].any() and not v[7].any()


def test_gather_without_rotation_identity_rows_and_patterns() -> None:
    """No ``delta``: a plain gather; no ``source``: main's rows in order; a ``delta`` shorter than the rows
    repeats (one shift per query position, over heads)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=gen).to(DEVICE)
    inv_freq = _inv_freq(8).to(DEVICE)
    src = torch.tensor([16, 0, -1]).to(DEVICE)
    k, v = gather_rotate_triton(x, x, src, None, inv_freq)
    torch.testing.assert_close(k, _reference_rows(x, None, src), atol=0, rtol=0)
    shifts = torch.tensor([4, -7, 0, 100, 2**20]).to(DEVICE)
    k, v = gather_rotate_triton(x, None, None, shifts, inv_freq)
    assert v is None
    torch.testing.assert_close(k.view(3, 5, 16), rotate(x, shifts, inv_freq), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape,delta_shape", [((2, 3, 5, 16), (5,)), ((2, 3, 5, 16), (2, 3, 5)),
                                               ((2, 3, 5, 16), (2, 1, 5)), ((4, 16), (4,)), ((3, 5, 16), (1, 5))])
def test_rotate_triton_backend_equals_torch(shape, delta_shape) -> None:
    """:func:`rotate` with ``backend="triton"`` takes the kernel for every broadcast of ``delta`` and returns what
    the torch path returns (host shifts copied over)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=gen).to(DEVICE)
    delta = torch.randint(-10**6, 10**6, delta_shape, generator=gen)
    inv_freq = _inv_freq(8).to(DEVICE)
    torch.testing.assert_close(rotate(x, delta, inv_freq, backend="triton"), rotate(x, delta, inv_freq),
                               atol=1e-5, rtol=1e-5)
    strided = x.transpose(-2, -3) if x.dim() > 2 else x
    torch.testing.assert_close(rotate(strided, torch.zeros(strided.shape[-2], dtype=torch.int64), inv_freq,
                                      backend="triton"), strided, atol=0, rtol=0)


def test_bad_inputs_raise() -> None:
    x = torch.zeros(4, 16, device=DEVICE)
    inv_freq = _inv_freq(8).to(DEVICE)
    src = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="does not divide 3 rows"):
        gather_rotate_triton(x, None, src, torch.zeros(2, dtype=torch.int64, device=DEVICE), inv_freq)
    with pytest.raises(ValueError, match="source must be int64"):
        gather_rotate_triton(x, None, src.int(), None, inv_freq)
    with pytest.raises(ValueError, match="rotary dim 32 exceeds head_dim 16"):
        gather_rotate_triton(x, None, src, None, _inv_freq(16).to(DEVICE))
    with pytest.raises(ValueError, match="head_dim 512"):
        gather_rotate_triton(torch.zeros(2, 512, device=DEVICE), None, src, None, inv_freq)
    with pytest.raises(ValueError, match="aux_k and aux_v go together"):
        gather_rotate_triton(x, x, src, None, inv_freq, aux_k=x)
    with pytest.raises(ValueError, match="'nope'"):
        rotate(x, torch.zeros(4, dtype=torch.int64), inv_freq, backend="nope")


# ----------------------------------------------------------------------------------------------- memory assembly
def _filled_pool(device_pages, num_kv_heads, head_dim, dtype, gen) -> tuple[PagedKVPool, int]:
    pool = PagedKVPool(2, 4, torch.device(DEVICE), device_pages=device_pages)
    layer = 3
    for _ in range(3):  # several reserves: page tables interleave the sequences
        first = pool.reserve(9)
        for seq in range(2):
            k = torch.randn(9, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
            pool.write(layer, seq, first, k, torch.randn(k.shape, generator=gen).to(dtype).to(DEVICE))
            pool.set_positions(seq, first, torch.arange(first, first + 9) * 7 + 100 * seq + 1000)
    return pool, layer


def _reference_memory(pool, layer, selections, starts, ends, sink_k, sink_v, scheme, first_local, inv_freq):
    """The torch composition the engine's torch path runs: slot lists, ``pool.gather``, sinks first, positions,
    then the scheme's rotation."""
    from ltri_rag.span_memory import SpanTable

    batch, num_kv_heads, num_sinks, head_dim = sink_k.shape
    parts = []
    for seq, selected in enumerate(selections):
        if selected is None:
            parts.append(None)
            continue
        table = SpanTable(num_kv_heads, head_dim, sink_k.dtype, sink_k.device)
        table.starts, table.ends = torch.from_numpy(starts[seq]), torch.from_numpy(ends[seq])
        slots = table.slot_matrix(torch.from_numpy(selected), num_kv_heads)
        k, v = pool.gather(layer, seq, slots.clamp(min=0), torch.device(DEVICE))
        parts.append((k, v, slots))
    width = num_sinks + max((p[2].shape[1] for p in parts if p is not None), default=0)
    mem_k = torch.zeros(batch, num_kv_heads, width, head_dim, dtype=sink_k.dtype, device=DEVICE)
    mem_v = torch.zeros_like(mem_k)
    mask = torch.zeros(batch, num_kv_heads, width, dtype=torch.bool)
    pos = torch.zeros(batch, num_kv_heads, width, dtype=torch.int64)
    mem_k[:, :, :num_sinks], mem_v[:, :, :num_sinks] = sink_k, sink_v
    mask[:, :, :num_sinks] = True
    pos[:, :, :num_sinks] = torch.arange(num_sinks)
    for seq, part in enumerate(parts):
        if part is None:
            continue
        k, v, slots = part
        n = slots.shape[1]
        mem_k[seq, :, num_sinks:num_sinks + n] = k
        mem_v[seq, :, num_sinks:num_sinks + n] = v
        mask[seq, :, num_sinks:num_sinks + n] = slots >= 0
        pos[seq, :, num_sinks:num_sinks + n] = pool.positions(seq, slots.clamp(min=0))
    if scheme == "fixed":
        mem_k = rotate(mem_k, -pos, inv_freq)
    elif scheme == "contiguous":
        count = mask.sum(dim=2, keepdim=True)
        new_pos = first_local - count + torch.cumsum(mask.long(), dim=2) - 1
        mem_k = rotate(mem_k, torch.where(mask, new_pos - pos, torch.zeros_like(pos)), inv_freq)
    return mem_k, mem_v, mask


@pytest.mark.parametrize("scheme", ["contiguous", "fixed", "absolute"])
@pytest.mark.parametrize("device_pages,rows", [(None, 1), (None, 2), (3, 1), (5, 2), (0, 2)])
def test_assembled_memory_equals_the_torch_composition(scheme, device_pages, rows) -> None:
    """Plan on the host + one launch = slot lists, per-tier gathers, sinks, positions and the scheme's rotation in
    torch: for one selection for all heads or one per KV head, pages on the device tier, in the host tier or both,
    and a sequence whose selection is empty."""
    num_kv_heads, head_dim, dtype = 2, 16, torch.float32
    gen = torch.Generator().manual_seed(rows + 10 * (device_pages or 0))
    pool, layer = _filled_pool(device_pages, num_kv_heads, head_dim, dtype, gen)
    starts = [np.array([0, 3, 10, 12, 20]), np.array([0, 5, 9, 18, 25])]
    ends = [np.array([3, 10, 12, 20, 27]), np.array([5, 9, 18, 25, 27])]
    sel0 = np.array([[True, False, True, False, True], [False, True, True, True, False]])[:rows]
    sel1 = np.zeros((rows, 5), dtype=bool)
    if rows == 2:
        sel1[1, 3] = True
    sink_k = torch.randn(2, num_kv_heads, 3, head_dim, generator=gen).to(DEVICE)
    sink_v = torch.randn(2, num_kv_heads, 3, head_dim, generator=gen).to(DEVICE)
    inv_freq = _inv_freq(8).to(DEVICE)
    plan = assembly.plan_memory(pool, [sel0, sel1], starts, ends, 3, num_kv_heads, head_dim)
    shifts = assembly.position_shifts(plan, scheme, 5000)
    mem_k, mem_v, mask = assembly.build_memory(plan, shifts, pool, layer, sink_k, sink_v, inv_freq,
                                               torch.device(DEVICE), dtype)
    ref_k, ref_v, ref_mask = _reference_memory(pool, layer, [sel0, sel1], starts, ends, sink_k, sink_v, scheme,
                                               5000, inv_freq)
    assert mask.cpu().tolist() == ref_mask.tolist()
    valid = ref_mask.to(DEVICE)  # the torch path leaves slot 0's K/V in padding rows (masked); here they are zeros
    torch.testing.assert_close(mem_v[valid], ref_v[valid], atol=0, rtol=0)
    torch.testing.assert_close(mem_k[valid], ref_k[valid], atol=1e-5, rtol=1e-5)
    assert not mem_k[~valid].any() and not mem_v[~valid].any()
    assert (plan.host_rows.size > 0) == (device_pages is not None and device_pages < 7)


def test_slot_lists_match_the_span_table() -> None:
    from ltri_rag.span_memory import SpanTable

    table = SpanTable(3, 4, torch.float32, torch.device("cpu"))
    table.starts, table.ends = torch.tensor([0, 2, 9, 11]), torch.tensor([2, 9, 11, 30])
    rng = np.random.default_rng(0)
    for rows in (1, 3):
        for _ in range(5):
            selected = rng.random((rows, 4)) < 0.5
            got = assembly.slot_lists(selected, table.starts.numpy(), table.ends.numpy())
            want = table.slot_matrix(torch.from_numpy(selected), 3)[:rows]
            assert got.tolist() == want.tolist()


@pytest.mark.parametrize("mode,extra", [("infllm", {}), ("ltri", {"retrieval_scope": "per_kv_head"})])
def test_engine_builds_its_memory_in_one_launch(mode, extra, monkeypatch) -> None:
    """With the Triton backend the engine takes the one-launch assembly (spied), and its logits, through prefill
    and decode, for a batch of two, equal the torch backend's (``ltri`` with one selection for every head and a
    batch of one: ``test_triton_local``'s engine test, which takes the same path)."""
    from ltri_rag import LtriConfig, LtriSession
    from tests.unit.tiny_models import random_ids, tiny_model

    calls = []
    real = assembly.build_memory

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("ltri_rag.layer.build_memory", spy)
    model = tiny_model("llama").to(DEVICE)
    common = dict(mode=mode, num_sink_tokens=3, local_window=16, chunk_size=8, budget=24, page_size=5,
                  selection_on_device=False,  # the host-planned path (on CUDA "auto" selects on the device)
                  evict_stride=4, span_min_len=2, span_max_len=12, block_size=4, **extra)
    ids = random_ids(2, 44).to(DEVICE)
    sessions = [LtriSession(model, LtriConfig(**common, attention_backend=b), batch_size=2)
                for b in ("torch", "triton")]
    logits = [sessions[0].feed(ids)]
    assert not calls
    logits.append(sessions[1].feed(ids))
    assert calls
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert sessions[1].cache.memory_tokens() == sessions[0].cache.memory_tokens() > 0  # spans were retrieved from
    for _ in range(3):
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in sessions]
        torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
