"""The device cache of host-tier rows (``PagedKVPool(host_cache_tokens=...)``, read and filled by the one-launch
assembly of ``kernels/triton_assemble.py``): the memory part is the same with and without it, over steps whose
selections overlap and collide in the cache; a line holds an exact copy of the row its tag names; rows read again
come from the cache; a write into the host tier drops the lines of the rows it overwrites; and a
session reading through a small cache gives the logits of one without it. On CPU under ``TRITON_INTERPRET``."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.unit.test_triton_assemble import _case
from tests.unit.triton_modules import DEVICE, kernel_module

triton_assemble = kernel_module("triton_assemble")

from ltri_rag import LtriConfig, LtriSession  # noqa: E402
from ltri_rag.pool import PagedKVPool  # noqa: E402
from tests.unit.tiny_models import random_ids, tiny_model  # noqa: E402


def _cache(lines: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(lines, dtype=torch.int64, device=DEVICE),
            torch.zeros(lines, head_dim, dtype=dtype, device=DEVICE),
            torch.zeros(lines, head_dim, dtype=dtype, device=DEVICE),
            torch.zeros(1, dtype=torch.int64, device=DEVICE))


def _held(tags: torch.Tensor) -> torch.Tensor:
    """The host row each line holds (-1: none)."""
    return (tags >> triton_assemble.EPOCH_BITS) - 1


def _check_lines(cache, slow_k, slow_v) -> None:
    """Every line that names a row holds an exact copy of it, at ``row % lines``."""
    rows = _held(cache[0].cpu())
    ck, cv = cache[1].cpu(), cache[2].cpu()
    held = torch.nonzero(rows >= 0).reshape(-1)
    assert torch.equal(rows[held] % rows.numel(), held)
    assert torch.equal(ck[held], slow_k.cpu()[rows[held]]) and torch.equal(cv[held], slow_v.cpu()[rows[held]])


@pytest.mark.parametrize("lines_per_head", [3, 64])  # 3: rows collide in the cache; 64: every host row fits
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("half_tiles", [True, False], ids=["half_tiles", "full_tile"])
def test_assembly_through_the_cache_equals_the_assembly_without(lines_per_head, dtype, half_tiles,
                                                               monkeypatch) -> None:
    monkeypatch.setattr(triton_assemble, "HALF_TILES", half_tiles)
    num_kv_heads, head_dim = 3, 32
    args, _ = _case(num_kv_heads, 20, 2, head_dim, 16, 4, dtype, seed=11)
    cache = _cache(lines_per_head * num_kv_heads, head_dim, dtype)
    stats = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    slot_lists = [args["slots"]]
    for _ in range(4):  # later steps: the same slots, or some of them swapped for others
        slots = slot_lists[-1].clone().cpu()
        for h in range(num_kv_heads):
            n = int((slots[h] >= 0).sum())
            if n:
                keep = torch.randperm(n, generator=gen)[: max(n - 3, 0)]
                fresh = torch.randperm(48, generator=gen)
                fresh = fresh[~torch.isin(fresh, slots[h, keep])][: n - keep.numel()]
                slots[h, :n] = torch.cat([slots[h, keep], fresh]).sort().values
        slot_lists.append(slots.to(DEVICE))
    slot_lists.append(slot_lists[-1])  # read twice in a row
    triton_assemble.COUNT_HOST_CACHE = True
    try:
        for step, slots in enumerate(slot_lists):
            step_args = {**args, "slots": slots}
            want = triton_assemble.assemble_memory(**step_args, scheme="contiguous")
            before = stats.clone()
            got = triton_assemble.assemble_memory(**step_args, scheme="contiguous", cache=cache, stats=stats)
            for a, b in zip(got, want):
                assert torch.equal(a.cpu(), b.cpu()), f"step {step}"
            _check_lines(cache, args["slow_k"], args["slow_v"])
            hits, host_rows = (stats - before).tolist()
            assert host_rows > 0
            if step == len(slot_lists) - 1 and lines_per_head == 64:  # the same rows again: all in the cache
                assert hits == host_rows
            if step == 0:
                assert hits == 0 and bool((_held(cache[0]) >= 0).any())
            assert int(cache[3]) == step + 1  # one launch counted
    finally:
        triton_assemble.COUNT_HOST_CACHE = False


def test_bad_caches_are_refused() -> None:
    args, _ = _case(2, 6, 0, 16, 8, 2, torch.float32, seed=3)
    good = _cache(4, 16, torch.float32)
    for bad, match in (((good[0].int(),) + good[1:], "int64"),
                       (_cache(4, 8, torch.float32), r"\[4, 16\]"),
                       (good[:3], "epoch"),
                       (good[:3] + (torch.zeros(2, dtype=torch.int64, device=DEVICE),), "epoch")):
        with pytest.raises(ValueError, match=match):
            triton_assemble.assemble_memory(**args, scheme="absolute", cache=bad)


def _two_tier_pool(host_cache_tokens: int) -> PagedKVPool:
    return PagedKVPool(1, 4, torch.device("cpu"), device_pages=2, host_cache_tokens=host_cache_tokens)


def test_pool_cache_is_made_for_host_tiers_and_writes_drop_lines() -> None:
    pool = _two_tier_pool(5)
    first = pool.reserve(24)  # pages 0-1 on the device tier, 2-5 in the host tier
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(24, 2, 8, generator=gen), torch.randn(24, 2, 8, generator=gen)
    pool.write(0, 0, first, k, v)
    tags, ck, cv, epoch = pool.host_cache(0, torch.device("cpu"))
    assert tags.shape == (10,) and ck.shape == (10, 8) and bool((tags == 0).all()) and epoch.tolist() == [0]
    assert pool.host_cache(0, torch.device("cpu"))[0] is tags  # made once
    assert pool.host_cache(1, torch.device("cpu")) is None  # the layer stored nothing
    assert _two_tier_pool(0).host_cache(0, torch.device("cpu")) is None
    assert PagedKVPool(1, 4, torch.device("cpu"), host_cache_tokens=5).host_cache(0, torch.device("cpu")) is None
    # host rows 0..3 (tokens 0, 1 of the host tier) cached, and an unrelated row at line 9
    bits = triton_assemble.EPOCH_BITS
    tags[:4] = ((torch.arange(4) + 1) << bits) + 7
    tags[9] = (20 << bits) + 3
    kept = tags.clone()
    pool.write(0, 0, 8, k[:1], v[:1])  # token 8 = host token 0: rows 0 and 1
    assert tags[:2].tolist() == [0, 0] and torch.equal(tags[2:], kept[2:])
    pool.write(0, 0, 0, k[:8], v[:8])  # device-tier tokens only: nothing dropped
    assert tags[:2].tolist() == [0, 0] and torch.equal(tags[2:], kept[2:])
    for bad in (-1, 2.0):
        with pytest.raises(ValueError, match="host_cache_tokens"):
            PagedKVPool(1, 4, torch.device("cpu"), host_cache_tokens=bad)
    with pytest.raises(ValueError, match="host_cache_tokens"):
        LtriConfig(host_cache_tokens=-1)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU session stands in for a GPU with a host tier")
def test_session_through_a_small_cache_gives_the_same_logits(monkeypatch) -> None:
    """A two-tier pool (most pages in the host tier), device selection and the one-launch assembly under the
    interpreter: a cache of 6 tokens per layer (lines collide), one of 4,096, and none give the same logits,
    prompt and decode, and the cache serves host rows once decoding repeats its retrievals."""
    from ltri_rag import cache as cache_mod
    from ltri_rag.kernels import triton_local, triton_rope, triton_scoring, triton_select

    for module in (triton_local, triton_rope, triton_scoring, triton_select):
        if not module.INTERPRETED:
            importlib.reload(module)
    importlib.reload(importlib.import_module("ltri_rag.kernels.triton_decode"))
    importlib.reload(importlib.import_module("ltri_rag.kernels.triton_gather"))
    model = tiny_model("llama")
    ids = random_ids(1, 70, seed=4)
    cfg = LtriConfig(num_sink_tokens=3, local_window=16, chunk_size=9, final_chunk_size=4, budget=12, page_size=5,
                     evict_stride=4, span_min_len=2, span_max_len=8, selection_on_device=True,
                     attention_backend="triton")
    outputs, pools = [], []
    for tokens in (0, 6, 4096):
        monkeypatch.setattr(cache_mod, "_make_pool", lambda model, config, batch, device, n=tokens: PagedKVPool(
            batch, config.page_size, torch.device("cpu"), device_pages=2, host_cache_tokens=n))
        session = LtriSession(model, cfg)
        pools.append(session.cache.pool)
        triton_assemble.COUNT_HOST_CACHE = True
        try:
            logits = [session.feed(ids)]
            for token in (7, 100, 3, 3, 3):
                logits.append(session.step(torch.tensor([token])))
        finally:
            triton_assemble.COUNT_HOST_CACHE = False
        outputs.append(logits)
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            assert torch.equal(a, b)
    assert not pools[0]._host_cache
    hits, host_rows = pools[2].host_cache_stats.tolist()
    assert host_rows > 0 and hits > 0
