"""Key mass from a sample of a chunk's queries (``mass_step`` / ``LtriConfig.mass_queries``).

The torch path against a naive float64 sum over the sampled rows (dense and CPU-blocked), the Triton kernel
(interpreted on CPU, compiled on CUDA) against the torch path, the argument checks, and the engine: with a budget
that holds every span it still equals the unmodified model, and the sampled masses change only index vectors.
"""

from __future__ import annotations

import pytest
import torch

from ltri_rag import LtriConfig
from ltri_rag.kernels import attention
from ltri_rag.kernels.attention import local_attention
from tests.unit.test_kernels_attention import naive_scores

SCALING = 0.25


def _inputs(num_heads, num_kv_heads, q_len, offset, head_dim=16, *, seed=0, extra=True, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, num_heads, q_len, head_dim, generator=gen)
    k = torch.randn(2, num_kv_heads, offset + q_len, head_dim, generator=gen)
    v = torch.randn(2, num_kv_heads, offset + q_len, head_dim, generator=gen)
    extra_lse = torch.randn(2, num_heads, q_len, generator=gen) + 2.0 if extra else None
    moved = [t if t is None else t.to(device) for t in (q, k, v, extra_lse)]
    return tuple(moved)


def _naive_sampled_mass(q, k, extra_lse, offset, step, anchor):
    """float64 ``[B, Hkv, Lk]``: ``step`` x the probabilities of queries ``anchor - j * step`` summed per KV head."""
    s = naive_scores(q.cpu(), k.cpu(), scaling=SCALING, causal_offset=offset)  # [B, H, Lq, Lk]
    lse = torch.logsumexp(s, dim=-1)
    total = lse if extra_lse is None else torch.logaddexp(lse, extra_lse.cpu().double())
    p = torch.exp(s - total[..., None]).nan_to_num(0.0)
    rows = torch.tensor([(anchor - i) % step == 0 for i in range(q.shape[2])], dtype=torch.float64)
    p = p * rows[None, None, :, None] * step
    group = q.shape[1] // k.shape[1]
    return p.sum(dim=2).view(q.shape[0], k.shape[1], group, -1).sum(dim=2)


@pytest.mark.parametrize("step", [1, 2, 3, 8])
@pytest.mark.parametrize("group", [1, 7])
def test_torch_path_sums_the_sampled_queries(step, group) -> None:
    q, k, v, extra_lse = _inputs(2 * group, 2, 19, 11, seed=step * 10 + group)
    full = local_attention(q, k, v, scaling=SCALING, causal_offset=11, extra_lse=extra_lse, band_width=5,
                           want_key_mass=True)
    got = local_attention(q, k, v, scaling=SCALING, causal_offset=11, extra_lse=extra_lse, band_width=5,
                          want_key_mass=True, mass_step=step)
    ref = _naive_sampled_mass(q, k, extra_lse, 11, step, 18)
    torch.testing.assert_close(got.key_mass.double(), ref, rtol=1e-5, atol=1e-6)
    # nothing but the key mass depends on the sampling
    assert torch.equal(got.out, full.out) and torch.equal(got.lse, full.lse) and torch.equal(got.band, full.band)
    if step == 1:
        assert torch.equal(got.key_mass, full.key_mass)
    else:  # a different estimate of the same total: each key's mass is a sum over fewer rows
        assert not torch.allclose(got.key_mass, full.key_mass, rtol=1e-3)


def test_anchor_past_the_queries_and_memory_part() -> None:
    """``mass_anchor`` beyond the last query (a call on a chunk's first queries) and a memory part merged in."""
    q, k, v, _ = _inputs(4, 2, 13, 6, seed=5, extra=False)
    gen = torch.Generator().manual_seed(6)
    mem_k, mem_v = torch.randn(2, 2, 9, 16, generator=gen), torch.randn(2, 2, 9, 16, generator=gen)
    memory = (q, mem_k, mem_v, torch.rand(2, 2, 9, generator=gen) > 0.3)
    got = local_attention(q, k, v, scaling=SCALING, causal_offset=6, want_key_mass=True, memory=memory,
                          mass_step=4, mass_anchor=17)
    mem_lse = attention.attention_with_lse(q, mem_k, mem_v, scaling=SCALING, key_mask=memory[3])[1]
    ref = _naive_sampled_mass(q, k, mem_lse, 6, 4, 17)  # queries 1, 5, 9 (17 - 4j)
    torch.testing.assert_close(got.key_mass.double(), ref, rtol=1e-5, atol=1e-6)


def test_cpu_blocks_sample_the_same_queries(monkeypatch) -> None:
    """A CPU chunk longer than ``CPU_QUERY_BLOCK`` is attended block by block: the sampled rows are those of the
    whole chunk (counted back from its last query), not of each block."""
    q, k, v, extra_lse = _inputs(6, 2, 45, 20, seed=7)
    args = dict(scaling=SCALING, causal_offset=20, extra_lse=extra_lse, band_width=3, want_key_mass=True,
                mass_step=6)
    monkeypatch.setattr(attention, "CPU_QUERY_BLOCK", 8)
    blocked = local_attention(q, k, v, **args)
    monkeypatch.setattr(attention, "CPU_QUERY_BLOCK", 1024)
    dense = local_attention(q, k, v, **args)
    torch.testing.assert_close(blocked.key_mass, dense.key_mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocked.out, dense.out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense.key_mass.double(), _naive_sampled_mass(q, k, extra_lse, 20, 6, 44),
                               rtol=1e-5, atol=1e-6)


def test_bad_sampling_arguments_are_named() -> None:
    q, k, v, _ = _inputs(2, 2, 5, 3, extra=False)
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match=r"mass_step must be an int >= 1, got " + repr(bad).replace(".", r"\.")):
            local_attention(q, k, v, scaling=SCALING, causal_offset=3, want_key_mass=True, mass_step=bad)
    with pytest.raises(ValueError, match=r"mass_anchor must be an int >= q_len - 1 = 4, got 2"):
        local_attention(q, k, v, scaling=SCALING, causal_offset=3, want_key_mass=True, mass_step=2, mass_anchor=2)


def test_config_mass_queries() -> None:
    assert LtriConfig().mass_queries is None and LtriConfig().mass_step(2048) == 1
    cfg = LtriConfig(mass_queries=256)
    assert [cfg.mass_step(n) for n in (1, 16, 256, 257, 2048, 2064)] == [1, 1, 1, 2, 8, 9]
    for bad, kind in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(kind, match="mass_queries"):
            LtriConfig(mass_queries=bad)
    assert LtriConfig.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------------ Triton kernel
def _triton_local():
    from tests.unit.triton_modules import kernel_module

    return kernel_module("triton_local")


# (num_heads, num_kv_heads, q_len, offset, head_dim, step, anchor offset past the last query, extra, memory)
TRITON_CASES = [
    (4, 2, 37, 21, 32, 3, 0, True, False),
    (14, 2, 40, 45, 64, 8, 0, True, True),  # Qwen-like G = 7
    (7, 1, 33, 0, 32, 5, 2, False, False),  # offset 0, anchor past the chunk
    (2, 2, 9, 12, 16, 16, 0, True, False),  # one sampled query
    (2, 2, 6, 12, 16, 8, 1, True, False),  # anchor 6, step 8: no query of this part (0..5) is sampled
    (4, 1, 64, 64, 32, 2, 1, True, True),
]


def test_the_cases_include_a_part_without_sampled_queries() -> None:
    """The zero-mass branch below must be reached by some case (a part whose queries are all unsampled)."""
    assert any((q_len - 1 + past) % step >= q_len for _, _, q_len, _, _, step, past, _, _ in TRITON_CASES)


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "H{}kv{}q{}off{}D{}s{}a{}x{}m{}".format(*c))
def test_triton_kernel_matches_the_torch_path(case) -> None:
    triton_local = _triton_local()
    from tests.unit.triton_modules import DEVICE

    num_heads, num_kv_heads, q_len, offset, head_dim, step, past, extra, with_memory = case
    q, k, v, extra_lse = _inputs(num_heads, num_kv_heads, q_len, offset, head_dim, seed=q_len, extra=extra,
                                 device=DEVICE)
    memory = None
    if with_memory:
        gen = torch.Generator().manual_seed(9)
        mem_k = torch.randn(2, num_kv_heads, 11, head_dim, generator=gen).to(DEVICE)
        mem_v = torch.randn(2, num_kv_heads, 11, head_dim, generator=gen).to(DEVICE)
        memory = (q, mem_k, mem_v, (torch.rand(2, num_kv_heads, 11, generator=gen) > 0.2).to(DEVICE))
        extra_lse = None
    args = dict(scaling=head_dim ** -0.5, causal_offset=offset, extra_lse=extra_lse, band_width=4,
                want_key_mass=True, memory=memory, mass_step=step, mass_anchor=q_len - 1 + past)
    got = triton_local.local_attention_triton(q, k, v, **args)
    ref = local_attention(q.cpu(), k.cpu(), v.cpu(), **{**args, "extra_lse": None if extra_lse is None
                                                        else extra_lse.cpu(),
                                                        "memory": None if memory is None
                                                        else tuple(t.cpu() for t in memory)})
    torch.testing.assert_close(got.key_mass.cpu(), ref.key_mass, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.out.cpu(), ref.out, rtol=0, atol=1e-4)
    if (q_len - 1 + past) % step >= q_len:  # no sampled query in this part
        assert torch.equal(got.key_mass.cpu(), torch.zeros_like(ref.key_mass))
    else:
        assert got.key_mass.sum() > 0


def test_triton_kernel_rejects_bad_sampling() -> None:
    triton_local = _triton_local()
    from tests.unit.triton_modules import DEVICE

    q, k, v, _ = _inputs(2, 2, 5, 3, extra=False, device=DEVICE)
    with pytest.raises(ValueError, match="mass_step must be an int >= 1, got 0"):
        triton_local.local_attention_triton(q, k, v, scaling=1.0, causal_offset=3, want_key_mass=True, mass_step=0)


# ----------------------------------------------------------------------------------------------------- engine
def _engine_logits(model, config, ids, steps=3):
    from ltri_rag import LtriSession

    session = LtriSession(model, config)
    logits = [session.feed(ids)]
    for _ in range(steps):
        logits.append(session.step(logits[-1].argmax(-1)))
    return session, torch.stack(logits)


def test_engine_with_sampled_mass_equals_full_attention_when_every_span_fits() -> None:
    """The budget holds every span: retrieval loads the whole memory whatever the index vectors are, so the
    engine equals the unmodified model with sampled key masses too (the option changes no attention)."""
    from tests.unit.tiny_models import random_ids, tiny_model

    model = tiny_model("llama")
    ids = random_ids(1, 90)
    common = dict(num_sink_tokens=3, local_window=16, chunk_size=24, budget=4096, page_size=5, evict_stride=4,
                  span_min_len=2, span_max_len=12, position_scheme="absolute", attention_backend="torch")
    _, full = _engine_logits(model, LtriConfig(mode="full"), ids)
    session, sampled = _engine_logits(model, LtriConfig(mode="ltri", mass_queries=4, **common), ids)
    assert session.cache.memory_tokens() > 0
    torch.testing.assert_close(sampled, full, atol=2e-4, rtol=2e-4)


def test_engine_sampled_mass_changes_only_index_vectors() -> None:
    """With every span in the budget, retrieval loads the same memory whatever the index vectors: same logits and
    the same spans (the band does not depend on the mass), other index vectors (picked by the sampled mass)."""
    from tests.unit.tiny_models import random_ids, tiny_model

    model = tiny_model("llama")
    ids = random_ids(1, 120)
    common = dict(mode="ltri", num_sink_tokens=3, local_window=16, chunk_size=24, budget=4096, page_size=5,
                  evict_stride=4, span_min_len=2, span_max_len=12, attention_backend="torch")
    every, logits_every = _engine_logits(model, LtriConfig(**common), ids, steps=1)
    sampled, logits_sampled = _engine_logits(model, LtriConfig(mass_queries=3, **common), ids, steps=1)
    torch.testing.assert_close(logits_sampled, logits_every, atol=2e-4, rtol=2e-4)
    changed = False
    for a, b in zip(every.cache.global_states, sampled.cache.global_states, strict=True):
        assert len(a.tables) == len(b.tables) == 1
        for ta, tb in zip(a.tables, b.tables):
            assert len(ta) > 0 and torch.equal(ta.starts, tb.starts) and torch.equal(ta.ends, tb.ends)
            la, lb = ta.layout(), tb.layout()
            changed |= la.padded.shape != lb.padded.shape or not torch.equal(la.padded, lb.padded)
    assert changed, "the key mass of every 8th query picked the same index vectors in every layer"
