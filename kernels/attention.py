"""Attention over the engine's working set, returning ``(out, lse)`` so partial results merge exactly.

Shapes (GQA packed: query head ``h`` reads KV head ``h // group``):
    q: ``[batch, num_heads, q_len, head_dim]``
    k, v: ``[batch, num_kv_heads, kv_len, head_dim]``
    out: ``[batch, num_heads, q_len, head_dim]`` (float32)
    lse: ``[batch, num_heads, q_len]`` (float32, natural log; ``-inf`` where a row sees no key)

This module holds the plain-torch reference path, which runs everywhere. Triton backends plug in behind the
same functions (``backend="triton"``) without changing callers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LocalAttention", "attention_with_lse", "local_attention", "merge_attention"]


@dataclass
class LocalAttention:
    """Result of :func:`local_attention`.

    Attributes:
        out: ``[batch, num_heads, q_len, head_dim]`` float32 partial output over the local keys.
        lse: ``[batch, num_heads, q_len]`` float32 log-sum-exp of the local scores.
        key_mass: ``[batch, num_kv_heads, kv_len]`` attention probability each key received, summed over the
            query heads of its group and over the queries (normalised by the *total* LSE), or ``None``.
        band: ``[batch, q_len, band_width]`` head-mean probability of query ``i`` on key ``i - o``
            (``o`` = 0 is the query's own token), 0 where that key is outside the local keys; or ``None``.
    """

    out: torch.Tensor
    lse: torch.Tensor
    key_mass: torch.Tensor | None
    band: torch.Tensor | None


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"num_heads {q.shape[1]} is not a multiple of num_kv_heads {k.shape[1]}")
    if q.device != k.device or k.device != v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    return q.shape[1] // k.shape[1]


def _scores(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """Grouped scores ``[batch, num_kv_heads, group, q_len, kv_len]`` in float32."""
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, q_len, head_dim)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.float()) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s


def _allowed(
    q_len: int,
    kv_len: int,
    causal_offset: int | None,
    sliding_window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """``[q_len, kv_len]`` bool: query ``i`` (key coordinate ``causal_offset + i``) may see key ``j``."""
    if causal_offset is None:
        return None
    q_pos = torch.arange(q_len, device=device)[:, None] + causal_offset
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    return allowed


def _masked_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None,
    causal_offset: int | None,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    s = _scores(q, k, scaling, softcap)  # [B, Hkv, G, Lq, Lk]
    allowed = _allowed(q.shape[2], k.shape[2], causal_offset, sliding_window, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    if key_mask is not None:
        if key_mask.shape != (k.shape[0], k.shape[1], k.shape[2]):
            raise ValueError(f"key_mask must be [batch, num_kv_heads, kv_len]={tuple(k.shape[:3])}, "
                             f"got {tuple(key_mask.shape)}")
        s = s.masked_fill(~key_mask[:, :, None, None, :], -math.inf)
    return s


def _softmax_out(s: torch.Tensor, v: torch.Tensor, out_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, Lq]
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num_(0.0)  # rows with no key: lse=-inf -> nan -> 0
    out = torch.einsum("bhgqk,bhkd->bhgqd", p, v.float())
    return out.reshape(out_shape), lse.reshape(out_shape[:3])


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    key_mask: torch.Tensor | None = None,
    causal_offset: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over ``k, v`` with its log-sum-exp.

    Args:
        q: ``[batch, num_heads, q_len, head_dim]``.
        k: ``[batch, num_kv_heads, kv_len, head_dim]``.
        v: ``[batch, num_kv_heads, kv_len, head_dim]``.
        scaling: Multiplier of ``q . k``.
        key_mask: ``[batch, num_kv_heads, kv_len]`` bool, False for padding keys; None = all valid.
        causal_offset: If set, query ``i`` sits at key index ``causal_offset + i`` and sees keys up to it.
        sliding_window: With ``causal_offset``: query at key index ``t`` sees keys ``> t - sliding_window``.
        softcap: If set, scores become ``softcap * tanh(score / softcap)``.

    Returns:
        ``(out, lse)``: ``[batch, num_heads, q_len, head_dim]`` and ``[batch, num_heads, q_len]``, float32.
    """
    _check_qkv(q, k, v)
    out_shape = q.shape
    if k.shape[2] == 0:
        return (torch.zeros(out_shape, dtype=torch.float32, device=q.device),
                torch.full(out_shape[:3], -math.inf, dtype=torch.float32, device=q.device))
    s = _masked_scores(q, k, scaling, key_mask, causal_offset, sliding_window, softcap)
    return _softmax_out(s, v, out_shape)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    causal_offset: int,
    extra_lse: torch.Tensor | None = None,
    band_width: int = 0,
    want_key_mass: bool = False,
    softcap: float | None = None,
) -> LocalAttention:
    """Causal attention over the local keys plus the statistics span detection needs, in one pass.

    The probabilities behind ``key_mass`` and ``band`` are normalised by the row's total LSE
    (``logaddexp(lse_local, extra_lse)``), i.e. they are the true attention probabilities of the full working set.

    Args:
        q: ``[batch, num_heads, q_len, head_dim]``; query ``i`` sits at key index ``causal_offset + i``.
        k: ``[batch, num_kv_heads, kv_len, head_dim]`` local window followed by the chunk itself.
        v: like ``k``.
        scaling: Multiplier of ``q . k``.
        causal_offset: Number of local keys before the chunk.
        extra_lse: ``[batch, num_heads, q_len]`` LSE of the other (memory) part of the working set, or None.
        band_width: Width of the returned diagonal band of the (head-mean) probability map; 0 = none.
        want_key_mass: Whether to return ``key_mass``.
        softcap: Optional score soft-capping.

    Returns:
        A :class:`LocalAttention`.
    """
    _check_qkv(q, k, v)
    batch, num_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    if causal_offset + q_len != kv_len:
        raise ValueError(f"causal_offset {causal_offset} + q_len {q_len} must equal kv_len {kv_len}")
    s = _masked_scores(q, k, scaling, None, causal_offset, None, softcap)  # [B, Hkv, G, Lq, Lk]
    out, lse = _softmax_out(s, v, q.shape)
    key_mass = band = None
    if want_key_mass or band_width > 0:
        total = lse if extra_lse is None else torch.logaddexp(lse, extra_lse)
        p = torch.exp(s - total.view(*s.shape[:4], 1))  # [B, Hkv, G, Lq, Lk]; masked entries exp(-inf) = 0
        if want_key_mass:
            key_mass = p.sum(dim=(2, 3))  # [B, Hkv, Lk]
        if band_width > 0:
            p_mean = p.mean(dim=(1, 2))  # [B, Lq, Lk]
            rows = torch.arange(q_len, device=q.device)[:, None] + causal_offset
            cols = rows - torch.arange(band_width, device=q.device)[None, :]  # [Lq, band]
            valid = cols >= 0
            band = torch.gather(p_mean, 2, cols.clamp(min=0).expand(batch, -1, -1))
            band = band * valid  # [B, Lq, band]
    return LocalAttention(out=out, lse=lse, key_mass=key_mass, band=band)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets.

    Args:
        out_a: ``[..., head_dim]`` partial output; ``lse_a`` ``[...]`` its LSE (``-inf`` = empty part).
        out_b: like ``out_a``; ``lse_b`` like ``lse_a``.

    Returns:
        ``(out, lse)`` of attention over the union of both key sets.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).nan_to_num_(0.0).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse).nan_to_num_(0.0).unsqueeze(-1)
    return out_a * w_a + out_b * w_b, lse
