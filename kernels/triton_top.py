"""The budget fill of span selection without sorting every span: one launch per selection.

Span selection ranks a layer's spans by a key (higher first, ties in span order: a stable sort) and fills a token
budget greedily in rank order: every ranked span while the running sum of lengths stays within the budget (the
*prefix*), then the next ``tail`` ranks walked one by one, each taken if it still fits
(:func:`ltri_rag.retrieval._fill_budget_device` is the reference: a segmented sort of every span, a gather, a
running sum and :func:`ltri_rag.kernels.triton_select.fill_ranked`). Only the first ``prefix + tail`` ranks are ever
read, and the prefix holds at most ``n_max`` spans, ``n_max`` being how many of the shortest spans fit in the budget
together. So the fill needs the order of the ``C >= n_max + tail`` best spans only (:func:`candidates_needed`).

At 1M tokens (16K spans per layer, two rows per layer under consensus) the reference's sort is about thirty
launches per layer (a segmented radix sort of four one-pass sweeps, its histograms and post-processing, the gather,
the scan and the fill), ~80 µs of device time in a decode step. :func:`select_fill` is one program per row:

1. **Radix select** (rows with more than ``C`` spans): the ``C``-th largest key as an order-preserving 32-bit
   integer, found 8 bits at a time: per pass a 256-bin histogram (``tl.histogram``) of the next digit of the keys
   whose higher digits equal the answer's so far (the others go to a spare bin), then the digit where the count
   from the top reaches what is still needed. Four passes over the row, in tiles of ``TILE`` keys.
2. **Candidates**: the keys above that value, and of those equal to it the first ones in span order, as many as
   still needed: exactly the first ``C`` ranks of the stable sort. Each is packed into one int64 (the key's ordered
   bits high, ``2^32 - 1 - span`` low, so that a descending integer sort orders by key, then by span) and written to
   a scratch row at its position (a running count).
3. **Sort and fill** in registers: ``tl.sort`` of the ``C`` packed candidates (descending), their lengths, the
   running sum, the prefix written to the output; then the ``tail`` ranks after it walked over scalar loads of a
   scratch copy (no reduction per step).

A row with at most ``C`` spans skips 1-2 (every span is a candidate). The result is the reference's exactly: the
same ranks (keys are compared as ordered bits; ``-0.0`` is read as ``0.0`` and every NaN as the largest value, as
torch's sort orders them) and integer arithmetic after. Within a program the scratch writes are read back after a
``tl.debug_barrier`` (a CTA barrier, which makes the block's global writes visible to the block), with volatile
loads.

Shapes:
    keys: ``[R, S]`` float32 ranking keys;
    lengths: ``[S]`` int64 span lengths (>= 1) on the keys' device;
    returns ``[R, S]`` bool: the spans taken.
"""

from __future__ import annotations

import weakref

import torch
from ltri_rag.kernels._triton_support import interpreted, next_pow2, tl, triton, triton_available

__all__ = ["MAX_CANDIDATES", "candidates_needed", "select_fill", "triton_available"]

INTERPRETED = interpreted()
MAX_CANDIDATES = 2048
"""The most candidates :func:`select_fill` sorts in one program (a power of two); selections that could need more
ranks keep the full sort (:func:`candidates_needed` says)."""
_TILE = 8192  # keys per tile of the radix passes (registers: 16 per thread at 16 warps)
_BINS = 512  # 256 digit values and a spare bin (padded to a power of two) for keys outside the current prefix

if triton is not None:

    @triton.jit
    def _add(a, b):
        return a + b

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
    def _select_fill_kernel(Keys, Lengths, Out, Scratch, num_spans, budget,
                            CAND: tl.constexpr, TILE: tl.constexpr, BINS: tl.constexpr, TAIL: tl.constexpr,
                            SELECT: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * num_spans
        scratch = Scratch + row.to(tl.int64) * (2 * CAND)
        rank = tl.arange(0, CAND)
        if SELECT:
            # 1. the CAND-th largest ordered key, 8 bits per pass (highest first)
            value = tl.zeros([], dtype=tl.int64)
            need = tl.full([], CAND, dtype=tl.int64)
            bins = tl.arange(0, BINS)
            for p in tl.static_range(4):
                shift = 24 - 8 * p
                hist = tl.zeros([BINS], dtype=tl.int32)
                for t0 in range(0, num_spans, TILE):
                    i = t0 + tl.arange(0, TILE)
                    ok = i < num_spans
                    u = _ordered(tl.load(Keys + base + i, mask=ok, other=0.0))
                    inside = ok & ((u >> (shift + 8)) == (value >> (shift + 8)))
                    hist += tl.histogram(tl.where(inside, (u >> shift) & 255, 256).to(tl.int32), BINS)
                counts = tl.where(bins < 256, hist, 0).to(tl.int64)
                from_top = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts  # keys with this digit or a higher one
                digit = tl.sum((from_top >= need) & (bins < 256), 0) - 1
                need -= tl.sum(tl.where(bins > digit, counts, 0), 0)
                value = value | (digit.to(tl.int64) << shift)
            # 2. the candidates, packed, at their positions in span order
            ties_before = tl.zeros([], dtype=tl.int64)
            placed = tl.zeros([], dtype=tl.int64)
            for t0 in range(0, num_spans, TILE):
                i = t0 + tl.arange(0, TILE)
                ok = i < num_spans
                u = _ordered(tl.load(Keys + base + i, mask=ok, other=0.0))
                tie = (ok & (u == value)).to(tl.int64)
                tie_rank = ties_before + tl.cumsum(tie, 0) - tie
                cand = ok & ((u > value) | ((tie != 0) & (tie_rank < need)))
                c64 = cand.to(tl.int64)
                pos = placed + tl.cumsum(c64, 0) - c64
                tl.store(scratch + pos, _packed(u, i), mask=cand)
                ties_before += tl.sum(tie, 0)
                placed += tl.sum(c64, 0)
            tl.debug_barrier()
            packed = tl.load(scratch + rank, volatile=True)
            live = rank < CAND
        else:
            live = rank < num_spans
            u = _ordered(tl.load(Keys + base + rank, mask=live, other=0.0))
            lowest = _packed(tl.zeros_like(u), tl.full([CAND], 4294967295, tl.int64))  # -2^63: sorts last
            packed = tl.where(live, _packed(u, rank), lowest)
        # 3. sort the candidates, fill the prefix, walk the tail
        packed = tl.sort(packed, descending=True)
        span = 4294967295 - (packed & 4294967295)
        length = tl.load(Lengths + span, mask=live, other=0)
        sums = tl.cumsum(length, 0)
        fits = live & (sums <= budget)
        tl.store(Out + base + span, tl.full([CAND], 1, tl.int8), mask=fits)
        prefix = tl.sum(fits.to(tl.int32), 0)
        taken = tl.sum(tl.where(fits, length, 0), 0)
        num_live = tl.sum(live.to(tl.int32), 0)
        if prefix < num_live:
            tl.debug_barrier()  # the candidates' reads above are done before their scratch is reused
            tl.store(scratch + rank, span)
            tl.store(scratch + CAND + rank, length)
            tl.debug_barrier()
            left = budget - taken
            for j in tl.static_range(TAIL):
                r = prefix + j
                exists = r < num_live
                step_len = tl.load(scratch + CAND + r, mask=exists, other=budget + 1, volatile=True)
                walked = tl.load(scratch + r, mask=exists, other=0, volatile=True)
                take = exists & (step_len <= left)
                left = left - tl.where(take, step_len, 0)
                tl.store(Out + base + walked, take.to(tl.int8), mask=take)


_NEEDED: dict[int, tuple[weakref.ref, int, int, int]] = {}  # id(key tensor) -> (reference, budget, tail, result)


def candidates_needed(lengths: torch.Tensor, budget: int, tail: int, key: torch.Tensor | None = None) -> int:
    """How many of the best-ranked spans the budget fill can read: ``n_max + tail``, where ``n_max`` is the most
    spans whose lengths fit in ``budget`` together (the shortest ones), capped at the number of spans.

    Args:
        lengths: ``[S]`` integer span lengths (>= 1), best on the host (a device tensor is read back).
        budget: Token budget (>= 0).
        tail: Ranks the fill walks after its prefix.
        key: A tensor that stands for these lengths for as long as it lives, unchanged (a span table's device copy
            of them, made once per set of spans): the result is remembered per key, budget and tail, so that a
            prompt's chunks and a decode step's layers do not count the lengths again (~0.1 ms on the host at 16K
            spans). None: counted every call.
    """
    if key is not None:
        hit = _NEEDED.get(id(key))
        if hit is not None and hit[0]() is key and hit[1:3] == (budget, tail):
            return hit[3]
    num_spans = int(lengths.numel())
    n_max = 0
    if num_spans:
        counts = torch.bincount(lengths.detach().to("cpu", torch.int64))  # counts[l]: spans of length l
        tokens = torch.cumsum(counts * torch.arange(counts.numel()), 0)  # tokens of every span of length <= l
        whole = int(torch.searchsorted(tokens, budget, right=True))  # lengths 0 .. whole - 1 all fit
        n_max = int(counts[:whole].sum())
        if whole < counts.numel():  # then some spans of length ``whole`` (>= 1: counts[0] is 0)
            room = budget - (int(tokens[whole - 1]) if whole else 0)
            n_max += min(int(counts[whole]), room // whole)
    needed = min(num_spans, n_max + tail)
    if key is not None:
        if len(_NEEDED) >= 1024:  # entries of tensors that are gone
            for old in [k for k, v in _NEEDED.items() if v[0]() is None]:
                del _NEEDED[old]
        _NEEDED[id(key)] = (weakref.ref(key), budget, tail, needed)
    return needed


def select_fill(keys: torch.Tensor, lengths: torch.Tensor, budget: int, tail: int, candidates: int,
                num_warps: int | None = None) -> torch.Tensor:
    """``[R, S]`` bool: the greedy budget fill over each row's stable descending order of ``keys``, reading only
    the best ``candidates`` ranks (module docstring).

    Args:
        keys: ``[R, S]`` float32 ranking keys.
        lengths: ``[S]`` int64 span lengths (>= 1) on the keys' device.
        budget: Token budget per row (>= 0).
        tail: Ranks walked after the prefix.
        candidates: Ranks the fill may read: at least :func:`candidates_needed` of the host lengths (not checked
            here: a smaller value gives a different selection), at most :data:`MAX_CANDIDATES`.
        num_warps: Warps per program (None: 8 for up to 256 candidates and no radix select, else 16).

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
                         "ltri_rag.kernels.triton_top is imported")
    if not 1 <= candidates <= MAX_CANDIDATES:
        raise ValueError(f"candidates must be in [1, {MAX_CANDIDATES}], got {candidates}")
    if num_spans >= 2 ** 31 or budget < 0 or tail < 1:
        raise ValueError(f"num_spans ({num_spans}) must be < 2^31, budget ({budget}) >= 0 and tail ({tail}) >= 1")
    out = torch.zeros(rows, num_spans, dtype=torch.bool, device=keys.device)
    if rows == 0 or num_spans == 0:
        return out
    cand = max(16, next_pow2(candidates))  # the ranks sorted: at least those asked for
    select = num_spans > cand  # else every span is a candidate
    if not select:
        cand = max(16, next_pow2(num_spans))
    scratch = torch.empty(rows, 2 * cand, dtype=torch.int64, device=keys.device)
    if num_warps is None:
        num_warps = 16 if select or cand > 256 else 8
    _select_fill_kernel[(rows,)](
        keys.contiguous(), lengths.contiguous(), out.view(torch.int8), scratch, num_spans, int(budget),
        CAND=cand, TILE=min(_TILE, next_pow2(num_spans)), BINS=_BINS, TAIL=tail, SELECT=select,
        num_warps=num_warps)
    return out
