"""The budget fill of span selection on the device, in one Triton launch after the ranking's sort.

Span selection ranks a layer's spans by a key and fills a token budget greedily in rank order: the prefix of
ranked spans whose lengths fit, then up to ``tail`` more ranks walked one by one, each taken if it still fits
(:func:`ltri_rag.retrieval._fill_budget_device` is the torch reference: some forty small operations, among them a
log-depth scan, which in a decoded token's CUDA graph are thousands of launches per step across the layers). Given
the sort's order and the running sum of the ranked lengths, everything else is one kernel:

* each program takes ``BLOCK`` consecutive ranks of a row and marks the spans of those inside the prefix
  (``running sum <= budget``; lengths are >= 1, so the sums increase and the prefix is where they stay within);
* the one program whose block holds the first rank past the prefix also walks the next ``tail`` ranks: their
  lengths are loaded at once and the walk runs in registers (each step picks its rank's length by a masked sum).

Every span is written at most once and only with True (the output starts all False), so the programs never race.
The result is the reference's, exactly (integer arithmetic only).

Shapes:
    order: ``[R, S]`` int64, each row a permutation of the spans (best first);
    ranked_sums: ``[R, S]`` int64, ``cumsum(lengths[order], dim=1)``;
    ranked: ``[R, S]`` int64, ``lengths[order]``;
    returns ``[R, S]`` bool: the spans taken.
"""

from __future__ import annotations

import torch
from ltri_rag.kernels._triton_support import interpreted, tl, triton, triton_available

__all__ = ["fill_ranked", "triton_available"]

INTERPRETED = interpreted()

if triton is not None:

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit(do_not_specialize=("num_spans", "budget"))
    def _fill_ranked_kernel(Order, Sums, Ranked, Out, num_spans, budget,
                            TAIL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        base = row.to(tl.int64) * num_spans
        rank = block * BLOCK + tl.arange(0, BLOCK)
        live = rank < num_spans
        sums = tl.load(Sums + base + rank, mask=live, other=0)
        span = tl.load(Order + base + rank, mask=live, other=0)
        fits = live & (sums <= budget)
        tl.store(Out + base + span, tl.full([BLOCK], 1, tl.int8), mask=fits)
        # the first rank past the prefix: over budget, and either rank 0 or after a rank within it
        before = tl.load(Sums + base + rank - 1, mask=live & (rank > 0), other=0)
        first_over = live & (sums > budget) & ((rank == 0) | (before <= budget))
        if tl.reduce(first_over.to(tl.int32), 0, _add) > 0:
            prefix = tl.reduce(tl.where(first_over, rank, 0), 0, _add)
            left = budget - tl.reduce(tl.where(first_over, before, 0), 0, _add)
            step = tl.arange(0, TAIL)
            walked = prefix + step
            exists = walked < num_spans
            lens = tl.load(Ranked + base + walked, mask=exists, other=budget + 1)
            taken = tl.zeros([TAIL], dtype=tl.int32)
            for j in range(TAIL):
                length = tl.reduce(tl.where(step == j, lens, 0), 0, _add)
                take = length <= left
                left = left - tl.where(take, length, 0)
                taken = tl.where(step == j, take.to(tl.int32), taken)
            keep = exists & (taken != 0)
            spans = tl.load(Order + base + walked, mask=keep, other=0)
            tl.store(Out + base + spans, tl.full([TAIL], 1, tl.int8), mask=keep)


def fill_ranked(order: torch.Tensor, ranked: torch.Tensor, ranked_sums: torch.Tensor, budget: int,
                tail: int, block: int = 1024) -> torch.Tensor:
    """``[R, S]`` bool spans taken by the greedy budget fill over ranked spans (module docstring).

    Args:
        order: ``[R, S]`` int64 span indices in rank order (a permutation per row).
        ranked: ``[R, S]`` int64 their lengths (>= 1).
        ranked_sums: ``[R, S]`` int64 running sums of ``ranked`` along each row.
        budget: Token budget per row (>= 0).
        tail: Ranks walked after the prefix (a power of two).
        block: Ranks per program (a power of two).

    Raises:
        RuntimeError: triton is not installed.
        ValueError: shapes or dtypes that do not match, or tensors the kernel cannot run on.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if order.dim() != 2 or ranked.shape != order.shape or ranked_sums.shape != order.shape:
        raise ValueError(f"order {tuple(order.shape)}, ranked {tuple(ranked.shape)} and ranked_sums "
                         f"{tuple(ranked_sums.shape)} must be one [R, S] shape")
    if any(t.dtype != torch.int64 for t in (order, ranked, ranked_sums)):
        raise ValueError("order, ranked and ranked_sums must be int64")
    if order.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the kernel needs CUDA tensors (got {order.device}), or TRITON_INTERPRET=1 set before "
                         "ltri_rag.kernels.triton_select is imported")
    if tail < 1 or tail & (tail - 1) or block < 16 or block & (block - 1):
        raise ValueError(f"tail ({tail}) and block ({block}) must be powers of two (block >= 16)")
    rows, num_spans = order.shape
    out = torch.zeros(rows, num_spans, dtype=torch.bool, device=order.device)
    if rows == 0 or num_spans == 0:
        return out
    order, ranked, ranked_sums = order.contiguous(), ranked.contiguous(), ranked_sums.contiguous()
    _fill_ranked_kernel[(rows, triton.cdiv(num_spans, block))](
        order, ranked_sums, ranked, out.view(torch.int8), num_spans, int(budget), TAIL=tail, BLOCK=block)
    return out
