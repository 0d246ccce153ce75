"""On CUDA: the span pool's pinned host pages read and written by the GPU in place (``zero_copy``,
``LtriConfig.zero_copy_host_pages``) hold and return exactly what the staged host copies do. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from ltri_rag.pool import PagedKVPool
from tests.unit.tiny_models import random_ids, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.mark.parametrize("device_pages", [0, 3, None], ids=["all-host", "split", "host-first-tier"])
def test_in_place_pool_equals_the_staged_pool(device_pages) -> None:
    """Two pools get the same writes (batched over layers, in uneven steps, over both tiers); every gather, to the
    GPU and to the host right after a write, is equal bit for bit."""
    gen = torch.Generator().manual_seed(5)
    first = torch.device("cpu") if device_pages is None else CUDA  # None: the whole pool in pinned host memory
    pools = [PagedKVPool(2, 4, first, pin_memory=True, device_pages=device_pages, zero_copy=z) for z in (False, True)]
    assert pools[1].zero_copy
    layers, heads, dim = [0, 2], 2, 16
    for step in (5, 1, 9, 4, 7):
        kv = [torch.randn(len(layers), step, heads, dim, generator=gen).to(torch.bfloat16).cuda() for _ in range(2)]
        for pool in pools:
            first_slot = pool.reserve(step)
            for seq in range(2):
                pool.write_layers(layers, seq, first_slot, kv[0], kv[1])
        total = pools[0].num_slots[0]
        slots = torch.randint(0, total, (heads, 11), generator=gen)
        for layer in layers:
            for seq in range(2):
                for device in (CUDA, torch.device("cpu")):
                    a = pools[0].gather(layer, seq, slots, device)
                    b = pools[1].gather(layer, seq, slots, device)
                    assert b[0].device.type == device.type
                    assert torch.equal(a[0].cpu(), b[0].cpu()) and torch.equal(a[1].cpu(), b[1].cpu())


@pytest.mark.parametrize("case", [dict(kv_device_gib=1e-9), dict(kv_device_gib=2e-5), dict(kv_offload=True)],
                         ids=["host-tier-only", "split", "kv-offload"])
def test_session_with_in_place_host_pages_equals_one_without(case) -> None:
    """A session whose host pages the GPU reads and writes in place computes the same logits, bit for bit, as one
    that stages them through the host (eager decode steps in both: the host-paged graph steps are checked against
    eager ones in test_decode_graph_gpu)."""
    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, seed=3).cuda().to(torch.bfloat16)
    cfg = LtriConfig(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=20, page_size=5,
                     evict_stride=6, span_max_len=8, attention_backend="triton", decode_graph=False, **case)
    sessions = [LtriSession(model, cfg.replace(zero_copy_host_pages=z)) for z in (False, True)]
    ids = random_ids(1, 160, seed=4).cuda()
    logits = [s.feed(ids) for s in sessions]
    assert sessions[1].cache.pool.zero_copy and sessions[1].cache.pool.num_pages > 0
    for _ in range(24):
        torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in sessions]
    torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)


@pytest.mark.parametrize("cache_tokens", [4, 4096], ids=["colliding", "roomy"])
def test_session_through_the_host_row_cache_equals_one_without(cache_tokens, monkeypatch) -> None:
    """Most pool pages in pinned host memory, read in place by the one-launch assembly, retrieving decode steps
    captured and replayed as CUDA graphs: with the device cache of host rows (a small one whose lines collide, and
    a roomy one) the logits are those without it, bit for bit, and the replayed steps read host rows from it."""
    from ltri_rag import cache as cache_mod
    from ltri_rag.kernels import triton_assemble

    model = tiny_model("qwen2", num_heads=4, num_kv_heads=2, seed=3).cuda().to(torch.bfloat16)
    cfg = LtriConfig(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=8, budget=20, page_size=5,
                     evict_stride=6, span_max_len=8, attention_backend="triton")
    sessions = []
    for tokens in (0, cache_tokens):
        monkeypatch.setattr(cache_mod, "_make_pool", lambda model, config, batch, device, n=tokens: PagedKVPool(
            batch, config.page_size, CUDA, pin_memory=True, device_pages=3, zero_copy=True, host_cache_tokens=n))
        sessions.append(LtriSession(model, cfg))
    monkeypatch.setattr(triton_assemble, "COUNT_HOST_CACHE", True)
    ids = random_ids(1, 160, seed=4).cuda()
    logits = [s.feed(ids) for s in sessions]
    pool = sessions[1].cache.pool
    pool.host_cache_stats.zero_()  # a plain tensor (made outside inference mode)
    for _ in range(24):
        torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)
        token = logits[0].argmax(-1)
        logits = [s.step(token) for s in sessions]
    graph = sessions[1].decode_graph
    assert graph is not None and graph.retrieving_replays > 0
    hits, host_rows = pool.host_cache_stats.tolist()
    assert host_rows > 0 and hits > 0
    assert not sessions[0].cache.pool._host_cache
