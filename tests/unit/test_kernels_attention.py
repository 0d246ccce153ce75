"""Unit tests for ``ltri_rag.kernels.attention`` against a naive float64 reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ltri_rag.kernels.attention import LocalAttention, attention_with_lse, local_attention, merge_attention

BATCH = 2
NUM_KV_HEADS = 2
HEAD_DIM = 16
SCALING = 1.0 / math.sqrt(HEAD_DIM)
ATOL = 2e-5
RTOL = 1e-5

# ---------------------------------------------------------------------------------------------------------------
# naive reference
# ---------------------------------------------------------------------------------------------------------------


def naive_scores(q, k, *, scaling, key_mask=None, causal_offset=None, sliding_window=None, softcap=None):
    """float64 ``[B, H, Lq, Lk]`` masked scores, KV heads repeated to query heads."""
    group = q.shape[1] // k.shape[1]
    kr = k.double().repeat_interleave(group, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kr) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    q_len, kv_len = q.shape[2], k.shape[2]
    if causal_offset is not None:
        hidden = []  # hidden[i][j]: key j is in the future of query i, or out of its sliding window
        for i in range(q_len):
            t = causal_offset + i
            lo = -1 if sliding_window is None else t - sliding_window
            hidden.append([j > t or j <= lo for j in range(kv_len)])
        s = s.masked_fill(torch.tensor(hidden, dtype=torch.bool).view(q_len, kv_len), -math.inf)
    if key_mask is not None:
        km = key_mask.repeat_interleave(group, dim=1)  # [B, H, Lk]
        s = s.masked_fill(~km[:, :, None, :], -math.inf)
    return s


def naive_attention(q, k, v, **kw):
    s = naive_scores(q, k, **kw)
    group = q.shape[1] // k.shape[1]
    vr = v.double().repeat_interleave(group, dim=1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    p = torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(p), p)
    return p @ vr, lse


def make_qkv(gen, q_len, kv_len, group, dtype=torch.float32, num_kv_heads=NUM_KV_HEADS):
    q = torch.randn(BATCH, num_kv_heads * group, q_len, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(BATCH, num_kv_heads, kv_len, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(BATCH, num_kv_heads, kv_len, HEAD_DIM, generator=gen).to(dtype)
    return q, k, v


def assert_attention_close(out, lse, ref_out, ref_lse):
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    # same rows without any visible key
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse.double(), ref_lse, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.double(), ref_out, rtol=RTOL, atol=ATOL)
    assert torch.isfinite(out).all()


def option_sets(gen, q_len, kv_len):
    offset = kv_len - q_len  # may be negative: early queries then see no key at all
    key_mask = torch.rand(BATCH, NUM_KV_HEADS, kv_len, generator=gen) < 0.7
    key_mask[0, 1] = False  # one (batch, KV head) sees no key
    return [
        dict(),
        dict(causal_offset=offset),
        dict(causal_offset=offset, sliding_window=5),
        dict(causal_offset=0),
        dict(key_mask=key_mask),
        dict(softcap=2.0),
        dict(causal_offset=offset, sliding_window=3, key_mask=key_mask, softcap=1.5),
    ]


SIZES = list(itertools.product([1, 3, 17], [1, 3, 17, 127, 1000], [1, 2, 7]))

# ---------------------------------------------------------------------------------------------------------------
# attention_with_lse
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_len,kv_len,group", SIZES)
def test_attention_with_lse_matches_naive(q_len, kv_len, group):
    gen = torch.Generator().manual_seed(q_len * 10007 + kv_len * 13 + group)
    q, k, v = make_qkv(gen, q_len, kv_len, group)
    for opts in option_sets(gen, q_len, kv_len):
        out, lse = attention_with_lse(q, k, v, scaling=SCALING, **opts)
        ref_out, ref_lse = naive_attention(q, k, v, scaling=SCALING, **opts)
        assert_attention_close(out, lse, ref_out, ref_lse)


def test_attention_with_lse_masked_rows_are_zero_and_neg_inf():
    gen = torch.Generator().manual_seed(0)
    q, k, v = make_qkv(gen, 4, 3, 2)
    out, lse = attention_with_lse(q, k, v, scaling=SCALING, causal_offset=-2)
    # queries 0, 1 sit at key index -2, -1: no key visible
    assert torch.isneginf(lse[:, :, :2]).all()
    assert (out[:, :, :2] == 0).all()
    assert torch.isfinite(lse[:, :, 2:]).all()
    key_mask = torch.zeros(BATCH, NUM_KV_HEADS, 3, dtype=torch.bool)
    out, lse = attention_with_lse(q, k, v, scaling=SCALING, key_mask=key_mask)
    assert torch.isneginf(lse).all() and (out == 0).all()


def test_attention_with_lse_softcap_bounds_scores():
    # With a huge scaling, softcap bounds every score to (-cap, cap), so lse <= log(kv_len) + cap.
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(gen, 3, 17, 2)
    out, lse = attention_with_lse(q, k, v, scaling=100.0, softcap=3.0)
    assert (lse <= math.log(17) + 3.0 + 1e-5).all()
    ref_out, ref_lse = naive_attention(q, k, v, scaling=100.0, softcap=3.0)
    assert_attention_close(out, lse, ref_out, ref_lse)
    # and without softcap the result differs
    _, lse_nocap = attention_with_lse(q, k, v, scaling=100.0)
    assert (lse_nocap - lse).abs().max() > 1.0


def test_attention_with_lse_sliding_window_sees_exactly_window_keys():
    # v = one-hot key index: out[..., j] is the probability on key j
    q_len, kv_len, window = 5, 12, 4
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, q_len, kv_len, generator=gen)
    k = torch.randn(1, 1, kv_len, kv_len, generator=gen)
    v = torch.eye(kv_len)[None, None]
    out, _ = attention_with_lse(q, k, v, scaling=0.3, causal_offset=kv_len - q_len, sliding_window=window)
    for i in range(q_len):
        t = kv_len - q_len + i
        visible = (out[0, :, i] > 0).any(dim=0).nonzero().flatten().tolist()
        assert visible == list(range(t - window + 1, t + 1))
        torch.testing.assert_close(out[0, :, i].sum(dim=-1), torch.ones(2))


def test_attention_with_lse_half_precision_inputs():
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(gen, 3, 17, 2, dtype=torch.bfloat16)
    out, lse = attention_with_lse(q, k, v, scaling=SCALING, causal_offset=14)
    ref_out, ref_lse = naive_attention(q, k, v, scaling=SCALING, causal_offset=14)
    assert_attention_close(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("q_len,group", [(1, 1), (3, 2), (17, 7)])
def test_attention_with_lse_empty_kv(q_len, group):
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(gen, q_len, 0, group)
    out, lse = attention_with_lse(q, k, v, scaling=SCALING, causal_offset=0)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert (out == 0).all()
    assert torch.isneginf(lse).all()


def test_attention_shape_errors():
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(gen, 3, 5, 2)
    bad_calls = [
        (q[0], k, v),  # q not 4-D
        (q, k[0], v[0]),  # k, v not 4-D
        (q, k, v[:, :, :4]),  # k, v shapes differ
        (q[:1], k, v),  # batch mismatch
        (q[..., :8], k, v),  # head_dim mismatch
        (q[:, :3], k, v),  # 3 heads over 2 KV heads
    ]
    for args in bad_calls:
        with pytest.raises(ValueError):
            attention_with_lse(*args, scaling=SCALING)
        with pytest.raises(ValueError):
            local_attention(*args, scaling=SCALING, causal_offset=2)
    with pytest.raises(ValueError, match="key_mask"):
        attention_with_lse(q, k, v, scaling=SCALING, key_mask=torch.ones(BATCH, NUM_KV_HEADS, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal_offset"):
        local_attention(q, k, v, scaling=SCALING, causal_offset=1)  # 1 + 3 != 5


# ---------------------------------------------------------------------------------------------------------------
# merge_attention
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_len,kv_len,group", [(1, 1, 1), (3, 3, 2), (17, 17, 7), (3, 127, 2), (17, 1000, 1)])
def test_merge_of_disjoint_halves_equals_union(q_len, kv_len, group):
    gen = torch.Generator().manual_seed(q_len + kv_len + group)
    q, k, v = make_qkv(gen, q_len, kv_len, group)
    key_mask = torch.rand(BATCH, NUM_KV_HEADS, kv_len, generator=gen) < 0.8
    for split in sorted({0, kv_len // 3, kv_len // 2, kv_len - 1, kv_len}):
        for causal in (False, True):
            offset = kv_len - q_len if causal else None
            full_out, full_lse = attention_with_lse(q, k, v, scaling=SCALING, key_mask=key_mask,
                                                    causal_offset=offset)
            a = attention_with_lse(q, k[:, :, :split], v[:, :, :split], scaling=SCALING,
                                   key_mask=key_mask[:, :, :split], causal_offset=offset)
            b = attention_with_lse(q, k[:, :, split:], v[:, :, split:], scaling=SCALING,
                                   key_mask=key_mask[:, :, split:],
                                   causal_offset=None if offset is None else offset - split)
            out, lse = merge_attention(a[0], a[1], b[0], b[1])
            assert torch.equal(torch.isneginf(lse), torch.isneginf(full_lse))
            torch.testing.assert_close(lse, full_lse, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(out, full_out, rtol=RTOL, atol=ATOL)
            assert torch.isfinite(out).all()
            # merging is symmetric
            out2, lse2 = merge_attention(b[0], b[1], a[0], a[1])
            torch.testing.assert_close(out2, out, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(lse2, lse)


def test_merge_with_empty_part_returns_other_part_exactly():
    gen = torch.Generator().manual_seed(6)
    out_a = torch.randn(2, 3, 4, 8, generator=gen)
    lse_a = torch.randn(2, 3, 4, generator=gen)
    empty_out = torch.zeros_like(out_a)
    empty_lse = torch.full_like(lse_a, -math.inf)
    out, lse = merge_attention(out_a, lse_a, empty_out, empty_lse)
    torch.testing.assert_close(out, out_a)
    torch.testing.assert_close(lse, lse_a)
    out, lse = merge_attention(empty_out, empty_lse, out_a, lse_a)
    torch.testing.assert_close(out, out_a)
    torch.testing.assert_close(lse, lse_a)
    # both empty: zeros and -inf, no NaN
    out, lse = merge_attention(empty_out, empty_lse, empty_out, empty_lse)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_merge_weights_by_lse():
    out_a, out_b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    lse_a, lse_b = torch.tensor([math.log(3.0)]), torch.tensor([math.log(1.0)])
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, torch.tensor([[0.75, 0.25]]))
    torch.testing.assert_close(lse, torch.tensor([math.log(4.0)]))


# ---------------------------------------------------------------------------------------------------------------
# local_attention
# ---------------------------------------------------------------------------------------------------------------


def naive_local_stats(q, k, *, scaling, causal_offset, extra_lse, band_width, softcap=None):
    s = naive_scores(q, k, scaling=scaling, causal_offset=causal_offset, softcap=softcap)  # [B, H, Lq, Lk]
    lse = torch.logsumexp(s, dim=-1)
    total = lse if extra_lse is None else torch.logaddexp(lse, extra_lse.double())
    # true probabilities of the whole working set; 0 in a row that sees no key at all (NaN: -inf - -inf)
    p = torch.exp(s - total[..., None]).nan_to_num(0.0)
    batch, num_heads, q_len, kv_len = p.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    key_mass = torch.zeros(batch, num_kv_heads, kv_len, dtype=torch.float64)
    for h in range(num_heads):
        key_mass[:, h // group] += p[:, h].sum(dim=1)
    band = torch.zeros(batch, q_len, band_width, dtype=torch.float64)
    p_mean = p.mean(dim=1)  # [B, Lq, Lk]
    for i in range(q_len):
        for o in range(band_width):
            j = causal_offset + i - o
            if j >= 0:
                band[:, i, o] = p_mean[:, i, j]
    return key_mass, band


@pytest.mark.parametrize(
    "q_len,causal_offset,group",
    list(itertools.product([1, 3, 17], [0, 1, 5, 110], [1, 2, 7])),
)
def test_local_attention_matches_naive(q_len, causal_offset, group):
    gen = torch.Generator().manual_seed(q_len * 1000 + causal_offset * 10 + group)
    kv_len = causal_offset + q_len
    q, k, v = make_qkv(gen, q_len, kv_len, group)
    num_heads = q.shape[1]
    extra = torch.randn(BATCH, num_heads, q_len, generator=gen) + 2.0
    extra[0, 0] = -math.inf  # empty memory part for some rows
    for extra_lse, band_width, softcap in [(None, 4, None), (extra, 1, None), (extra, 8, 2.0), (extra, 200, None)]:
        res = local_attention(q, k, v, scaling=SCALING, causal_offset=causal_offset, extra_lse=extra_lse,
                              band_width=band_width, want_key_mass=True, softcap=softcap)
        assert isinstance(res, LocalAttention)
        # out / lse: plain causal attention over the local keys (not affected by extra_lse)
        ref_out, ref_lse = naive_attention(q, k, v, scaling=SCALING, causal_offset=causal_offset, softcap=softcap)
        assert_attention_close(res.out, res.lse, ref_out, ref_lse)
        ref_mass, ref_band = naive_local_stats(q, k, scaling=SCALING, causal_offset=causal_offset,
                                               extra_lse=extra_lse, band_width=band_width, softcap=softcap)
        assert res.key_mass.shape == (BATCH, NUM_KV_HEADS, kv_len)
        assert res.band.shape == (BATCH, q_len, band_width)
        torch.testing.assert_close(res.key_mass.double(), ref_mass, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.band.double(), ref_band, rtol=1e-5, atol=1e-6)


def test_local_attention_probability_totals():
    gen = torch.Generator().manual_seed(8)
    q_len, offset, group = 5, 9, 3
    q, k, v = make_qkv(gen, q_len, offset + q_len, group)
    # without a memory part, each query's probabilities over the local keys sum to 1
    res = local_attention(q, k, v, scaling=SCALING, causal_offset=offset, band_width=offset + q_len,
                          want_key_mass=True)
    torch.testing.assert_close(res.key_mass.sum(dim=-1), torch.full((BATCH, NUM_KV_HEADS), float(group * q_len)))
    torch.testing.assert_close(res.band.sum(dim=-1), torch.ones(BATCH, q_len))
    # with a memory part of equal LSE, the local part holds exactly half of the mass
    res2 = local_attention(q, k, v, scaling=SCALING, causal_offset=offset, extra_lse=res.lse,
                           band_width=offset + q_len, want_key_mass=True)
    torch.testing.assert_close(res2.key_mass, res.key_mass / 2)
    torch.testing.assert_close(res2.band, res.band / 2)
    torch.testing.assert_close(res2.out, res.out)
    torch.testing.assert_close(res2.lse, res.lse)
    # a band narrower than the context covers less mass
    narrow = local_attention(q, k, v, scaling=SCALING, causal_offset=offset, band_width=2)
    torch.testing.assert_close(narrow.band, res.band[:, :, :2])


def test_local_attention_optional_outputs():
    gen = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(gen, 3, 7, 2)
    res = local_attention(q, k, v, scaling=SCALING, causal_offset=4)
    assert res.key_mass is None and res.band is None
    res = local_attention(q, k, v, scaling=SCALING, causal_offset=4, want_key_mass=True)
    assert res.key_mass is not None and res.band is None
    res = local_attention(q, k, v, scaling=SCALING, causal_offset=4, band_width=3)
    assert res.key_mass is None and res.band is not None
    # local out/lse equal attention_with_lse with the same causal offset
    out, lse = attention_with_lse(q, k, v, scaling=SCALING, causal_offset=4)
    torch.testing.assert_close(res.out, out)
    torch.testing.assert_close(res.lse, lse)


@pytest.mark.parametrize("q_len,kv_len", [(5, 3), (4, 0)])
def test_local_attention_rows_without_keys(q_len, kv_len):
    # kv_len < q_len: the first queries sit before every key and see none; they get out 0, lse -inf and add
    # nothing to key_mass or band, also where the memory part is empty as well
    gen = torch.Generator().manual_seed(10)
    offset, group = kv_len - q_len, 2
    q, k, v = make_qkv(gen, q_len, kv_len, group)
    extra = torch.randn(BATCH, NUM_KV_HEADS * group, q_len, generator=gen)
    extra[0, 0] = -math.inf
    for extra_lse in (None, extra):
        res = local_attention(q, k, v, scaling=SCALING, causal_offset=offset, extra_lse=extra_lse, band_width=3,
                              want_key_mass=True)
        ref_out, ref_lse = naive_attention(q, k, v, scaling=SCALING, causal_offset=offset)
        assert_attention_close(res.out, res.lse, ref_out, ref_lse)
        assert torch.isneginf(res.lse[:, :, :-offset]).all()
        ref_mass, ref_band = naive_local_stats(q, k, scaling=SCALING, causal_offset=offset, extra_lse=extra_lse,
                                               band_width=3)
        torch.testing.assert_close(res.key_mass.double(), ref_mass, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.band.double(), ref_band, rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs():
    # q, k, v as transposed views of [batch, len, heads, head_dim] buffers, as a model's projections give them
    gen = torch.Generator().manual_seed(11)
    q_len, offset, group = 6, 9, 3
    q = torch.randn(BATCH, q_len, NUM_KV_HEADS * group, HEAD_DIM, generator=gen).transpose(1, 2)
    k = torch.randn(BATCH, offset + q_len, NUM_KV_HEADS, HEAD_DIM, generator=gen).transpose(1, 2)
    v = torch.randn(BATCH, offset + q_len, NUM_KV_HEADS, HEAD_DIM, generator=gen).transpose(1, 2)
    for opts in ({"causal_offset": offset, "sliding_window": 4}, {"softcap": 2.0}):
        out, lse = attention_with_lse(q, k, v, scaling=SCALING, **opts)
        assert_attention_close(out, lse, *naive_attention(q, k, v, scaling=SCALING, **opts))
    res = local_attention(q, k, v, scaling=SCALING, causal_offset=offset, band_width=4, want_key_mass=True)
    contiguous = local_attention(q.contiguous(), k.contiguous(), v.contiguous(), scaling=SCALING,
                                 causal_offset=offset, band_width=4, want_key_mass=True)
    for name in ("out", "lse", "key_mass", "band"):
        torch.testing.assert_close(getattr(res, name), getattr(contiguous, name))


def test_softcap_sign_does_not_matter():
    # softcap * tanh(score / softcap) is even in softcap
    gen = torch.Generator().manual_seed(12)
    q, k, v = make_qkv(gen, 3, 17, 2)
    out, lse = attention_with_lse(q, k, v, scaling=SCALING, causal_offset=14, softcap=-1.5)
    assert_attention_close(out, lse, *naive_attention(q, k, v, scaling=SCALING, causal_offset=14, softcap=1.5))
