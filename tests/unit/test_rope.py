"""Unit tests for ``ltri_rag.rope`` (moving rotary-encoded vectors to other positions)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltri_rag.rope import find_inv_freq, rotate


def make_inv_freq(rot_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Hugging Face RoPE (``apply_rotary_pos_emb`` with rotate-half, partial rotary as in GPT-NeoX / Phi),
    computed in float64 with float64 angles.

    Args:
        x: ``[..., seq_len, head_dim]``; positions: ``[seq_len]`` (or broadcastable to ``x.shape[:-1]``).
    """
    rot_dim = 2 * inv_freq.numel()
    xd = x.double()
    x_rot, x_pass = xd[..., :rot_dim], xd[..., rot_dim:]
    freqs = positions.double()[..., None] * inv_freq.double()  # [..., L, half]
    emb = torch.cat((freqs, freqs), dim=-1)
    out = x_rot * emb.cos() + rotate_half(x_rot) * emb.sin()
    return torch.cat((out, x_pass), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# rotate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [2, 8, 64])
def test_rotate_composes(head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    inv_freq = make_inv_freq(head_dim)
    x = torch.randn(2, 3, 11, head_dim, generator=gen)
    a = torch.randint(-500, 500, (2, 3, 11), generator=gen)
    b = torch.randint(-500, 500, (11,), generator=gen)  # broadcast over leading dims
    two_steps = rotate(rotate(x, a, inv_freq), b, inv_freq)
    one_step = rotate(x, a + b, inv_freq)
    torch.testing.assert_close(two_steps, one_step, rtol=1e-5, atol=1e-5)
    # rotating back restores x; a zero delta is the identity; the norm is kept
    torch.testing.assert_close(rotate(rotate(x, a, inv_freq), -a, inv_freq), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotate(x, torch.zeros(11, dtype=torch.int64), inv_freq), x)
    torch.testing.assert_close(one_step.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [4, 16, 128])
def test_rotate_moves_hf_rope_to_new_position(head_dim):
    gen = torch.Generator().manual_seed(100 + head_dim)
    inv_freq = make_inv_freq(head_dim)
    seq_len = 13
    x = torch.randn(2, 4, seq_len, head_dim, generator=gen)
    p = torch.randint(0, 5000, (seq_len,), generator=gen)
    d = torch.randint(-3000, 3000, (seq_len,), generator=gen)
    d = torch.maximum(d, -p)  # keep p + d >= 0 (negative positions would work too)
    roped = hf_rope(x, p, inv_freq).float()
    moved = rotate(roped, d, inv_freq)
    assert moved.shape == x.shape and moved.dtype == torch.float32
    torch.testing.assert_close(moved.double(), hf_rope(x, p + d, inv_freq), rtol=1e-5, atol=2e-5)
    # rotating the raw vector by p is RoPE at p
    torch.testing.assert_close(rotate(x, p, inv_freq).double(), hf_rope(x, p, inv_freq), rtol=1e-5, atol=2e-5)


def test_rotate_matches_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    head_dim, seq_len = 32, 9
    inv_freq = make_inv_freq(head_dim)
    q = torch.randn(1, 2, seq_len, head_dim, generator=gen)
    positions = torch.arange(seq_len) + 40
    freqs = positions[None, :, None].float() * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    q_hf, _ = apply_rotary_pos_emb(q, q, emb.cos(), emb.sin())
    torch.testing.assert_close(rotate(q, positions, inv_freq), q_hf, rtol=1e-5, atol=1e-5)
    # move every token to position 7
    moved = rotate(q_hf, 7 - positions, inv_freq)
    freqs7 = torch.full((1, seq_len, 1), 7.0) * inv_freq[None, None, :]
    emb7 = torch.cat((freqs7, freqs7), dim=-1)
    q7, _ = apply_rotary_pos_emb(q, q, emb7.cos(), emb7.sin())
    torch.testing.assert_close(moved, q7, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim,rot_dim", [(16, 8), (64, 16), (10, 4), (8, 2)])
def test_rotate_partial_rotary_leaves_rest_untouched(head_dim, rot_dim):
    gen = torch.Generator().manual_seed(head_dim * rot_dim)
    inv_freq = make_inv_freq(rot_dim)
    x = torch.randn(3, 7, head_dim, generator=gen)
    p = torch.randint(0, 1000, (7,), generator=gen)
    d = torch.randint(0, 1000, (7,), generator=gen)
    roped = hf_rope(x, p, inv_freq).float()
    moved = rotate(roped, d, inv_freq)
    assert torch.equal(moved[..., rot_dim:], x[..., rot_dim:])  # bit-exact pass-through
    torch.testing.assert_close(moved.double(), hf_rope(x, p + d, inv_freq), rtol=1e-5, atol=2e-5)


def test_rotate_large_positions_stay_accurate():
    gen = torch.Generator().manual_seed(3)
    head_dim = 128
    inv_freq = make_inv_freq(head_dim, base=500000.0)
    x = torch.randn(2, 5, head_dim, generator=gen)
    p = torch.tensor([1_000_000, 1_000_001, 999_999, 2_500_000, 123_456])
    d = torch.tensor([1_000_000, -999_999, 17, -2_500_000, 3_000_000])
    roped = hf_rope(x, p, inv_freq).float()
    moved = rotate(roped, d, inv_freq)
    # the only float32 rounding is that of the (bounded) cos/sin and of x: errors stay at ~1e-6 scale
    torch.testing.assert_close(moved.double(), hf_rope(x, p + d, inv_freq), rtol=1e-5, atol=5e-5)
    # and a direct rotation by 1e6 equals RoPE at 1e6
    big = torch.full((5,), 1_000_000)
    torch.testing.assert_close(rotate(x, big, inv_freq).double(), hf_rope(x, big, inv_freq), rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("x_shape,delta_shape,rot_dim", [((2, 3, 7, 16), (2, 3, 7), 16), ((2, 3, 7, 16), (7,), 8),
                                                          ((3, 7, 12), (2, 3, 7), 12), ((1, 5, 8), (1, 5), 4)])
def test_rotate_is_bit_for_bit_the_rotate_half_formula(x_shape, delta_shape, rot_dim):
    """The torch path writes its result in place; it must stay the plain formula's bits (shapes broadcast as
    before, the dimensions past ``rot_dim`` copied)."""
    gen = torch.Generator().manual_seed(rot_dim)
    x = torch.randn(*x_shape, generator=gen)
    delta = torch.randint(-5000, 5000, delta_shape, generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    half = rot_dim // 2
    angles = delta.double().unsqueeze(-1) * inv_freq.double()
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    x1, x2, rest = x[..., :half], x[..., half:rot_dim], x[..., rot_dim:]
    rest = rest.expand(*torch.broadcast_shapes(x.shape[:-1], delta.shape), rest.shape[-1])
    expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    assert torch.equal(rotate(x, delta, inv_freq), expected)


def test_rotate_keeps_dtype():
    gen = torch.Generator().manual_seed(4)
    inv_freq = make_inv_freq(16)
    x = torch.randn(4, 16, generator=gen).to(torch.bfloat16)
    delta = torch.tensor([0, 1, 100, 10_000])
    out = rotate(x, delta, inv_freq)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(out.float(), rotate(x.float(), delta, inv_freq), rtol=1e-2, atol=1e-2)
    x64 = torch.randn(4, 16, dtype=torch.float64, generator=gen)
    assert rotate(x64, delta, inv_freq).dtype == torch.float64


def test_rotate_rejects_too_many_frequencies():
    with pytest.raises(ValueError, match="10"):
        rotate(torch.randn(3, 8), torch.zeros(3), make_inv_freq(10))


# ---------------------------------------------------------------------------------------------------------------
# find_inv_freq
# ---------------------------------------------------------------------------------------------------------------


def test_find_inv_freq_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    head_dim = 64 // 4
    for layer_idx in (0, 1):
        inv_freq = find_inv_freq(model, layer_idx)
        assert torch.equal(inv_freq, model.model.rotary_emb.inv_freq)
        assert not inv_freq.requires_grad
    theta = config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None) else config.rope_theta
    torch.testing.assert_close(find_inv_freq(model, 0), make_inv_freq(head_dim, base=float(theta)))


def test_find_inv_freq_gemma3_returns_full_attention_frequencies():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(config)
    rotary = model.model.rotary_emb
    full = getattr(rotary, "full_attention_inv_freq", None)
    sliding = getattr(rotary, "sliding_attention_inv_freq", None)
    if full is None:  # older layouts: separate global (rotary_emb) / local (rotary_emb_local) modules
        full = rotary.inv_freq
        sliding = model.model.rotary_emb_local.inv_freq
    assert not torch.equal(full, sliding), "test needs distinct global / local frequencies"
    assert torch.equal(find_inv_freq(model, 1), full)  # layer 1 is the full-attention layer
    # the sliding layer gets the frequencies of its own (local) rotary embedding
    assert torch.equal(find_inv_freq(model, 0), sliding)


class _FakeRotaryEmbedding(nn.Module):
    def __init__(self, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)


class _TwoRotaries(nn.Module):
    """A model with separate local / global rotary modules; the local one registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.rotary_emb_local = _FakeRotaryEmbedding(make_inv_freq(8, base=10.0))
        self.rotary_emb = _FakeRotaryEmbedding(make_inv_freq(8, base=1e6))


def test_find_inv_freq_prefers_global_module_over_local():
    model = _TwoRotaries()
    assert torch.equal(find_inv_freq(model, 0), model.rotary_emb.inv_freq)


def test_find_inv_freq_without_rotary_raises():
    with pytest.raises(ValueError, match="Sequential"):
        find_inv_freq(nn.Sequential(nn.Linear(4, 4)), 0)
