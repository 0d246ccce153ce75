"""Evicting every layer at once (``ltri_rag.eviction``, ``layer.evict_layers``) equals evicting layer by layer."""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig, LtriSession
from ltri_rag.eviction import cut_segments, evict_layers
from ltri_rag.index_vectors import dynamic_counts, select_index_tokens, select_index_tokens_batch, static_counts
from ltri_rag.layer import GlobalLayerState
from ltri_rag.pool import PagedKVPool
from ltri_rag.rope import rotate
from ltri_rag.spans import segment_fixed, segment_triangle, segment_triangle_batch
from tests.unit.test_spans import planted_band
from tests.unit.tiny_models import random_ids, tiny_model


def _bands(num: int, rows: int) -> torch.Tensor:
    """``[num, rows, 64]`` planted bands (different blocks per item), all cut to ``rows`` rows."""
    out = []
    seed = 0
    while len(out) < num:
        band, _ = planted_band(100 + seed, num_blocks=10, extra_blocks=2)
        seed += 1
        if band.shape[0] >= rows:
            out.append(band[:rows])
    return torch.stack(out)


@pytest.mark.parametrize("num_rows,extra", [(120, 30), (200, 0), (7, 40), (1, 3)])
def test_segment_triangle_batch_equals_one_band_at_a_time(num_rows, extra):
    bands = _bands(5, num_rows + extra)
    got = segment_triangle_batch(bands, num_rows, alpha=1.0, min_len=4, max_len=48, min_score=0.0, first_row_pos=9)
    assert len(got) == 5
    for band, spans in zip(bands, got):
        want = segment_triangle(band, num_rows, alpha=1.0, min_len=4, max_len=48, min_score=0.0, first_row_pos=9)
        assert torch.equal(spans.starts, want.starts) and torch.equal(spans.ends, want.ends)
        assert torch.equal(spans.rank, want.rank)
    # the items differ (else the test would not tell a batch from a broadcast)
    assert any(not torch.equal(got[0].starts, s.starts) for s in got[1:]) or num_rows < 8


def test_segment_triangle_batch_rejects_bad_shapes():
    with pytest.raises(ValueError, match="batch, total_rows, band_width"):
        segment_triangle_batch(torch.zeros(10, 64), 5, alpha=1.0, min_len=4, max_len=8, min_score=0.0)
    with pytest.raises(ValueError, match=r"num_rows must be in \[1, 10\], got 11"):
        segment_triangle_batch(torch.zeros(2, 10, 64), 11, alpha=1.0, min_len=4, max_len=8, min_score=0.0)


def test_select_index_tokens_batch_equals_one_segment_at_a_time():
    gen = torch.Generator().manual_seed(3)
    num_tokens, heads = 90, 3
    mass = torch.rand(4, heads, num_tokens, generator=gen)
    mass[1, :, 10:20] = 0.5  # ties: the stable order decides
    segs = []
    for b in range(4):
        cuts = sorted(torch.randperm(num_tokens - 1, generator=gen)[: 5 + 3 * b].add(1).tolist())
        starts = torch.tensor([0, *cuts])
        ends = torch.tensor([*cuts, num_tokens])
        counts = torch.minimum(torch.randint(1, 6, (starts.numel(),), generator=gen), ends - starts)
        segs.append((starts, ends, counts))
    token_idx, owners = select_index_tokens_batch(mass, segs)
    offset = 0
    for b, (starts, ends, counts) in enumerate(segs):
        want_idx, want_owner = select_index_tokens(mass[b], starts, ends, counts)
        n = want_owner.numel()
        assert n == int(counts.sum())
        assert torch.equal(token_idx[offset:offset + n], want_idx)
        assert torch.equal(owners[b], want_owner)
        offset += n
    assert offset == token_idx.shape[0]
    with pytest.raises(ValueError, match="3 span lists for 4 segments"):
        select_index_tokens_batch(mass, segs[:3])


def _reference_cut(config, keys, band, mass, first_pos, inv_freq):
    """One layer at a time, as the engine did before batching."""
    out = []
    for layer in range(keys.shape[0]):
        n = keys.shape[2]
        if config.segmentation == "triangle":
            spans = segment_triangle(band[layer], n, alpha=config.triangle_alpha, min_len=config.span_min_len,
                                     max_len=config.span_max_len, min_score=config.nms_min_score,
                                     first_row_pos=first_pos)
        else:
            spans = segment_fixed(n, config.block_size)
        if config.index_vectors == "dynamic":
            counts = dynamic_counts(spans.lengths, spans.rank, base=config.num_index_vectors,
                                    minimum=config.min_index_vectors, maximum=config.max_index_vectors)
        else:
            counts = static_counts(spans.lengths, config.num_index_vectors)
        idx, owner = select_index_tokens(mass[layer], spans.starts, spans.ends, counts)
        heads = torch.arange(keys.shape[1])[None, :]
        vectors = rotate(keys[layer][heads, idx], -(idx + first_pos), inv_freq[layer])
        out.append((spans.starts, spans.ends, vectors, owner))
    return out


@pytest.mark.parametrize("segmentation,index_vectors,shared", [("triangle", "dynamic", True),
                                                               ("triangle", "static", False),
                                                               ("fixed", "dynamic", True)])
def test_cut_segments_equals_layer_by_layer(segmentation, index_vectors, shared):
    config = LtriConfig(mode="ltri", segmentation=segmentation, index_vectors=index_vectors, span_min_len=4,
                        span_max_len=48, block_size=16)
    gen = torch.Generator().manual_seed(5)
    layers, heads, n, dim = 3, 2, 150, 8
    keys = torch.randn(layers, heads, n, dim, generator=gen)
    band = _bands(layers, n + 20)
    mass = torch.rand(layers, heads, n, generator=gen)
    base = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = [base] * layers if shared else [base * (1 + i) for i in range(layers)]
    got = cut_segments(config, keys, band, mass, 37, freqs)
    want = _reference_cut(config, keys, band, mass, 37, freqs)
    for cut, (starts, ends, vectors, owner) in zip(got, want):
        assert torch.equal(cut.starts, starts) and torch.equal(cut.ends, ends)
        assert torch.equal(cut.owner, owner)
        torch.testing.assert_close(cut.vectors, vectors, rtol=0, atol=0)


def test_pool_write_layers_equals_write_per_layer_across_tiers():
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(3, 23, 2, 4, generator=gen)
    v = torch.randn(3, 23, 2, 4, generator=gen)
    one, many = (PagedKVPool(1, 4, torch.device("cpu"), device_pages=3) for _ in range(2))
    for pool in (one, many):
        pool.reserve(23)
    for i, layer in enumerate((0, 2, 5)):
        one.write(layer, 0, 0, k[i], v[i])
    many.write_layers([0, 2, 5], 0, 0, k, v)
    slots = torch.arange(23)[None, :].expand(2, -1)
    for layer in (0, 2, 5):
        for a, b in zip(one.gather(layer, 0, slots, torch.device("cpu")),
                        many.gather(layer, 0, slots, torch.device("cpu"))):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="do not match 2 layers"):
        many.write_layers([0, 2], 0, 0, k, v)


def _tables(session: LtriSession) -> list[tuple[torch.Tensor, ...]]:
    return [(t.starts, t.ends, t.vectors, t.owner) for s in session.cache.states if isinstance(s, GlobalLayerState)
            for t in s.tables]


@pytest.mark.parametrize("segmentation", ["triangle", "fixed"])
def test_engine_batched_eviction_equals_per_layer_eviction(monkeypatch, segmentation):
    # a 4-layer model; the reference run evicts each layer inside its own commit (the per-layer path)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation="sdpa")).eval()
    config = LtriConfig(mode="ltri", num_sink_tokens=4, local_window=48, chunk_size=16, budget=40, page_size=8,
                        evict_stride=8, span_min_len=3, span_max_len=12, segmentation=segmentation, block_size=8)
    ids = random_ids(1, 300, seed=4)
    batched = LtriSession(model, config)
    batched_logits = batched.feed(ids)
    batched.flush()

    import ltri_rag.cache as cache_mod
    monkeypatch.setattr(cache_mod, "evict_layers", lambda states, plan: [evict_layers([s], plan) for s in states])
    per_layer = LtriSession(model, config)
    logits = per_layer.feed(ids)
    per_layer.flush()
    torch.testing.assert_close(batched_logits, logits, rtol=0, atol=0)
    got, want = _tables(batched), _tables(per_layer)
    assert len(got) == 4 and all(len(t[0]) > 5 for t in got)
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_engine_tiny_gemma_evicts_only_global_layers():
    # sliding layers keep their own window; the batch holds only the global layer
    model = tiny_model("gemma3")
    config = LtriConfig(mode="ltri", num_sink_tokens=2, local_window=16, chunk_size=8, budget=24, page_size=4,
                        evict_stride=4, span_min_len=2, span_max_len=8)
    session = LtriSession(model, config)
    session.feed(random_ids(1, 80, seed=2))
    tables = _tables(session)
    assert len(tables) == 1 and int(tables[0][1][-1]) == session.cache.memory_tokens()
