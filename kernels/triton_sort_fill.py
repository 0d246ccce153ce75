"""The budget fill of span selection for rows of a few hundred spans: the sort and the fill in one launch.

Span selection ranks a layer's spans by a key (higher first, ties in span order: a stable sort) and fills a token
budget greedily in rank order: every ranked span while the running sum of lengths stays within the budget (the
*prefix*), then the next ``tail`` ranks walked one by one, each taken if it still fits. The reference
(:func:`ltri_rag.retrieval._fill_budget_device`) sorts with torch's segmented sort, gathers the ranked lengths, runs a
scan and then :func:`ltri_rag.kernels.triton_select.fill_ranked`: some ten launches per selection, mostly latency at
a short context (an 8K prompt leaves ~100 spans per layer).

:func:`sort_fill` is one program per row, everything in registers:

* each key becomes an order-preserving 32-bit integer (``-0.0`` read as ``0.0`` and every NaN as the largest value,
  as torch's sort orders them), packed with its span into one int64 (the key's bits high, ``2^32 - 1 - span``
  low), so that a descending ``tl.sort`` of the integers orders by key, then by span: the stable order;
* the ranked lengths are loaded, summed (``tl.cumsum``), and the prefix is written to the output;
* the ``tail`` ranks after it are walked over scalar loads of a scratch copy of the ranked spans and lengths, read
  back after a ``tl.debug_barrier`` (a CTA barrier, which makes the block's global writes visible to the block)
  with volatile loads (no reduction per step).

The result is the reference's exactly (the same ranks, then integer arithmetic). A program sorts the whole row, so
the row length is bounded (:data:`MAX_SPANS`); longer rows keep the reference, whose multi-block sort scales.

**Measured and not adopted** (session 25, H200, both selections of a layer): a radix select of the best ranks in
one program per row (4 or 8 bits per pass with ``tl.histogram``), then a sort of those candidates only. One
multiprocessor per row is too slow for long rows: 117-135 µs against 109 for the reference at 16K spans, 438-540
against 131 at 64K.

Shapes:
    keys: ``[R, S]`` float32 ranking keys;
    lengths: ``[S]`` int64 span lengths (>= 1) on the keys' device;
    returns ``[R, S]`` bool: the spans taken.
"""

from __future__ import annotations

import torch
from ltri_rag.kernels._triton_support import interpreted, next_pow2, tl, triton, triton_available

__all__ = ["MAX_SPANS", "sort_fill", "triton_available"]

INTERPRETED = interpreted()
MAX_SPANS = 2048
"""The longest row :func:`sort_fill` takes (one program sorts it in registers)."""

if triton is not None:

    @triton.jit
    def _ordered(x):
        """float32 keys -> int64 in [0, 2^32), in the order torch's sort gives them: -0.0 as 0.0, NaN largest."""
        x = tl.where(x == 0.0, 0.0, x)
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.where(x != x, 0x7FC00000, bits)  # noqa: PLR0124 (the NaN test)
        flip = tl.where(bits < 0, -1, -2147483648)  # negatives: every bit; the others: the sign bit
        return (bits ^ flip).to(tl.int64) & 0xFFFFFFFF

    @triton.jit
    def _packed(u, span):
        """Ordered key ``u`` and span index -> int64 whose descending order is (key desc, span asc)."""
        return ((u - 2147483648) << 32) | (4294967295 - span.to(tl.int64))

    @triton.jit(do_not_specialize=("num_spans", "budget"))
    def _sort_fill_kernel(Keys, Lengths, Out, Scratch, num_spans, budget, BLOCK: tl.constexpr, TAIL: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * num_spans
        scratch = Scratch + row.to(tl.int64) * (2 * BLOCK)
        rank = tl.arange(0, BLOCK)
        live = rank < num_spans
        u = _ordered(tl.load(Keys + base + rank, mask=live, other=0.0))
        lowest = _packed(tl.zeros_like(u), tl.full([BLOCK], 4294967295, tl.int64))  # -2^63: sorts last
        packed = tl.sort(tl.where(live, _packed(u, rank), lowest), descending=True)
        span = 4294967295 - (packed & 4294967295)
        length = tl.load(Lengths + span, mask=live, other=0)
        fits = live & (tl.cumsum(length, 0) <= budget)
        tl.store(Out + base + span, tl.full([BLOCK], 1, tl.int8), mask=fits)
        prefix = tl.sum(fits.to(tl.int32), 0)
        if prefix < num_spans:  # walk the next TAIL ranks, each taken if it still fits
            tl.store(scratch + rank, span)
            tl.store(scratch + BLOCK + rank, length)
            tl.debug_barrier()
            left = budget - tl.sum(tl.where(fits, length, 0), 0)
            for j in tl.static_range(TAIL):
                r = prefix + j
                exists = r < num_spans
                step_len = tl.load(scratch + BLOCK + r, mask=exists, other=budget + 1, volatile=True)
                walked = tl.load(scratch + r, mask=exists, other=0, volatile=True)
                take = exists & (step_len <= left)
                left = left - tl.where(take, step_len, 0)
                tl.store(Out + base + walked, take.to(tl.int8), mask=take)


def sort_fill(keys: torch.Tensor, lengths: torch.Tensor, budget: int, tail: int,
              num_warps: int | None = None) -> torch.Tensor:
    """``[R, S]`` bool: the greedy budget fill over each row's stable descending order of ``keys`` (module
    docstring), one program per row.

    Args:
        keys: ``[R, S]`` float32 ranking keys, ``S <= MAX_SPANS``.
        lengths: ``[S]`` int64 span lengths (>= 1) on the keys' device.
        budget: Token budget per row (>= 0).
        tail: Ranks walked after the prefix (>= 1).
        num_warps: Warps per program (None: 4 up to 256 spans, 8 up to 1,024, else 16).

    Raises:
        RuntimeError: triton is not installed.
        ValueError: shapes, dtypes or sizes the kernel does not take, or tensors it cannot run on.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if keys.dim() != 2 or keys.dtype != torch.float32:
        raise ValueError(f"keys must be [R, S] float32, got {tuple(keys.shape)} {keys.dtype}")
    rows, num_spans = keys.shape
    if lengths.shape != (num_spans,) or lengths.dtype != torch.int64 or lengths.device != keys.device:
        raise ValueError(f"lengths must be [{num_spans}] int64 on {keys.device}, got {tuple(lengths.shape)} "
                         f"{lengths.dtype} on {lengths.device}")
    if keys.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the kernel needs CUDA tensors (got {keys.device}), or TRITON_INTERPRET=1 set before "
                         "ltri_rag.kernels.triton_sort_fill is imported")
    if num_spans > MAX_SPANS or budget < 0 or tail < 1:
        raise ValueError(f"num_spans ({num_spans}) must be <= {MAX_SPANS}, budget ({budget}) >= 0 and tail "
                         f"({tail}) >= 1")
    out = torch.zeros(rows, num_spans, dtype=torch.bool, device=keys.device)
    if rows == 0 or num_spans == 0:
        return out
    block = max(16, next_pow2(num_spans))
    scratch = torch.empty(rows, 2 * block, dtype=torch.int64, device=keys.device)
    if num_warps is None:
        num_warps = 4 if block <= 256 else (8 if block <= 1024 else 16)
    _sort_fill_kernel[(rows,)](keys.contiguous(), lengths.contiguous(), out.view(torch.int8), scratch, num_spans,
                               int(budget), BLOCK=block, TAIL=tail, num_warps=num_warps)
    return out
