"""The decode step's torch reference: one new token over ``[memory | window]`` (:func:`decode_attention`).

It is the composition the engine ran before the fused kernel (:func:`attention_with_lse` over the memory,
:func:`local_attention` over the window, :func:`merge_attention`), and the reference
``kernels/triton_decode.py`` is tested against. :func:`decode_attention_backend` picks the fused kernel where the
Triton backend applies.

Shapes: q ``[batch, num_heads, 1, head_dim]``; memory and window K / V ``[batch, num_kv_heads, M or W, head_dim]``.
"""

from __future__ import annotations

import torch

from ltri_rag.kernels.attention import (LocalAttention, _check_qkv, attention_with_lse, local_attention,
                                        local_attention_backend, merge_attention)

__all__ = ["decode_attention", "decode_attention_backend"]


def _check_decode(q, mem_k, mem_v, mem_mask, win_k, win_v, q_mem, band_width, softcap) -> tuple[int, bool]:
    """Validate the inputs of a decode step; return ``(group, has_memory)`` (memory present with ``M > 0``)."""
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, num_heads, 1, head_dim], got shape {tuple(q.shape)}")
    if q.shape[2] != 1:
        raise ValueError(f"q_len must be 1 (one decoded token per sequence), got q_len {q.shape[2]}")
    group = _check_qkv(q, win_k, win_v)
    if win_k.shape[2] < 1:
        raise ValueError(f"win_k must hold at least the new token (W >= 1), got W = {win_k.shape[2]}")
    if band_width < 0:
        raise ValueError(f"band_width must be >= 0, got {band_width}")
    if softcap is not None and softcap == 0:
        raise ValueError("softcap must be non-zero (or None)")
    if q_mem is not None and (q_mem.shape != q.shape or q_mem.device != q.device):
        raise ValueError(f"q_mem must match q {tuple(q.shape)} on {q.device}, got {tuple(q_mem.shape)} on "
                         f"{q_mem.device}")
    if (mem_k is None) != (mem_v is None):
        raise ValueError("mem_k and mem_v must both be given or both be None")
    if mem_k is None:
        if mem_mask is not None:
            raise ValueError("mem_mask given without mem_k / mem_v")
        return group, False
    _check_qkv(q, mem_k, mem_v)
    if mem_k.shape[1] != win_k.shape[1]:
        raise ValueError(f"num_kv_heads of the memory ({mem_k.shape[1]}) and the window ({win_k.shape[1]}) differ")
    if mem_mask is not None:
        if tuple(mem_mask.shape) != tuple(mem_k.shape[:3]):
            raise ValueError(f"mem_mask must be [batch, num_kv_heads, M]={tuple(mem_k.shape[:3])}, "
                             f"got {tuple(mem_mask.shape)}")
        if mem_mask.dtype != torch.bool or mem_mask.device != q.device:
            raise ValueError(f"mem_mask must be a bool tensor on {q.device}, got {mem_mask.dtype} on {mem_mask.device}")
    return group, mem_k.shape[2] > 0


def decode_attention(
    q: torch.Tensor,
    mem_k: torch.Tensor | None,
    mem_v: torch.Tensor | None,
    mem_mask: torch.Tensor | None,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    *,
    scaling: float,
    band_width: int = 0,
    want_key_mass: bool = False,
    softcap: float | None = None,
    q_mem: torch.Tensor | None = None,
    win_len: torch.Tensor | None = None,
) -> LocalAttention:
    """Reference (plain torch): one decode step over ``[memory | window]``, the engine's composition today.

    Args:
        q: ``[batch, num_heads, 1, head_dim]`` the new token's queries.
        mem_k: ``[batch, num_kv_heads, M, head_dim]`` memory keys (sinks and retrieved spans), or None.
        mem_v: like ``mem_k``.
        mem_mask: ``[batch, num_kv_heads, M]`` bool, False for padding; None = all valid.
        win_k: ``[batch, num_kv_heads, W, head_dim]`` local window, the new token's key last (``W >= 1``).
        win_v: like ``win_k``.
        scaling: Multiplier of ``q . k``.
        band_width: Width of the returned band (head-mean probability of keys ``W - 1 - o``); 0 = none.
        want_key_mass: Whether to return ``key_mass`` (``[batch, num_kv_heads, W]``).
        softcap: Optional score soft-capping.
        q_mem: Queries for the memory keys (a position scheme may rotate them differently); None = ``q``.
        win_len: A one-element integer tensor, or None: ``win_k`` / ``win_v`` are then buffers of capacity ``W`` whose
            first ``win_len`` keys (clamped to ``[1, W]``) are the window, as for the Triton kernel. Here the length
            is read on the host (one synchronisation): the result is the call on ``win_k[:, :, :win_len]``, with
            ``key_mass`` padded to ``W`` columns with zeros.

    Returns:
        A :class:`~ltri_rag.kernels.attention.LocalAttention`: ``out`` / ``lse`` over both parts, ``key_mass`` /
        ``band`` of the window keys normalised by the total LSE.
    """
    if win_len is not None:
        if not isinstance(win_len, torch.Tensor) or win_len.numel() != 1 or win_len.dtype not in (torch.int32,
                                                                                                   torch.int64):
            raise ValueError(f"win_len must be a one-element int32 / int64 tensor, got "
                             f"{getattr(win_len, 'shape', None)} {getattr(win_len, 'dtype', type(win_len).__name__)}")
        capacity = win_k.shape[2]
        length = min(max(int(win_len.reshape(())), 1), capacity)
        part = decode_attention(q, mem_k, mem_v, mem_mask, win_k[:, :, :length], win_v[:, :, :length],
                                scaling=scaling, band_width=band_width, want_key_mass=want_key_mass, softcap=softcap,
                                q_mem=q_mem)
        if part.key_mass is None or length == capacity:
            return part
        key_mass = torch.nn.functional.pad(part.key_mass, (0, capacity - length))
        return LocalAttention(out=part.out, lse=part.lse, key_mass=key_mass, band=part.band)
    _, has_memory = _check_decode(q, mem_k, mem_v, mem_mask, win_k, win_v, q_mem, band_width, softcap)
    lse_m = out_m = None
    if has_memory:
        out_m, lse_m = attention_with_lse(q if q_mem is None else q_mem, mem_k, mem_v, scaling=scaling,
                                          key_mask=mem_mask, softcap=softcap)
    local = local_attention(q, win_k, win_v, scaling=scaling, causal_offset=win_k.shape[2] - 1, extra_lse=lse_m,
                            band_width=band_width, want_key_mass=want_key_mass, softcap=softcap)
    if out_m is None:
        return local
    out, lse = merge_attention(out_m, lse_m, local.out, local.lse)
    return LocalAttention(out=out, lse=lse, key_mass=local.key_mass, band=local.band)


def decode_attention_backend(backend: str, device: torch.device):
    """The fused decode kernel (``triton_decode.decode_attention_triton``: memory + window + merge in one launch
    pair) where ``backend`` selects Triton on ``device`` (as :func:`local_attention_backend` decides), else None: the
    caller then composes :func:`attention_with_lse`, :func:`local_attention` and :func:`merge_attention`."""
    if local_attention_backend(backend, device) is local_attention:
        return None
    from ltri_rag.kernels.triton_decode import decode_attention_triton  # imports this module

    return decode_attention_triton
