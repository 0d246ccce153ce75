"""The memory part through torch's fused CPU attention (``attention.CPU_FLASH_MEMORY``): the same output, LSE, key mass
and band as the score-tensor path, to float32 rounding, over awkward sizes, GQA ratios, masks (a KV head without a
visible key among them), half-precision inputs and query blocks; and taken only where it applies."""

from __future__ import annotations

import math

import pytest
import torch

from ltri_rag.kernels import attention
from ltri_rag.kernels.attention import attention_with_lse, local_attention

HEAD_DIM = 16
SCALING = 1.0 / math.sqrt(HEAD_DIM)

pytestmark = pytest.mark.skipif(attention._FLASH_CPU is None, reason="this torch has no fused CPU attention op")


def _both(fn, monkeypatch):
    """``fn()`` with the fused path on, then off."""
    monkeypatch.setattr(attention, "CPU_FLASH_MEMORY", True)
    on = fn()
    monkeypatch.setattr(attention, "CPU_FLASH_MEMORY", False)
    off = fn()
    return on, off


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 2e-6) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "the two paths disagree on which entries are -inf"
    torch.testing.assert_close(a[finite], b[finite], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("batch,heads,kv_heads,q_len,kv_len", [
    (1, 1, 1, 1, 1), (1, 4, 2, 1, 37), (2, 4, 2, 17, 3), (2, 14, 2, 65, 130), (1, 8, 8, 5, 1000), (3, 6, 3, 2, 9)])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_memory_attention_equals_the_score_path(batch, heads, kv_heads, q_len, kv_len, masked, monkeypatch):
    gen = torch.Generator().manual_seed(q_len * 1000 + kv_len)
    q = torch.randn(batch, heads, q_len, HEAD_DIM, generator=gen) * 2
    k, v = (torch.randn(batch, kv_heads, kv_len, HEAD_DIM, generator=gen) for _ in range(2))
    mask = None
    if masked:
        mask = torch.rand(batch, kv_heads, kv_len, generator=gen) < 0.6
        mask[0, 0] = False  # a KV head that sees nothing: output 0, LSE -inf
    on, off = _both(lambda: attention_with_lse(q, k, v, scaling=SCALING, key_mask=mask), monkeypatch)
    _close(on[0], off[0])
    _close(on[1], off[1])
    if masked:
        group = heads // kv_heads
        assert bool((on[1][0, :group] == -math.inf).all()) and bool((on[0][0, :group] == 0).all())


def test_fused_memory_attention_reads_half_precision_and_strided_inputs(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 9, HEAD_DIM, generator=gen).permute(0, 2, 1, 3)  # [2, 9, 6, D], strided
    k, v = (torch.randn(2, 3, 40, HEAD_DIM, generator=gen).bfloat16() for _ in range(2))
    mask = torch.rand(2, 3, 40, generator=gen) < 0.7
    assert not q.is_contiguous()
    on, off = _both(lambda: attention_with_lse(q.bfloat16(), k, v, scaling=SCALING, key_mask=mask), monkeypatch)
    assert on[0].dtype == torch.float32
    _close(on[0], off[0], atol=1e-5)
    _close(on[1], off[1], atol=1e-5)


@pytest.mark.parametrize("q_len,causal_offset,mem_len", [(1, 9, 20), (64, 30, 50), (150, 100, 70), (129, 0, 1)])
def test_local_attention_with_memory_equals_the_score_path(q_len, causal_offset, mem_len, monkeypatch):
    """A chunk longer than ``CPU_QUERY_BLOCK`` attends the memory part once, fused, and merges it after the query
    blocks: output, LSE, key mass and band as before."""
    gen = torch.Generator().manual_seed(q_len + causal_offset)
    heads, kv_heads = 6, 2
    q = torch.randn(1, heads, q_len, HEAD_DIM, generator=gen) * 2
    k, v = (torch.randn(1, kv_heads, causal_offset + q_len, HEAD_DIM, generator=gen) for _ in range(2))
    q_mem = torch.randn(1, heads, q_len, HEAD_DIM, generator=gen)
    mem_k, mem_v = (torch.randn(1, kv_heads, mem_len, HEAD_DIM, generator=gen) for _ in range(2))
    mem_mask = torch.rand(1, kv_heads, mem_len, generator=gen) < 0.8

    def run():
        return local_attention(q, k, v, scaling=SCALING, causal_offset=causal_offset, band_width=8,
                               want_key_mass=True, memory=(q_mem, mem_k, mem_v, mem_mask))

    on, off = _both(run, monkeypatch)
    _close(on.out, off.out)
    _close(on.lse, off.lse)
    _close(on.key_mass, off.key_mass, atol=1e-5)
    _close(on.band, off.band)


def test_the_fused_op_is_taken_only_where_it_applies(monkeypatch):
    """On for an unmasked or masked memory part; not for causal keys, soft-capping, or with the switch off."""
    calls = []
    real = attention._FLASH_CPU

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_FLASH_CPU", counted)
    q, k = torch.randn(1, 4, 3, HEAD_DIM), torch.randn(1, 2, 3, HEAD_DIM)
    attention_with_lse(q, k, k, scaling=SCALING)
    assert calls == [torch.Size([1, 2, 6, HEAD_DIM])]  # the group folded into the rows
    attention_with_lse(q, k, k, scaling=SCALING, causal_offset=0)
    attention_with_lse(q, k, k, scaling=SCALING, softcap=20.0)
    monkeypatch.setattr(attention, "CPU_FLASH_MEMORY", False)
    attention_with_lse(q, k, k, scaling=SCALING)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="key_mask"):
        monkeypatch.setattr(attention, "CPU_FLASH_MEMORY", True)
        attention_with_lse(q, k, k, scaling=SCALING, key_mask=torch.ones(1, 2, 4, dtype=torch.bool))
