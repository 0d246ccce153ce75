"""Gather K/V rows from the span pool's two tiers by index, on the compute device, with no host work.

The pool keeps its first pages on the GPU and the rest in pinned host memory (:class:`ltri_rag.pool.PagedKVPool`).
A GPU can read pinned host memory directly (it is mapped into the device's address space), so one kernel can take
each row from whichever tier holds it: the selected rows of host pages cross PCIe inside the kernel, with no row
list on the host, no staging copy, and nothing that would keep the step from being captured as a CUDA graph.

Shapes:
    fast_k / fast_v: ``[F, D]`` rows of the first tier (the GPU);
    slow_k / slow_v: ``[S, D]`` rows of the second tier (pinned host memory on a GPU; host memory on the CPU);
    rows: ``[N]`` int64 on the compute device, a row of the two tiers counted as one (rows ``>= split_row`` are
        row ``rows - split_row`` of the second tier);
    returns ``(k, v)``: ``[N, D]`` each, on ``rows``' device, in the tiers' dtype.

:func:`gather_two_tiers_torch` is the reference (both tiers and ``rows`` on one device: the CPU path);
:func:`gather_two_tiers` picks the Triton kernel on CUDA (and on CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
from ltri_rag.kernels._triton_support import interpreted, tl, triton, triton_available

__all__ = ["gather_two_tiers", "gather_two_tiers_torch", "triton_available"]

INTERPRETED = interpreted()

if triton is not None:

    @triton.jit
    def _gather_two_tiers_kernel(fast_k, fast_v, slow_k, slow_v, rows, out_k, out_v, n_rows, split_row,
                                 HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] output rows
        live = r < n_rows
        src = tl.load(rows + r, mask=live, other=0).to(tl.int64)  # [R] row of the two tiers
        fast = live & (src < split_row)
        slow = live & (src >= split_row)
        cols = tl.arange(0, BLOCK_D)
        col_ok = (cols < HEAD_DIM)[None, :]
        fast_off = tl.where(fast, src, 0)[:, None] * HEAD_DIM + cols[None, :]
        slow_off = tl.where(slow, src - split_row, 0)[:, None] * HEAD_DIM + cols[None, :]
        k = tl.load(fast_k + fast_off, mask=fast[:, None] & col_ok, other=0.0)
        k += tl.load(slow_k + slow_off, mask=slow[:, None] & col_ok, other=0.0)
        v = tl.load(fast_v + fast_off, mask=fast[:, None] & col_ok, other=0.0)
        v += tl.load(slow_v + slow_off, mask=slow[:, None] & col_ok, other=0.0)
        out = r[:, None].to(tl.int64) * HEAD_DIM + cols[None, :]
        tl.store(out_k + out, k, mask=live[:, None] & col_ok)
        tl.store(out_v + out, v, mask=live[:, None] & col_ok)


def _check(fast_k: torch.Tensor, fast_v: torch.Tensor, slow_k: torch.Tensor, slow_v: torch.Tensor,
           rows: torch.Tensor) -> None:
    parts = {"fast_k": fast_k, "fast_v": fast_v, "slow_k": slow_k, "slow_v": slow_v}
    head_dim, dtype = fast_k.shape[-1], fast_k.dtype
    for name, t in parts.items():
        if t.dim() != 2 or t.shape[1] != head_dim or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous [rows, {head_dim}] {dtype}, got {t.dtype} {tuple(t.shape)}")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be [N] int64, got {rows.dtype} {tuple(rows.shape)}")


def gather_two_tiers_torch(fast_k: torch.Tensor, fast_v: torch.Tensor, slow_k: torch.Tensor, slow_v: torch.Tensor,
                           rows: torch.Tensor, split_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: every tensor on one device. Rows must be valid (``< split_row + S``, and ``< F`` where
    below ``split_row``)."""
    _check(fast_k, fast_v, slow_k, slow_v, rows)
    in_fast = rows < split_row
    out = []
    for fast, slow in ((fast_k, slow_k), (fast_v, slow_v)):
        picked = torch.empty(rows.numel(), fast.shape[1], dtype=fast.dtype, device=rows.device)
        if fast.shape[0]:
            picked[in_fast] = fast.index_select(0, rows[in_fast])
        if slow.shape[0]:
            picked[~in_fast] = slow.index_select(0, rows[~in_fast] - split_row)
        out.append(picked)
    return out[0], out[1]


def gather_two_tiers(fast_k: torch.Tensor, fast_v: torch.Tensor, slow_k: torch.Tensor, slow_v: torch.Tensor,
                     rows: torch.Tensor, split_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)``, ``[N, D]`` on ``rows``' device: row ``i`` from the first tier if ``rows[i] < split_row``, else
    row ``rows[i] - split_row`` of the second (module docstring). On CUDA one Triton launch reading the second tier
    from pinned host memory (``slow_k`` / ``slow_v`` must then be pinned); on the CPU the torch reference (or the
    kernel under the interpreter)."""
    use_kernel = triton_available() and (rows.is_cuda or INTERPRETED)
    if not use_kernel:
        return gather_two_tiers_torch(fast_k, fast_v, slow_k, slow_v, rows, split_row)
    _check(fast_k, fast_v, slow_k, slow_v, rows)
    if (rows.is_cuda and slow_k.device.type == "cpu" and not torch.cuda.is_current_stream_capturing()
            and not (slow_k.is_pinned() and slow_v.is_pinned())):  # (a pointer query: not while capturing)
        raise ValueError("the second tier must be pinned host memory for a GPU to read it directly")
    n, head_dim = rows.numel(), fast_k.shape[1]
    out_k = torch.empty(n, head_dim, dtype=fast_k.dtype, device=rows.device)
    out_v = torch.empty_like(out_k)
    if n == 0:
        return out_k, out_v
    # an empty tier is never read (every row is masked off for it): any valid pointer stands in for it
    fk, fv = (fast_k, fast_v) if fast_k.shape[0] else (out_k, out_v)
    sk, sv = (slow_k, slow_v) if slow_k.shape[0] else (out_k, out_v)
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(1, min(64, 4096 // block_d))
    _gather_two_tiers_kernel[(triton.cdiv(n, block_r),)](fk, fv, sk, sv, rows, out_k, out_v, n, split_row,
                                                         HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d)
    return out_k, out_v
