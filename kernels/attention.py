"""Attention over the engine's working set, returning ``(out, lse)`` so partial results merge exactly.

Shapes (GQA packed: query head ``h`` reads KV head ``h // group``):
    q: ``[batch, num_heads, q_len, head_dim]``
    k, v: ``[batch, num_kv_heads, kv_len, head_dim]``
    out: ``[batch, num_heads, q_len, head_dim]`` (float32)
    lse: ``[batch, num_heads, q_len]`` (float32, natural log; ``-inf`` where a row sees no key)

This module holds the plain-torch reference path, which runs everywhere. Triton backends plug in behind the
same functions (``backend="triton"``) without changing callers.

The plain-torch path is memory-bound on the score tensor ``[batch, num_kv_heads, group, q_len, kv_len]``
(float32): it builds that tensor once and works on it in place (mask, exponentials), so it is for inference
(no autograd) and peaks at about one score tensor.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["AUTO_TRITON_CAPABILITY", "LocalAttention", "attention_with_lse", "auto_uses_triton", "local_attention",
           "local_attention_backend", "merge_attention"]


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


def _scores(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None) -> tuple[torch.Tensor, float]:
    """Grouped scores as ``(s, cap)``: the scores ``[batch, num_kv_heads, group, q_len, kv_len]`` are ``cap * s``.

    ``s`` is a fresh float32 tensor. Without ``softcap``, ``cap`` is 1; with it, ``s = tanh(q . k * scaling /
    cap)`` and ``cap = |softcap|``, the multiplication being left to :func:`_exp_scores_`. The multiplier of
    ``q . k`` is folded into the small ``q``, so that the matmul is the only full pass that builds ``s``.
    """
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    cap = 1.0 if softcap is None else abs(softcap)
    qg = (q.float() * (scaling / cap)).reshape(batch, num_kv_heads, group * q_len, head_dim)
    s = torch.matmul(qg, k.float().transpose(2, 3))  # [B, Hkv, G * Lq, Lk]
    if softcap is not None:
        s.tanh_()
    return s.view(batch, num_kv_heads, group, q_len, k.shape[2]), cap


def _mask_causal_(s: torch.Tensor, causal_offset: int, sliding_window: int | None) -> None:
    """Set to ``-inf`` the scores ``s [..., q_len, kv_len]`` of keys that query ``i`` (key index
    ``causal_offset + i``) may not see: future keys and, with ``sliding_window``, keys ``<= t - sliding_window``.

    Only the key columns that some query hides are touched: ``[causal_offset + 1, kv_len)`` for the future and
    ``[0, causal_offset + q_len - sliding_window)`` for the window.
    """
    q_len, kv_len = s.shape[-2:]
    q_pos = torch.arange(q_len, device=s.device)[:, None] + causal_offset
    lo = max(causal_offset + 1, 0)
    if lo < kv_len:
        k_pos = torch.arange(lo, kv_len, device=s.device)[None, :]
        s[..., lo:].masked_fill_(k_pos > q_pos, -math.inf)
    if sliding_window is not None:
        hi = min(causal_offset + q_len - sliding_window, kv_len)
        if hi > 0:
            k_pos = torch.arange(hi, device=s.device)[None, :]
            s[..., :hi].masked_fill_(k_pos <= q_pos - sliding_window, -math.inf)


def _masked_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor | None,
    causal_offset: int | None,
    sliding_window: int | None,
    softcap: float | None,
) -> tuple[torch.Tensor, float]:
    """:func:`_scores` with hidden keys set to ``-inf`` (in place; ``key_mask`` checked by the caller)."""
    s, cap = _scores(q, k, scaling, softcap)  # [B, Hkv, G, Lq, Lk]
    if causal_offset is not None:
        _mask_causal_(s, causal_offset, sliding_window)
    if key_mask is not None:
        s.masked_fill_(~key_mask[:, :, None, None, :], -math.inf)
    return s, cap


def _exp_scores_(s: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ``s [..., kv_len]`` (scores ``cap * s``, as from :func:`_masked_scores`) in place into
    ``exp(cap * s - row_max)``; return ``(lse, row_sum)``.

    ``row_sum`` is the row's sum of those exponentials (``>= 1``, or 0 for a row without a visible key, whose
    ``lse`` is ``-inf``), so ``s / row_sum`` are then the row's probabilities. Same steps as
    :func:`torch.logsumexp`, without its full-size temporary.
    """
    if s.shape[-1] == 0:  # no key at all (amax needs one)
        row_sum = s.new_zeros(s.shape[:-1])
        return row_sum.log(), row_sum
    row_max = s.amax(dim=-1).mul_(cap)
    row_max.masked_fill_(row_max.isinf(), 0.0)  # a row without a key: exp(-inf - 0) = 0 everywhere
    torch.add(-row_max.unsqueeze(-1), s, alpha=cap, out=s).exp_()  # one pass for cap * s - row_max
    row_sum = s.sum(dim=-1)
    return row_sum.log().add_(row_max), row_sum


def _inverse(row_sum: torch.Tensor) -> torch.Tensor:
    """``1 / row_sum``, 0 for empty rows (``row_sum`` 0) so that they get all-zero probabilities."""
    return torch.where(row_sum > 0, row_sum.reciprocal(), 0.0)


def _weighted_values(e: torch.Tensor, row_weight: torch.Tensor, v: torch.Tensor,
                     out_shape: torch.Size) -> torch.Tensor:
    """``sum_k e[..., q, k] * v[k]``, scaled per row by ``row_weight [B, Hkv, G, Lq]``, as ``out_shape``."""
    batch, num_kv_heads, group, q_len, kv_len = e.shape
    out = torch.matmul(e.view(batch, num_kv_heads, group * q_len, kv_len), v.float())  # [B, Hkv, G * Lq, D]
    return out.mul_(row_weight.reshape(batch, num_kv_heads, group * q_len, 1)).view(out_shape)


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
    if key_mask is not None and key_mask.shape != (k.shape[0], k.shape[1], k.shape[2]):
        raise ValueError(f"key_mask must be [batch, num_kv_heads, kv_len]={tuple(k.shape[:3])}, "
                         f"got {tuple(key_mask.shape)}")
    if _flash_cpu_applies(q, causal_offset, softcap):
        return _attention_flash_cpu(q, k, v, scaling, key_mask)
    e, cap = _masked_scores(q, k, scaling, key_mask, causal_offset, sliding_window, softcap)
    lse, row_sum = _exp_scores_(e, cap)
    return _weighted_values(e, _inverse(row_sum), v, out_shape), lse.reshape(out_shape[:3])


CPU_FLASH_MEMORY = True
"""Whether :func:`attention_with_lse` on a CPU, for keys every query sees (the memory part: no causal mask, no
soft-capping), runs torch's fused CPU attention (``aten._scaled_dot_product_flash_attention_for_cpu``, which also
returns the LSE) instead of building the score tensor. The query heads of a KV head are folded into its query rows,
so that no key is copied per query head. Results equal the score-tensor path to float32 rounding; False keeps that
path (for comparisons)."""

try:
    _FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # a torch without the op: the score path
    _FLASH_CPU = None


def _flash_cpu_applies(q: torch.Tensor, causal_offset: int | None, softcap: float | None) -> bool:
    """Whether :func:`attention_with_lse` takes :func:`_attention_flash_cpu` (see :data:`CPU_FLASH_MEMORY`)."""
    return (CPU_FLASH_MEMORY and _FLASH_CPU is not None and q.device.type == "cpu" and causal_offset is None
            and softcap is None)


def _attention_flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                         key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_with_lse` without a causal mask or soft-capping, in torch's fused CPU attention (float32).

    ``q`` ``[B, H, Lq, D]`` is read as ``[B, Hkv, G * Lq, D]`` (every query of a KV head's group sees the same keys);
    ``key_mask`` ``[B, Hkv, Lk]`` becomes an additive bias broadcast over those rows. The fused kernel gives a row
    without a visible key an output of 0 but an LSE of 0, so such rows get ``-inf`` here, as in the score path.
    """
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    rows = q.float().reshape(batch, num_kv_heads, group * q_len, head_dim)
    bias = None
    if key_mask is not None:  # its shape checked by attention_with_lse
        bias = torch.zeros(key_mask.shape, dtype=torch.float32).masked_fill_(~key_mask, -math.inf).unsqueeze(2)
    out, lse = _FLASH_CPU(rows, k.float(), v.float(), 0.0, False, attn_mask=bias, scale=scaling)
    lse = lse.reshape(batch, num_heads, q_len)
    if key_mask is not None:
        blind = ~key_mask.any(dim=2)  # [B, Hkv]: no visible key for any query of the group
        if bool(blind.any()):
            lse = lse.masked_fill(blind.repeat_interleave(group, dim=1)[:, :, None], -math.inf)
    return out.reshape(batch, num_heads, q_len, head_dim), lse


def _probability_weight(lse: torch.Tensor, inv_sum: torch.Tensor, extra_lse: torch.Tensor | None) -> torch.Tensor:
    """Row factor ``[B, Hkv, G, Lq]`` turning :func:`_exp_scores_`'s ``exp(score - row_max)`` into
    ``exp(score - total)``, ``total = logaddexp(lse, extra_lse)`` (``lse`` without ``extra_lse``).

    ``inv_sum`` is :func:`_inverse` of the row sums; rows without a visible key get 0.
    """
    if extra_lse is None:
        return inv_sum
    local_share = torch.exp(lse - torch.logaddexp(lse, extra_lse.reshape(lse.shape)))  # NaN where both are -inf
    return torch.where(inv_sum > 0, local_share * inv_sum, 0.0)


def _key_mass(e: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum over (group, q) of e * weight`` as ``[B, Hkv, Lk]``: one matrix-vector product per KV head."""
    batch, num_kv_heads, group, q_len, kv_len = e.shape
    rows = weight.reshape(batch, num_kv_heads, 1, group * q_len)
    return torch.matmul(rows, e.view(batch, num_kv_heads, group * q_len, kv_len)).view(batch, num_kv_heads, kv_len)


def _band(e: torch.Tensor, weight: torch.Tensor, causal_offset: int, band_width: int) -> torch.Tensor:
    """Head mean of ``e * weight`` at (query ``i``, key ``causal_offset + i - o``) as ``[B, Lq, band_width]``.

    Only the band columns are gathered (0 where the key index is negative) before weighting and averaging.
    """
    batch, num_kv_heads, group, q_len, kv_len = e.shape
    if kv_len == 0:
        return e.new_zeros(batch, q_len, band_width)
    rows = torch.arange(q_len, device=e.device)[:, None] + causal_offset
    cols = rows - torch.arange(band_width, device=e.device)[None, :]  # [Lq, band]
    valid = cols >= 0
    picked = torch.gather(e, 4, cols.clamp(min=0).expand(batch, num_kv_heads, group, -1, -1))
    band = picked.mul_(weight.unsqueeze(-1)).mean(dim=(1, 2))  # [B, Lq, band]
    return band.mul_(valid)


def _check_memory(q: torch.Tensor, k: torch.Tensor, memory: tuple, extra_lse: torch.Tensor | None) -> None:
    """Validate the ``memory`` argument of :func:`local_attention` (``k``: the local keys)."""
    if extra_lse is not None:
        raise ValueError("pass either memory or extra_lse, not both")
    if len(memory) != 4:
        raise ValueError(f"memory must be (q_mem, mem_k, mem_v, mem_mask), got {len(memory)} items")
    q_mem, mem_k, mem_v, mem_mask = memory
    if q_mem.shape != q.shape:
        raise ValueError(f"q_mem must have q's shape {tuple(q.shape)}, got {tuple(q_mem.shape)}")
    _check_qkv(q_mem, mem_k, mem_v)
    if mem_k.shape[1] != k.shape[1]:
        raise ValueError(f"memory has {mem_k.shape[1]} KV heads, the local keys {k.shape[1]}")
    if mem_mask.dtype != torch.bool or tuple(mem_mask.shape) != tuple(mem_k.shape[:3]):
        raise ValueError(f"mem_mask must be a bool [batch, num_kv_heads, M]={tuple(mem_k.shape[:3])}, got "
                         f"{mem_mask.dtype} {tuple(mem_mask.shape)}")
    if mem_mask.device != q.device:
        raise ValueError(f"mem_mask is on {mem_mask.device}, q on {q.device}")


def _check_mass_rows(q_len: int, mass_step: int, mass_anchor: int | None) -> int:
    """Validate :func:`local_attention`'s ``mass_step`` / ``mass_anchor``; return the anchor."""
    if not isinstance(mass_step, int) or isinstance(mass_step, bool) or mass_step < 1:
        raise ValueError(f"mass_step must be an int >= 1, got {mass_step!r}")
    anchor = q_len - 1 if mass_anchor is None else mass_anchor
    if not isinstance(anchor, int) or isinstance(anchor, bool) or anchor < q_len - 1:
        raise ValueError(f"mass_anchor must be an int >= q_len - 1 = {q_len - 1}, got {mass_anchor!r}")
    return anchor


def _mass_row_weight(q_len: int, mass_step: int, anchor: int, like: torch.Tensor) -> torch.Tensor:
    """``[q_len]`` weights of the queries in ``key_mass``: ``mass_step`` for queries ``anchor - j * mass_step``,
    0 for the others (``like``'s dtype and device)."""
    sampled = (anchor - torch.arange(q_len, device=like.device)) % mass_step == 0
    return sampled.to(like.dtype) * mass_step


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
    memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    mass_step: int = 1,
    mass_anchor: int | None = None,
) -> LocalAttention:
    """Causal attention over the local keys plus the statistics span detection needs, in one pass.

    The probabilities behind ``key_mass`` and ``band`` are normalised by the row's total LSE
    (``logaddexp(lse_local, extra_lse)``), i.e. they are the true attention probabilities of the full working set.

    With ``memory`` the other part of the working set is attended too and merged: ``out`` and ``lse`` are then
    over memory and local keys together (``key_mass`` and ``band`` still cover the local keys only). This is
    :func:`attention_with_lse` over the memory, this function with its LSE as ``extra_lse``, and
    :func:`merge_attention`; the Triton backend does all three in one kernel.

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
        memory: ``(q_mem, mem_k, mem_v, mem_mask)``: the queries for the memory part ``[batch, num_heads, q_len,
            head_dim]`` (``q`` itself unless the position scheme moves them), memory keys and values
            ``[batch, num_kv_heads, M, head_dim]`` and their mask ``[batch, num_kv_heads, M]`` bool (False =
            padding); every query sees every real memory key. Excludes ``extra_lse``.
        mass_step: ``key_mass`` sums the probabilities of every ``mass_step``-th query only, counted back from
            query ``mass_anchor``, each weighted by ``mass_step`` (an estimate of the sum over every query at
            ``1 / mass_step`` of the work; 1 = every query, exact). ``out``, ``lse`` and ``band`` are unchanged.
        mass_anchor: The query index the sampled queries count back from (a sampled one); None = ``q_len - 1``,
            the last query. Larger values serve a call on the first queries of a longer chunk.

    Returns:
        A :class:`LocalAttention`.
    """
    anchor = _check_mass_rows(q.shape[2], mass_step, mass_anchor)
    if q.device.type == "cpu" and q.shape[2] > CPU_QUERY_BLOCK:
        return _local_attention_blocked(q, k, v, scaling=scaling, causal_offset=causal_offset, extra_lse=extra_lse,
                                        band_width=band_width, want_key_mass=want_key_mass, softcap=softcap,
                                        memory=memory, mass_step=mass_step, mass_anchor=anchor)
    if memory is not None:
        _check_memory(q, k, memory, extra_lse)
        q_mem, mem_k, mem_v, mem_mask = memory
        out_m, lse_m = attention_with_lse(q_mem, mem_k, mem_v, scaling=scaling, key_mask=mem_mask, softcap=softcap)
        local = local_attention(q, k, v, scaling=scaling, causal_offset=causal_offset, extra_lse=lse_m,
                                band_width=band_width, want_key_mass=want_key_mass, softcap=softcap,
                                mass_step=mass_step, mass_anchor=anchor)
        out, lse = merge_attention(out_m, lse_m, local.out, local.lse)
        return LocalAttention(out=out, lse=lse, key_mass=local.key_mass, band=local.band)
    _check_qkv(q, k, v)
    q_len, kv_len = q.shape[2], k.shape[2]
    if causal_offset + q_len != kv_len:
        raise ValueError(f"causal_offset {causal_offset} + q_len {q_len} must equal kv_len {kv_len}")
    e, cap = _masked_scores(q, k, scaling, None, causal_offset, None, softcap)  # [B, Hkv, G, Lq, Lk]
    lse, row_sum = _exp_scores_(e, cap)
    inv_sum = _inverse(row_sum)
    # out, key_mass and band all read e, each scaled by a row factor: no further full-size tensor
    out = _weighted_values(e, inv_sum, v, q.shape)
    key_mass = band = None
    if want_key_mass or band_width > 0:
        weight = _probability_weight(lse, inv_sum, extra_lse)
        if want_key_mass:
            sampled = weight if mass_step == 1 else weight * _mass_row_weight(q_len, mass_step, anchor, weight)
            key_mass = _key_mass(e, sampled)
        if band_width > 0:
            band = _band(e, weight, causal_offset, band_width)
    return LocalAttention(out=out, lse=lse.reshape(q.shape[:3]), key_mass=key_mass, band=band)


# On a CPU a chunk's queries are attended CPU_QUERY_BLOCK at a time: each block's score tensor stays in cache across
# the passes over it (mask, exponentials, output, key mass, band), and keys past the block's last query are skipped.
# A 2,048-query chunk over 6,144 local keys (Qwen2.5-0.5B heads): 0.52 -> 0.21 s on the 2-core development CPU;
# results equal to float32 rounding (the key mass summed block by block).
CPU_QUERY_BLOCK = 64


def _local_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float,
                             causal_offset: int, extra_lse: torch.Tensor | None, band_width: int,
                             want_key_mass: bool, softcap: float | None,
                             memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
                             mass_step: int = 1, mass_anchor: int | None = None) -> LocalAttention:
    """:func:`local_attention` over blocks of ``CPU_QUERY_BLOCK`` queries (same arguments and result): block
    ``[i0, i1)`` sees the local keys up to its last query, ``causal_offset + i1``."""
    _check_qkv(q, k, v)
    q_len, kv_len = q.shape[2], k.shape[2]
    if causal_offset + q_len != kv_len:
        raise ValueError(f"causal_offset {causal_offset} + q_len {q_len} must equal kv_len {kv_len}")
    memory_part = None
    if memory is not None:
        _check_memory(q, k, memory, extra_lse)
        if _flash_cpu_applies(q, None, softcap):  # the memory part in one fused call, merged after the blocks
            q_mem, mem_k, mem_v, mem_mask = memory
            memory_part = attention_with_lse(q_mem, mem_k, mem_v, scaling=scaling, key_mask=mem_mask)
            extra_lse, memory = memory_part[1], None
    outs, lses, bands = [], [], []
    key_mass = None
    for i0 in range(0, q_len, CPU_QUERY_BLOCK):
        i1 = min(q_len, i0 + CPU_QUERY_BLOCK)
        end = causal_offset + i1
        block_memory = None if memory is None else (memory[0][:, :, i0:i1], *memory[1:])
        part = local_attention(q[:, :, i0:i1], k[:, :, :end], v[:, :, :end], scaling=scaling,
                               causal_offset=causal_offset + i0,
                               extra_lse=None if extra_lse is None else extra_lse[:, :, i0:i1],
                               band_width=band_width, want_key_mass=want_key_mass, softcap=softcap,
                               memory=block_memory, mass_step=mass_step,
                               mass_anchor=(q_len - 1 if mass_anchor is None else mass_anchor) - i0)
        outs.append(part.out)
        lses.append(part.lse)
        if part.band is not None:
            bands.append(part.band)
        if part.key_mass is not None:
            if key_mass is None:
                key_mass = part.key_mass.new_zeros(*part.key_mass.shape[:2], kv_len)
            key_mass[:, :, :end] += part.key_mass
    out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    if memory_part is not None:
        out, lse = merge_attention(memory_part[0], memory_part[1], out, lse)
    return LocalAttention(out=out, lse=lse, key_mass=key_mass, band=torch.cat(bands, dim=1) if bands else None)


AUTO_TRITON_CAPABILITY = (8, 0)
"""The lowest CUDA compute capability on which ``backend="auto"`` takes the Triton kernels (Ampere). They are built
around tensor-core dots in float16 / bfloat16 and tested compiled on Hopper; Volta and Turing lack bfloat16
hardware, and Triton's 16-bit ``tl.dot`` does not build on every older GPU, so there ``auto`` keeps the torch path
(``backend="triton"`` still asks for the kernels)."""


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def auto_uses_triton(device: torch.device) -> bool:
    """Whether ``backend="auto"`` picks the Triton kernels on ``device``: a CUDA device of compute capability
    :data:`AUTO_TRITON_CAPABILITY` or later (the torch path elsewhere; whether triton imports is checked apart)."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= AUTO_TRITON_CAPABILITY


def local_attention_backend(backend: str, device: torch.device):
    """The ``local_attention`` implementation for ``backend`` (``torch``, ``triton`` or ``auto``) on ``device``.

    ``auto`` is Triton on a CUDA device of compute capability 8.0 or later (:func:`auto_uses_triton`) when triton
    imports, the torch path elsewhere. Raises ValueError for an unknown backend or ``triton`` where triton is
    missing.
    """
    if backend not in ("torch", "triton", "auto"):
        raise ValueError(f"backend must be 'torch', 'triton' or 'auto', got {backend!r}")
    if backend == "torch" or (backend == "auto" and not auto_uses_triton(device)):
        return local_attention
    from ltri_rag.kernels.triton_local import local_attention_triton, triton_available  # imports this module

    if triton_available():
        return local_attention_triton
    if backend == "triton":
        raise ValueError("backend 'triton' needs the triton package, which did not import")
    return local_attention


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
