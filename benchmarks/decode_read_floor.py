"""The read floor of one decode-attention launch: a Triton kernel that only streams K and V.

``bench_decode_attention`` states decode attention as a share of the 4.3 TB/s copy rate. That rate is measured on
large copies; a launch that reads 64 MB (16K keys per KV head at the Llama-3-8B shape) also pays a launch, a ramp
and a tail. :func:`read_kv` reads exactly the bytes the decode kernel reads, with the same split layout (grid
``(splits, B * Hkv)``, tiles of ``block_n`` keys over ``[memory | window]``, the same split count and pipelining),
and does nothing with them but add them up: no scores, no softmax, no partial results, no second launch. No decode
attention kernel built as one launch over this layout can be faster, so its time is the floor the attention rows
are read against (the ``read floor (one launch)`` row).

Shapes: mem_k / mem_v ``[B, Hkv, M, D]`` (``M`` may be 0), win_k / win_v ``[B, Hkv, W, D]``; returns
``[B * Hkv, splits]`` float32 partial sums (their total is the sum of every element read, a check that every tile
was read once).
"""

from __future__ import annotations

import torch

from ltri_rag.kernels import triton_decode
from ltri_rag.kernels._triton_support import tl, triton
from ltri_rag.kernels.decode_shapes import launch_settings, num_splits_for

__all__ = ["read_kv"]

# built for the interpreter exactly when the decode kernel it is compared with was (its combine function is reused)
INTERPRETED = triton_decode.INTERPRETED

if triton is not None:
    _add = triton_decode._sum_combine

    @triton.jit
    def _read_tiles(acc, k_base, v_base, start, length, stride_kn, stride_kd, stride_vn, stride_vd,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        """``acc [BLOCK_N, BLOCK_D]`` plus the K and V tile of keys ``[start, start + BLOCK_N)`` of ``length``."""
        n = start + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        ok = (n < length)[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_base + n[:, None] * stride_kn + d[None, :] * stride_kd, mask=ok, other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vn + d[None, :] * stride_vd, mask=ok, other=0.0)
        return acc + k.to(tl.float32) + v.to(tl.float32)

    @triton.jit(do_not_specialize=("mem_len", "win_len", "mem_tiles", "total_tiles", "tiles_per_split"))
    def _read_kernel(MK, MV, WK, WV, Out,
                     stride_mkb, stride_mkh, stride_mkn, stride_mkd, stride_mvb, stride_mvh, stride_mvn, stride_mvd,
                     stride_wkb, stride_wkh, stride_wkn, stride_wkd, stride_wvb, stride_wvh, stride_wvn, stride_wvd,
                     num_kv_heads, mem_len, win_len, mem_tiles, total_tiles, tiles_per_split, num_splits,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_s = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // num_kv_heads).to(tl.int64)
        kvh = (pid_bh % num_kv_heads).to(tl.int64)
        t_lo = pid_s * tiles_per_split
        t_hi = tl.minimum(t_lo + tiles_per_split, total_tiles)
        acc = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
        mk = MK + b * stride_mkb + kvh * stride_mkh
        mv = MV + b * stride_mvb + kvh * stride_mvh
        for t in range(t_lo, tl.minimum(t_hi, mem_tiles)):
            acc = _read_tiles(acc, mk, mv, t * BLOCK_N, mem_len, stride_mkn, stride_mkd, stride_mvn, stride_mvd,
                              HEAD_DIM, BLOCK_D, BLOCK_N)
        wk = WK + b * stride_wkb + kvh * stride_wkh
        wv = WV + b * stride_wvb + kvh * stride_wvh
        for t in range(tl.maximum(t_lo, mem_tiles), t_hi):
            acc = _read_tiles(acc, wk, wv, (t - mem_tiles) * BLOCK_N, win_len, stride_wkn, stride_wkd, stride_wvn,
                              stride_wvd, HEAD_DIM, BLOCK_D, BLOCK_N)
        total = tl.reduce(tl.reduce(acc, 1, _add), 0, _add)
        tl.store(Out + pid_bh * num_splits + pid_s, total)


def read_kv(mem_k: torch.Tensor, mem_v: torch.Tensor, win_k: torch.Tensor, win_v: torch.Tensor,
            num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
            num_stages: int | None = None) -> torch.Tensor:
    """Read every element of the four tensors once, in the decode kernel's split layout; ``[B * Hkv, splits]``
    float32 partial sums. The launch settings default to the decode kernel's
    (:func:`ltri_rag.kernels.decode_shapes.block_sizes`); each can be given, as for the decode kernel, to find how
    fast one launch can read these bytes at all (``bench_decode_attention --grid``).

    Raises:
        RuntimeError: triton is not installed.
        ValueError: tensors off CUDA without the interpreter, or of mismatched shapes.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    device = win_k.device
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"read_kv needs CUDA tensors (got {device}), or TRITON_INTERPRET=1 set before import")
    batch, num_kv_heads, win_len, head_dim = win_k.shape
    for name, t in (("mem_k", mem_k), ("mem_v", mem_v), ("win_v", win_v)):
        if t.shape[:2] != (batch, num_kv_heads) or t.shape[3] != head_dim or t.device != device:
            raise ValueError(f"{name} {tuple(t.shape)} on {t.device} does not match win_k {tuple(win_k.shape)} "
                             f"on {device}")
    if mem_k.shape != mem_v.shape or win_k.shape != win_v.shape:
        raise ValueError(f"K / V shapes differ: {tuple(mem_k.shape)} / {tuple(mem_v.shape)}, "
                         f"{tuple(win_k.shape)} / {tuple(win_v.shape)}")
    block_n, _, num_warps, num_stages, block_d = launch_settings(head_dim, device, win_k.dtype, block_n, num_warps,
                                                                 num_stages)
    mem_len = mem_k.shape[2]
    mem_tiles = triton.cdiv(mem_len, block_n)
    total_tiles = mem_tiles + triton.cdiv(win_len, block_n)
    programs = batch * num_kv_heads
    splits = num_splits_for(total_tiles, programs, device, num_splits)
    out = torch.empty(programs, splits, dtype=torch.float32, device=device)
    _read_kernel[(splits, programs)](
        mem_k, mem_v, win_k, win_v, out, *mem_k.stride(), *mem_v.stride(), *win_k.stride(), *win_v.stride(),
        num_kv_heads, mem_len, win_len, mem_tiles, total_tiles, triton.cdiv(total_tiles, splits), splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return out
