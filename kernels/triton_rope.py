"""Gather rows and move their rotary positions in one launch (the engine's per-layer memory assembly).

Every retrieving layer, at every chunk and decoded token, builds its memory part: the sink tokens and the
selected pool slots, each key rotated from the position it was read at to the position the scheme gives it
(:mod:`ltri_rag.rope`), values copied as they are. In torch that is a few dozen small launches per layer (zeros,
index_select per tier, copies, the rotation's cos / sin / products / concatenation), and the engine is
host-bound on exactly such launches. :func:`gather_rotate_triton` does it in one: each output row names its
source by an element offset, and its position shift.

Shapes:
    main_k / main_v: any tensors whose rows (last dim, stride 1) are addressed by element offsets (the pool's
        pages, or the queries of a layer);
    aux_k / aux_v: ``[A, D]`` contiguous rows (the sink tokens, and pool rows staged from host memory), or None;
    source: ``[N]`` int64: ``>= 0`` the element offset of a row of main; ``-1`` an empty row (written as zeros);
        ``<= -2`` row ``-2 - source`` of aux;
    delta: ``[P]`` int64 position shifts; row ``r`` is rotated by ``delta[r % P]`` (``P = N``: one per row, or the
        length of a repeating pattern, e.g. the query positions repeated over heads);
    inv_freq: ``[rot_dim / 2]`` rotary inverse frequencies (the rotate-half layout: dimension ``i`` pairs with
        ``i + rot_dim / 2``; dimensions from ``rot_dim`` on are copied);
    out_k / out_v: ``[N, D]`` of the output dtype.

Angles are ``delta * inv_freq`` counted in turns in float64 and reduced to one turn there (so large positions stay
exact), then their cosine and sine are taken in float32 (float64 ``cos`` / ``sin`` of large arguments take a slow
reduction path on the GPU: 0.37 ms per layer's memory part on the H200, most of a captured retrieving decode step).
:func:`ltri_rag.rope.rotate` takes them in float64 and rounds: the two agree to a few float32 ulps. The products run
in float32, on the rotate-half layout's two halves held as separate tiles (``HALF_TILES``: each angle, cosine and
sine once per frequency, ``a cos - b sin`` and ``b cos + a sin``; before session 21 one ``[rows, head_dim]`` tile with
every angle computed twice and the partner columns gathered: 23.8 against 10.3 µs for 17K rows on an H200). Under the
interpreter (``TRITON_INTERPRET=1`` set before this module is imported) the kernel runs on CPU tensors.
"""

from __future__ import annotations

import torch
from ltri_rag.kernels._triton_support import (interpreted, multiprocessors, tl, triton, triton_available,
                                               turns_per_position)

__all__ = ["gather_rotate_triton", "triton_available"]

_MAX_HEAD_DIM = 256
HALF_TILES = True
"""Whether the rotation works on the two halves of the rotate-half layout as separate ``[rows, rot_dim / 2]`` tiles
(angles, cosines and sines computed once per frequency, no gather of partner columns) instead of one
``[rows, head_dim]`` tile with each column's partner gathered from it and its angle computed twice (False: kept for
timing runs, ``benchmarks.bench_small_kernels``). The same formula either way."""
SPREAD_FEW_ROWS = True
"""Whether a launch over few rows (a decoded token's queries) uses fewer rows per program, down to 4, so that it
runs on about two programs per multiprocessor instead of one program (False: 32 rows per program at head_dim 128
whatever the count, the previous launch; for timing runs)."""
INTERPRETED = interpreted()


if triton is not None:

    @triton.jit(do_not_specialize=("n_rows", "period"))
    def _gather_rotate_kernel(
        main_k, main_v, aux_k, aux_v, source, delta, inv_freq, out_k, out_v,
        n_rows, period, stride_aux,
        HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
        HAS_V: tl.constexpr, HAS_AUX: tl.constexpr, ROTATE: tl.constexpr, IDENTITY: tl.constexpr,
        BLOCK_H: tl.constexpr, HALF_TILES: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
        live = rows < n_rows
        if IDENTITY:  # row r of a dense [N, HEAD_DIM] main
            src = tl.where(live, rows.to(tl.int64) * HEAD_DIM, -1)
        else:
            src = tl.load(source + rows, mask=live, other=-1)  # [R] int64
        cols = tl.arange(0, BLOCK_D)  # [C]
        col_ok = cols < HEAD_DIM
        from_main = (src >= 0)[:, None] & col_ok[None, :]
        main_off = tl.where(src >= 0, src, 0)[:, None] + cols[None, :]
        if HAS_AUX:
            from_aux = (src <= -2)[:, None] & col_ok[None, :]
            aux_row = tl.where(src <= -2, -2 - src, 0)
            aux_off = aux_row[:, None] * stride_aux + cols[None, :]
        out_off = rows[:, None].to(tl.int64) * HEAD_DIM + cols[None, :]
        store_mask = live[:, None] & col_ok[None, :]
        if ROTATE:
            shift = tl.load(delta + (rows % period), mask=live, other=0).to(tl.float64)  # [R]
        if ROTATE and HALF_TILES:
            # the rotate-half pairs as two [R, HALF] tiles: column c of the first half pairs with c of the second
            ch = tl.arange(0, BLOCK_H)
            h_ok = ch < HALF
            main_h = tl.where(src >= 0, src, 0)[:, None] + ch[None, :]
            in_main = (src >= 0)[:, None] & h_ok[None, :]
            a = tl.load(main_k + main_h, mask=in_main, other=0.0).to(tl.float32)
            b = tl.load(main_k + main_h + HALF, mask=in_main, other=0.0).to(tl.float32)
            if HAS_AUX:
                aux_h = aux_row[:, None] * stride_aux + ch[None, :]
                in_aux = (src <= -2)[:, None] & h_ok[None, :]
                a += tl.load(aux_k + aux_h, mask=in_aux, other=0.0).to(tl.float32)
                b += tl.load(aux_k + aux_h + HALF, mask=in_aux, other=0.0).to(tl.float32)
            freq = tl.load(inv_freq + ch, mask=h_ok, other=0.0)  # [H] float64, turns per position
            turns = shift[:, None] * freq[None, :]  # [R, H] float64
            angle = (turns - tl.floor(turns + 0.5)).to(tl.float32) * 6.283185307179586
            cos = tl.cos(angle)
            sin = tl.sin(angle)
            out_h = rows[:, None].to(tl.int64) * HEAD_DIM + ch[None, :]
            put = live[:, None] & h_ok[None, :]
            tl.store(out_k + out_h, (a * cos - b * sin).to(out_k.dtype.element_ty), mask=put)
            tl.store(out_k + out_h + HALF, (b * cos + a * sin).to(out_k.dtype.element_ty), mask=put)
            if 2 * HALF < HEAD_DIM:  # dimensions past the rotary ones are copied
                past = (cols >= 2 * HALF)[None, :]
                k = tl.load(main_k + main_off, mask=from_main & past, other=0.0).to(tl.float32)
                if HAS_AUX:
                    k += tl.load(aux_k + aux_off, mask=from_aux & past, other=0.0).to(tl.float32)
                tl.store(out_k + out_off, k.to(out_k.dtype.element_ty), mask=store_mask & past)
        else:
            if ROTATE:
                # the rotate-half partner of each column (itself past rot_dim) and the sign of its term
                in_rot = cols < 2 * HALF
                partner = tl.where(cols < HALF, cols + HALF, tl.where(in_rot, cols - HALF, cols))
                sign = tl.where(cols < HALF, -1.0, 1.0)
                freq = tl.load(inv_freq + (cols % HALF), mask=in_rot, other=0.0)  # [C] float64, turns per position
                turns = shift[:, None] * freq[None, :]  # [R, C] float64
                # the angle reduced to [-pi, pi] in float64 (exact for shifts far beyond any context), then a
                # float32 cosine and sine: float64 cos / sin of large arguments take a slow path on the GPU
                angle = (turns - tl.floor(turns + 0.5)).to(tl.float32) * 6.283185307179586
                cos = tl.where(in_rot[None, :], tl.cos(angle), 1.0)
                sin = tl.where(in_rot[None, :], tl.sin(angle), 0.0)
                partner_off = tl.where(src >= 0, src, 0)[:, None] + partner[None, :]
            k = tl.load(main_k + main_off, mask=from_main, other=0.0).to(tl.float32)
            if ROTATE:
                kp = tl.load(main_k + partner_off, mask=from_main, other=0.0).to(tl.float32)
            if HAS_AUX:
                k += tl.load(aux_k + aux_off, mask=from_aux, other=0.0).to(tl.float32)
                if ROTATE:
                    kp += tl.load(aux_k + aux_row[:, None] * stride_aux + partner[None, :], mask=from_aux,
                                  other=0.0).to(tl.float32)
            if ROTATE:
                k = k * cos + sign[None, :] * (kp * sin)
            tl.store(out_k + out_off, k.to(out_k.dtype.element_ty), mask=store_mask)
        if HAS_V:
            v = tl.load(main_v + main_off, mask=from_main, other=0.0)
            if HAS_AUX:
                v += tl.load(aux_v + aux_off, mask=from_aux, other=0.0)
            tl.store(out_v + out_off, v.to(out_v.dtype.element_ty), mask=store_mask)


def _check(name: str, t: torch.Tensor, device: torch.device, head_dim: int | None = None) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if head_dim is not None and (t.dim() == 0 or t.shape[-1] != head_dim or t.stride(-1) != 1):
        raise ValueError(f"{name} {tuple(t.shape)} must end in a dense head_dim {head_dim} dimension")


def gather_rotate_triton(
    main_k: torch.Tensor,
    main_v: torch.Tensor | None,
    source: torch.Tensor | None,
    delta: torch.Tensor | None,
    inv_freq: torch.Tensor,
    *,
    aux_k: torch.Tensor | None = None,
    aux_v: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows named by ``source`` (see the module docstring), K rotated by ``delta`` positions, in one launch.

    Args:
        main_k: Tensor whose rows the non-negative ``source`` entries address (element offsets; last dim dense).
        main_v: Tensor of the same layout as ``main_k`` (the values, copied), or None (only K is produced).
        source: ``[N]`` int64 row sources on the tensors' device, or None: ``main_k`` is dense and its rows are
            taken in order (``N`` = its rows).
        delta: ``[P]`` int64 position shifts (``N % P == 0``), or None: no rotation (a plain gather).
        inv_freq: ``[rot_dim / 2]`` inverse frequencies.
        aux_k, aux_v: ``[A, D]`` rows named by ``source <= -2`` (row ``-2 - source``), or None.
        out_dtype: Dtype of the result (default ``main_k``'s).

    Returns:
        ``(k, v)``, each ``[N, D]`` (``v`` None without ``main_v``).

    Raises:
        RuntimeError: triton is not installed.
        ValueError: tensors on different devices, a head_dim over 256, a ``delta`` whose length does not divide
            ``N``, or CPU tensors without the interpreter.
    """
    if triton is None:
        raise RuntimeError("triton is not installed: use ltri_rag.rope.rotate and index_select instead")
    device = main_k.device
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the triton kernels need CUDA tensors (got {device}), or TRITON_INTERPRET=1 set "
                         "before ltri_rag.kernels.triton_rope is imported")
    head_dim = main_k.shape[-1]
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {_MAX_HEAD_DIM} is not supported by the triton kernel")
    half = inv_freq.numel()
    if 2 * half > head_dim:
        raise ValueError(f"rotary dim {2 * half} exceeds head_dim {head_dim}")
    _check("main_k", main_k, device, head_dim)
    for name, t in (("main_v", main_v), ("aux_k", aux_k), ("aux_v", aux_v)):
        if t is not None:
            _check(name, t, device, head_dim)
    if main_v is not None and (main_v.shape != main_k.shape or main_v.stride() != main_k.stride()):
        raise ValueError(f"main_v {tuple(main_v.shape)} must have main_k's shape and strides {tuple(main_k.shape)}")
    if main_v is not None and (aux_k is None) != (aux_v is None):
        raise ValueError("aux_k and aux_v go together when main_v is given")
    if aux_k is not None and (aux_k.dim() != 2 or (aux_v is not None and aux_v.shape != aux_k.shape)):
        raise ValueError(f"aux rows must be [A, {head_dim}] (got {tuple(aux_k.shape)})")
    if source is None:
        if not main_k.is_contiguous():
            raise ValueError("without source, main_k must be contiguous")
        n_rows = main_k.numel() // head_dim
    else:
        source = source.reshape(-1)
        if source.dtype != torch.int64 or source.device != device:
            raise ValueError(f"source must be int64 on {device}, got {source.dtype} on {source.device}")
        n_rows = source.numel()
    rotate = delta is not None and half > 0
    if rotate:
        delta = delta.reshape(-1)
        if delta.dtype != torch.int64 or delta.device != device:
            raise ValueError(f"delta must be int64 on {device}, got {delta.dtype} on {delta.device}")
        if delta.numel() == 0 or n_rows % delta.numel():
            raise ValueError(f"delta has {delta.numel()} entries, which does not divide {n_rows} rows")
    out_dtype = main_k.dtype if out_dtype is None else out_dtype
    if INTERPRETED and out_dtype == torch.bfloat16:  # the interpreter truncates float32 -> bfloat16: round in torch
        k, v = gather_rotate_triton(main_k, main_v, source, delta, inv_freq, aux_k=aux_k, aux_v=aux_v,
                                    out_dtype=torch.float32)
        return k.to(out_dtype), None if v is None else v.to(out_dtype)
    out_k = torch.empty(n_rows, head_dim, dtype=out_dtype, device=device)
    out_v = None if main_v is None else torch.empty(n_rows, head_dim, dtype=out_dtype, device=device)
    if n_rows == 0:
        return out_k, out_v
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_r = max(1, min(64, 4096 // block_d))
    if device.type == "cuda" and SPREAD_FEW_ROWS:  # few rows (a decoded token's queries): more programs
        while block_r > 4 and triton.cdiv(n_rows, block_r) < 2 * multiprocessors(device.index or 0):
            block_r //= 2
    # frequencies in turns per position (float64, computed where inv_freq lives: nothing is copied from the host)
    freq = turns_per_position(inv_freq, device) if rotate else main_k
    _gather_rotate_kernel[(triton.cdiv(n_rows, block_r),)](
        main_k, main_k if main_v is None else main_v,
        main_k if aux_k is None else aux_k, main_k if aux_v is None else aux_v,
        out_k if source is None else source, delta if rotate else out_k, freq, out_k, out_k if out_v is None else out_v,
        n_rows, delta.numel() if rotate else 1, 0 if aux_k is None else aux_k.stride(0),
        HEAD_DIM=head_dim, HALF=max(half, 1), BLOCK_D=block_d, BLOCK_R=block_r,
        HAS_V=main_v is not None, HAS_AUX=aux_k is not None, ROTATE=rotate, IDENTITY=source is None,
        BLOCK_H=max(16, triton.next_power_of_2(max(half, 1))), HALF_TILES=HALF_TILES,
    )
    return out_k, out_v
