"""The budget fill of span selection in a few launches: rows sorted in registers, long rows cut down first.

Span selection ranks a layer's spans by a key (higher first, ties in span order: a stable sort) and fills a token
budget greedily in rank order: every ranked span while the running sum of lengths stays within the budget (the
*prefix*), then the next ``tail`` ranks walked one by one, each taken if it still fits. The reference
(:func:`ltri_rag.retrieval._fill_budget_device`) sorts with torch's segmented sort, gathers the ranked lengths, runs a
scan and then :func:`ltri_rag.kernels.triton_select.fill_ranked`: some ten launches per selection at a short context,
about thirty at 16K spans per row (1M tokens), where its radix sort's passes dominate.

Keys are compared as packed integers: each float key becomes an order-preserving 32-bit integer (``-0.0`` read as
``0.0`` and every NaN as the largest value, as torch's sort orders them), packed with its span into one int64 (the
key's bits high, ``2^32 - 1 - span`` low), so that a descending ``tl.sort`` of the integers orders by key, then by
span: the stable order, with no two keys equal.

* **A row of up to** :data:`MAX_SPANS` **keys** is one program (``_sort_fill_kernel``): the row sorted in registers,
  the ranked lengths loaded and summed (``tl.cumsum``), the prefix written to the output, then the ``tail`` ranks
  after it walked over scalar loads of a scratch copy of the ranked spans and lengths, read back after a
  ``tl.debug_barrier`` (a CTA barrier, which makes the block's global writes visible to the block) with volatile
  loads (no reduction per step).
* **A longer row** first goes through rounds of ``_chunk_top_kernel``, each program sorting a chunk of
  :data:`CHUNK` keys (or four times the kept ranks) and keeping its best ``keep`` packed keys, until the kept keys
  of a row fit one program, which sorts and fills them. The fill reads only the first ``prefix + tail`` ranks, and
  the prefix holds at most as many spans as the shortest spans that fit in the budget together
  (:func:`candidates_needed`): with ``keep`` at least that, the best ``keep`` of all keys are among the chunks'
  best ``keep``, so the result is the same. At 16K spans: 16 programs per row, then 4, then 1.

The result is the reference's exactly (the same ranks, then integer arithmetic).

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

import weakref
from typing import Any, NamedTuple

import torch
from ltri_rag.kernels._triton_support import interpreted, next_pow2, tl, triton, triton_available

__all__ = ["MAX_CANDIDATES", "MAX_SPANS", "Launch", "candidates_needed", "launch_plan", "launch_variants", "sort_fill",
           "triton_available"]

INTERPRETED = interpreted()
MAX_SPANS = 1024
"""The longest row one program sorts in registers; longer rows go through rounds of chunk tops first."""
MAX_CANDIDATES = 512
"""The most ranks a fill of a longer row may read (:func:`candidates_needed`)."""
MIN_KEEP = 256
"""The fewest ranks a chunk keeps: few sizes, since each compiles ``tl.sort`` on first use."""
CHUNK = 1024
"""Keys per program of a chunk-top round (at least four times the candidates kept)."""

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

    @triton.jit
    def _load_packed(Src, row_base, index, n, BLOCK: tl.constexpr, FLOAT: tl.constexpr):
        """``[BLOCK]`` packed keys at ``index`` (``-2^63``, sorting last, where ``index >= n``): float keys packed
        with their index as span (``FLOAT``), or keys packed already (a candidates buffer)."""
        ok = index < n
        lowest = _packed(tl.zeros([BLOCK], tl.int64), tl.full([BLOCK], 4294967295, tl.int64))  # -2^63
        if FLOAT:  # one return after the branches: Triton checks every return of a helper against the others
            packed = tl.where(ok, _packed(_ordered(tl.load(Src + row_base + index, mask=ok, other=0.0)), index), lowest)
        else:
            packed = tl.where(ok, tl.load(Src + row_base + index, mask=ok, other=0), lowest)
        return packed, lowest

    @triton.jit(do_not_specialize=("n", "src_stride", "dst_stride"))
    def _chunk_top_kernel(Src, Dst, n, src_stride, dst_stride, CHUNK: tl.constexpr, KEEP: tl.constexpr,
                          FLOAT: tl.constexpr):
        """Program (row, part): the best ``KEEP`` of keys ``part * CHUNK ..`` of the row, packed, in rank order,
        to ``Dst[row, part * KEEP ..]`` (padded with ``-2^63`` where the chunk has fewer)."""
        row = tl.program_id(0)
        part = tl.program_id(1)
        index = part * CHUNK + tl.arange(0, CHUNK)
        packed, lowest = _load_packed(Src, row.to(tl.int64) * src_stride, index, n, CHUNK, FLOAT)
        packed = tl.sort(packed, descending=True)
        r = tl.arange(0, CHUNK)
        tl.store(Dst + row.to(tl.int64) * dst_stride + part * KEEP + r, packed, mask=r < KEEP)

    @triton.jit(do_not_specialize=("n", "src_stride", "num_spans", "budget"))
    def _sort_fill_kernel(Src, Lengths, Out, Scratch, n, src_stride, num_spans, budget, BLOCK: tl.constexpr,
                          TAIL: tl.constexpr, FLOAT: tl.constexpr):
        row = tl.program_id(0)
        out = Out + row.to(tl.int64) * num_spans
        scratch = Scratch + row.to(tl.int64) * (2 * BLOCK)
        rank = tl.arange(0, BLOCK)
        packed, lowest = _load_packed(Src, row.to(tl.int64) * src_stride, rank, n, BLOCK, FLOAT)
        packed = tl.sort(packed, descending=True)
        live = packed != lowest  # padding sorts last
        num_live = tl.sum(live.to(tl.int32), 0)
        span = 4294967295 - (packed & 4294967295)
        length = tl.load(Lengths + span, mask=live, other=0)
        fits = live & (tl.cumsum(length, 0) <= budget)
        tl.store(out + span, tl.full([BLOCK], 1, tl.int8), mask=fits)
        prefix = tl.sum(fits.to(tl.int32), 0)
        if prefix < num_live:  # walk the next TAIL ranks, each taken if it still fits
            tl.store(scratch + rank, span)
            tl.store(scratch + BLOCK + rank, length)
            tl.debug_barrier()
            left = budget - tl.sum(tl.where(fits, length, 0), 0)
            for j in tl.static_range(TAIL):
                r = prefix + j
                exists = r < num_live
                step_len = tl.load(scratch + BLOCK + r, mask=exists, other=budget + 1, volatile=True)
                walked = tl.load(scratch + r, mask=exists, other=0, volatile=True)
                take = exists & (step_len <= left)
                left = left - tl.where(take, step_len, 0)
                tl.store(out + walked, take.to(tl.int8), mask=take)


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


def sort_fill(keys: torch.Tensor, lengths: torch.Tensor, budget: int, tail: int, candidates: int | None = None,
              num_warps: int | None = None) -> torch.Tensor:
    """``[R, S]`` bool: the greedy budget fill over each row's stable descending order of ``keys`` (module
    docstring).

    Args:
        keys: ``[R, S]`` float32 ranking keys.
        lengths: ``[S]`` int64 span lengths (>= 1) on the keys' device.
        budget: Token budget per row (>= 0).
        tail: Ranks walked after the prefix (>= 1).
        candidates: For rows longer than :data:`MAX_SPANS`: how many of the best ranks the fill may read, at least
            :func:`candidates_needed` of the lengths (not checked here: fewer give another selection) and at most
            :data:`MAX_CANDIDATES`. Ignored for shorter rows.
        num_warps: Warps of the sorting program (None: 4 up to 256 keys, 8 up to 1,024, else 16).

    Raises:
        RuntimeError: triton is not installed.
        ValueError: shapes, dtypes or sizes the kernels do not take, or tensors they cannot run on.
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
    if num_spans >= 2 ** 31 or budget < 0 or tail < 1:
        raise ValueError(f"num_spans ({num_spans}) must be < 2^31, budget ({budget}) >= 0 and tail ({tail}) >= 1")
    if num_spans > MAX_SPANS and (candidates is None or not 1 <= candidates <= MAX_CANDIDATES):
        raise ValueError(f"a row of {num_spans} spans (> {MAX_SPANS}) needs candidates in [1, {MAX_CANDIDATES}], "
                         f"got {candidates}")
    out = torch.zeros(rows, num_spans, dtype=torch.bool, device=keys.device)
    if rows == 0 or num_spans == 0:
        return out
    src = keys.contiguous()
    for step in launch_plan(num_spans, candidates, num_warps):
        if step.kernel == "chunk_top":
            dst = torch.empty(rows, step.parts * step.meta["KEEP"], dtype=torch.int64, device=keys.device)
            _chunk_top_kernel[(rows, step.parts)](src, dst, step.n, src.stride(0), dst.stride(0), **step.meta)
            src = dst
        else:
            scratch = torch.empty(rows, 2 * step.meta["BLOCK"], dtype=torch.int64, device=keys.device)
            _sort_fill_kernel[(rows,)](src, lengths.contiguous(), out.view(torch.int8), scratch, step.n,
                                       src.stride(0), num_spans, int(budget), TAIL=tail, **step.meta)
    return out


class Launch(NamedTuple):
    """One launch of :func:`sort_fill` for a row length: ``kernel`` ``"chunk_top"`` (``parts`` programs per row)
    or ``"sort_fill"`` (one per row), reading ``n`` keys per row, with its compile-time settings ``meta`` (block
    sizes, ``FLOAT``, ``num_warps``; the fill's ``TAIL`` is added at launch)."""

    kernel: str
    n: int
    parts: int
    meta: dict[str, Any]


def launch_plan(num_spans: int, candidates: int | None = None, num_warps: int | None = None) -> list[Launch]:
    """The launches :func:`sort_fill` makes for rows of ``num_spans`` keys (>= 1), in order: rounds of chunk tops
    while the row is longer than :data:`MAX_SPANS` (each keeping ``max(MIN_KEEP, next_pow2(candidates))`` keys
    per chunk), then the sort and fill. Pure arithmetic (no device work): what :mod:`ltri_rag.kernels.precompile`
    enumerates to compile every variant ahead of use."""
    plan: list[Launch] = []
    n, is_float = num_spans, True
    if num_spans > MAX_SPANS:  # rounds of chunk tops until the candidates fit one program
        keep = max(MIN_KEEP, next_pow2(candidates or 1))
        chunk = max(CHUNK, 4 * keep)
        while n > max(MAX_SPANS, keep):  # each round keeps fewer than it reads (chunk > keep)
            parts = -(-n // chunk)
            plan.append(Launch("chunk_top", n, parts, {"CHUNK": chunk, "KEEP": keep, "FLOAT": is_float,
                                                       "num_warps": 8 if chunk <= 1024 else 16}))
            n, is_float = parts * keep, False
    block = max(128, next_pow2(n))  # few sizes to compile (4 from 128 to 1,024)
    if num_warps is None:
        num_warps = 4 if block <= 256 else (8 if block <= 1024 else 16)
    plan.append(Launch("sort_fill", n, 1, {"BLOCK": block, "FLOAT": is_float, "num_warps": num_warps}))
    return plan


def launch_variants() -> list[tuple[str, dict[str, Any]]]:
    """Every ``(kernel, meta)`` pair :func:`launch_plan` gives for any row length and candidate count (with the
    default warps), without repeats, largest blocks first: the variants Triton compiles once each. Row lengths
    matter only through the rounds they take, so lengths around each power of two up to 2^31 cover them all (a test
    checks this against random lengths)."""
    lengths = set(range(1, 2 * MAX_SPANS + 1))
    for k in range(11, 32):
        lengths.update({(1 << k) - 1, 1 << k, (1 << k) + 1, 3 << (k - 1)})
    seen: dict[tuple, tuple[str, dict[str, Any]]] = {}
    for keep in sorted({MIN_KEEP, next_pow2(MAX_CANDIDATES)}):
        for num_spans in sorted(length for length in lengths if length < 2 ** 31):
            for step in launch_plan(num_spans, keep):
                seen.setdefault((step.kernel, tuple(sorted(step.meta.items()))), (step.kernel, dict(step.meta)))
    return sorted(seen.values(), key=lambda v: (-v[1].get("BLOCK", v[1].get("CHUNK")), v[0], str(v[1])))
