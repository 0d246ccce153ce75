"""Gather K/V rows from the span pool's two tiers by index, and write rows into its host tier, on the compute device,
with no host work.

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

The way back, :func:`scatter_rows` (reference :func:`scatter_rows_torch`): rows computed on the GPU (the K/V of
evicted tokens) written by index straight into pinned host pages. Copying them with ``Tensor.to("cpu")`` instead
makes the host wait for the device (a device-to-host copy into pageable memory synchronises) and then scatter them
with the host's memory bandwidth; the kernel's writes cross PCIe in stream order while the host goes on.

Shapes:
    dst_k / dst_v: ``[R, D]`` destination rows (pinned host memory on a GPU; any memory of ``src``'s device);
    rows: ``[N]`` int64 on ``src``'s device, distinct, each ``< R``;
    src_k / src_v: ``[N, D]`` the rows to write, on the compute device.
"""

from __future__ import annotations

import torch
from ltri_rag.kernels._triton_support import interpreted, tl, triton, triton_available

__all__ = ["gather_two_tiers", "gather_two_tiers_torch", "scatter_rows", "scatter_rows_torch", "triton_available"]

INTERPRETED = interpreted()

if triton is not None:

    @triton.jit(do_not_specialize=("n_rows", "split_row"))
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

    @triton.jit(do_not_specialize=("n_rows",))
    def _scatter_rows_kernel(src_k, src_v, rows, dst_k, dst_v, n_rows,
                             HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [R] source rows
        live = r < n_rows
        dst = tl.load(rows + r, mask=live, other=0).to(tl.int64)  # [R] destination row
        cols = tl.arange(0, BLOCK_D)
        ok = live[:, None] & (cols < HEAD_DIM)[None, :]
        src_off = r[:, None].to(tl.int64) * HEAD_DIM + cols[None, :]
        dst_off = dst[:, None] * HEAD_DIM + cols[None, :]
        tl.store(dst_k + dst_off, tl.load(src_k + src_off, mask=ok, other=0.0), mask=ok)
        tl.store(dst_v + dst_off, tl.load(src_v + src_off, mask=ok, other=0.0), mask=ok)


def _check(fast_k: torch.Tensor, fast_v: torch.Tensor, slow_k: torch.Tensor, slow_v: torch.Tensor,
           rows: torch.Tensor) -> None:
    parts = {"fast_k": fast_k, "fast_v": fast_v, "slow_k": slow_k, "slow_v": slow_v}
    head_dim, dtype = fast_k.shape[-1], fast_k.dtype
    for name, t in parts.items():
        if t.dim() != 2 or t.shape[1] != head_dim or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous [rows, {head_dim}] {dtype}, got {t.dtype} {tuple(t.shape)}")
    if rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be [N] int64, got {rows.dtype} {tuple(rows.shape)}")


def _require_pinned(on: torch.Tensor, host_k: torch.Tensor, host_v: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` if a GPU (``on``'s device) would touch non-empty host tensors that are not
    pinned. (A pointer query, skipped while a CUDA graph is captured; an empty tensor has no storage to pin and is
    never touched.)"""
    if (on.is_cuda and host_k.device.type == "cpu" and host_k.shape[0]
            and not torch.cuda.is_current_stream_capturing()
            and not (host_k.is_pinned() and host_v.is_pinned())):
        raise ValueError(message)


def _blocks(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_D)`` of the row kernels: a row per lane group, about 4K elements per program."""
    block_d = triton.next_power_of_2(head_dim)
    return max(1, min(64, 4096 // block_d)), block_d


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
    _require_pinned(rows, slow_k, slow_v, "the second tier must be pinned host memory for a GPU to read it directly")
    n, head_dim = rows.numel(), fast_k.shape[1]
    out_k = torch.empty(n, head_dim, dtype=fast_k.dtype, device=rows.device)
    out_v = torch.empty_like(out_k)
    if n == 0:
        return out_k, out_v
    # an empty tier is never read (every row is masked off for it): any valid pointer stands in for it
    fk, fv = (fast_k, fast_v) if fast_k.shape[0] else (out_k, out_v)
    sk, sv = (slow_k, slow_v) if slow_k.shape[0] else (out_k, out_v)
    block_r, block_d = _blocks(head_dim)
    _gather_two_tiers_kernel[(triton.cdiv(n, block_r),)](fk, fv, sk, sv, rows, out_k, out_v, n, split_row,
                                                         HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d)
    return out_k, out_v


def _check_scatter(dst_k: torch.Tensor, dst_v: torch.Tensor, rows: torch.Tensor, src_k: torch.Tensor,
                   src_v: torch.Tensor) -> None:
    head_dim, dtype = dst_k.shape[-1] if dst_k.dim() == 2 else -1, dst_k.dtype
    for name, t in {"dst_k": dst_k, "dst_v": dst_v, "src_k": src_k, "src_v": src_v}.items():
        if t.dim() != 2 or t.shape[1] != head_dim or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous [rows, {head_dim}] {dtype}, got {t.dtype} {tuple(t.shape)}")
    if rows.dim() != 1 or rows.dtype != torch.int64 or rows.numel() != src_k.shape[0] or src_v.shape != src_k.shape:
        raise ValueError(f"rows must be [N] int64 with N = src rows ({src_k.shape[0]}), got {rows.dtype} "
                         f"{tuple(rows.shape)} (src_v {tuple(src_v.shape)})")
    if dst_v.shape != dst_k.shape:
        raise ValueError(f"dst_v {tuple(dst_v.shape)} must match dst_k {tuple(dst_k.shape)}")


def scatter_rows_torch(dst_k: torch.Tensor, dst_v: torch.Tensor, rows: torch.Tensor, src_k: torch.Tensor,
                       src_v: torch.Tensor) -> None:
    """The reference: ``dst_k[rows] = src_k`` and ``dst_v[rows] = src_v`` in place (``rows`` distinct, valid); the
    sources are copied to the destination's device first."""
    _check_scatter(dst_k, dst_v, rows, src_k, src_v)
    idx = rows.to(dst_k.device)
    dst_k.index_copy_(0, idx, src_k.to(dst_k.device))
    dst_v.index_copy_(0, idx, src_v.to(dst_v.device))


def scatter_rows(dst_k: torch.Tensor, dst_v: torch.Tensor, rows: torch.Tensor, src_k: torch.Tensor,
                 src_v: torch.Tensor) -> None:
    """Write ``src_k`` / ``src_v`` (``[N, D]``) to rows ``rows`` of ``dst_k`` / ``dst_v`` in place (module
    docstring). With CUDA sources one Triton launch, which writes pinned host destinations directly (they must then
    be pinned; the writes are done when the stream reaches them: a host reader synchronises first); elsewhere the
    torch reference (or the kernel under the interpreter)."""
    use_kernel = triton_available() and (src_k.is_cuda or INTERPRETED) and rows.device == src_k.device
    if not use_kernel:
        scatter_rows_torch(dst_k, dst_v, rows, src_k, src_v)
        return
    _check_scatter(dst_k, dst_v, rows, src_k, src_v)
    _require_pinned(src_k, dst_k, dst_v, "a host destination must be pinned memory for a GPU to write it directly")
    n, head_dim = rows.numel(), dst_k.shape[1]
    if n == 0:
        return
    block_r, block_d = _blocks(head_dim)
    _scatter_rows_kernel[(triton.cdiv(n, block_r),)](src_k, src_v, rows, dst_k, dst_v, n,
                                                     HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d)
