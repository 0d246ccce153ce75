"""The slots of a device selection, placed in one launch after the running sum of the selected lengths.

A layer that selects spans on the device turns its ``[R, S]`` bool selection into a ``[R, width]`` slot matrix: each
row's selected spans' pool slots in span order (text order), then -1
(:meth:`ltri_rag.span_memory.SpanTable.slot_matrix_fixed`). In torch that is a running sum of the selected lengths
and then, per output column, a binary search for its span and some ten element-wise operations (about 2 µs each plus
the gaps between them in a decode step's CUDA graph). :func:`place_slots` keeps the running sum (``ends``, torch's
scan) and writes the matrix in one launch:

* span programs (grid ``rows x cdiv(S, BLOCK_S)``): each selected span ``i`` writes its slots
  ``starts[i] + t`` at columns ``ends[i] - taken[i] + t`` for ``t < taken[i]``, in tiles of ``BLOCK_T`` tokens
  (as many tiles as the block's longest span needs), columns past ``width`` dropped;
* fill programs (grid ``rows x cdiv(width, BLOCK_W)``): ``-1`` at the columns from the row's total on.

Every column is written by exactly one program, so nothing races; integer arithmetic only, so the result is the
torch path's exactly.

Shapes:
    taken: ``[R, S]`` int64, each span's length where the row selects it, else 0;
    ends: ``[R, S]`` int64, ``cumsum(taken, dim=1)``;
    starts: ``[S]`` int64, each span's first slot;
    returns ``[R, width]`` int64.
"""

from __future__ import annotations

import torch
from ltri_rag.kernels._triton_support import interpreted, tl, triton, triton_available

__all__ = ["place_slots", "triton_available"]

INTERPRETED = interpreted()

if triton is not None:

    @triton.jit
    def _maximum(a, b):
        return tl.maximum(a, b)

    @triton.jit(do_not_specialize=("num_spans", "width", "span_programs"))
    def _place_slots_kernel(Taken, Ends, Starts, Out, num_spans, width, span_programs,
                            BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        pid = tl.program_id(1)
        if pid < span_programs:
            i = pid * BLOCK_S + tl.arange(0, BLOCK_S)
            ok = i < num_spans
            taken = tl.load(Taken + row * num_spans + i, mask=ok, other=0)
            first = tl.load(Ends + row * num_spans + i, mask=ok, other=0) - taken  # column of the first token
            start = tl.load(Starts + i, mask=ok, other=0)
            longest = tl.reduce(taken, 0, _maximum)
            t = tl.arange(0, BLOCK_T)
            for t0 in range(0, longest, BLOCK_T):
                tok = t0 + t
                column = first[:, None] + tok[None, :]
                keep = (tok[None, :] < taken[:, None]) & (column < width)
                tl.store(Out + row * width + column, start[:, None] + tok[None, :], mask=keep)
        else:
            total = tl.load(Ends + row * num_spans + num_spans - 1)
            column = (pid - span_programs) * BLOCK_W + tl.arange(0, BLOCK_W)
            tl.store(Out + row * width + column, tl.full([BLOCK_W], -1, dtype=tl.int64),
                     mask=(column >= total) & (column < width))


def place_slots(taken: torch.Tensor, ends: torch.Tensor, starts: torch.Tensor, width: int, block_s: int = 64,
                block_t: int = 64, block_w: int = 1024) -> torch.Tensor:
    """``[R, width]`` int64 slot matrix of a selection (module docstring). No host synchronisation: a CUDA graph can
    capture it.

    Raises:
        RuntimeError: triton is not installed.
        ValueError: shapes, dtypes or devices that do not match, or tensors the kernel cannot run on.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if taken.dim() != 2 or ends.shape != taken.shape or starts.shape != (taken.shape[1],):
        raise ValueError(f"taken {tuple(taken.shape)} and ends {tuple(ends.shape)} must be one [R, S] shape and "
                         f"starts {tuple(starts.shape)} [S]")
    if any(t.dtype != torch.int64 for t in (taken, ends, starts)):
        raise ValueError("taken, ends and starts must be int64")
    if any(t.device != taken.device for t in (ends, starts)):
        raise ValueError(f"taken, ends and starts must be on one device, got {taken.device}, {ends.device}, "
                         f"{starts.device}")
    if taken.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the kernel needs CUDA tensors (got {taken.device}), or TRITON_INTERPRET=1 set before "
                         "ltri_rag.kernels.triton_slots is imported")
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    rows, num_spans = taken.shape
    if num_spans == 0 or rows == 0 or width == 0:
        return torch.full((rows, width), -1, dtype=torch.int64, device=taken.device)
    out = torch.empty(rows, width, dtype=torch.int64, device=taken.device)
    span_programs = triton.cdiv(num_spans, block_s)
    _place_slots_kernel[(rows, span_programs + triton.cdiv(width, block_w))](
        taken.contiguous(), ends.contiguous(), starts.contiguous(), out, num_spans, width, span_programs,
        BLOCK_S=block_s, BLOCK_T=block_t, BLOCK_W=block_w)
    return out
