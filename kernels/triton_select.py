"""Span selection on the device in few launches: the ranking keys in two, the budget fill in one after the sort,
the persistence update in one.

**Ranking keys** (:func:`rank_keys`; reference :func:`ltri_rag.retrieval._rank_keys` without votes, some
twenty-five torch operations): per row ``r`` (one, or one per KV head) the mean of its ``G`` query heads' span
scores (non-finite scores replaced by the lowest finite score minus 1), z-normalised over the spans, optionally
mixed with the z-normalised cross-layer prior (``(1 - w) z + w z_prior``) and plus ``bonus * recency``. A first
kernel (grid: rows x at most 128 parts, each a run of 128-span tiles) sums each span's finite scores over its
heads and counts the non-finite ones, and writes per part the lowest finite score and float64 sums (of the finite
sums, the counts, their squares and products, and of the prior and its square); the second (grid: rows x span
blocks) reads every part's partials (the global floor, the row's mean and variance in float64: the floor enters
them linearly, so nothing is read twice) and writes the keys. A fixed number of parts keeps a long memory spread
over the GPU (one program per 1,024 spans took 34 us per call at 16K spans on an H200, 16 programs) and the second
kernel's reduction one size, so a growing memory compiles nothing new. The reduction order differs from
torch's, so keys agree with the reference to float32 rounding (not bit for bit); the kernels are deterministic
(no atomics), so a captured step replays its eager form exactly.

**Budget fill** (:func:`fill_ranked`):

Span selection ranks a layer's spans by a key and fills a token budget greedily in rank order: the prefix of
ranked spans whose lengths fit, then up to ``tail`` more ranks walked one by one, each taken if it still fits
(:func:`ltri_rag.retrieval._fill_budget_device` is the torch reference: some forty small operations, among them a
log-depth scan, which in a decoded token's CUDA graph are thousands of launches per step across the layers). Given
the sort's order and the running sum of the ranked lengths, everything else is one kernel:

* each program takes ``BLOCK`` consecutive ranks of a row and marks the spans of those inside the prefix
  (``running sum <= budget``; lengths are >= 1, so the sums increase and the prefix is where they stay within);
* the one program whose block holds the first rank past the prefix also walks the next ``tail`` ranks, unrolled,
  each step a scalar load of its rank's length and span (``SCALAR_WALK``; before session 21 each step picked its
  length out of a register tile by a masked sum, a cross-warp reduction per step: 13.2 against 6.8 µs per call on an
  H200, ``benchmarks.bench_small_kernels``).

Every span is written at most once and only with True (the output starts all False), so the programs never race.
The result is the reference's, exactly (integer arithmetic only).

**Persistence update** (:func:`update_recency_triton`): after the fill, ``recency * decay + selected.any(dim=0)``
in one launch instead of four, bit for bit (compiled without FMA contraction).

Shapes:
    order: ``[R, S]`` int64, each row a permutation of the spans (best first);
    ranked_sums: ``[R, S]`` int64, ``cumsum(lengths[order], dim=1)``;
    ranked: ``[R, S]`` int64, ``lengths[order]``;
    returns ``[R, S]`` bool: the spans taken.
"""

from __future__ import annotations

import torch
from ltri_rag.kernels._triton_support import interpreted, tl, triton, triton_available

__all__ = ["fill_ranked", "rank_keys", "triton_available", "update_recency_triton"]

INTERPRETED = interpreted()
_PARTIAL_TILE = 128  # spans per tile of the ranking's partial sums
_MAX_PARTS = 128  # programs (sets of partials) per selection row: a long memory spreads over the GPU
SCALAR_WALK = True
"""Whether :func:`fill_ranked` walks the tail over unrolled scalar loads (True) or picks each step's length out of
a register tile with a reduction over the tile (False: 64 dependent cross-warp reductions per call; kept for
timing runs, ``benchmarks.bench_small_kernels``). The same spans either way."""

if triton is not None:

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit(do_not_specialize=("num_spans", "budget"))
    def _fill_ranked_kernel(Order, Sums, Ranked, Out, num_spans, budget,
                            TAIL: tl.constexpr, BLOCK: tl.constexpr, SCALAR_WALK: tl.constexpr):
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
            if SCALAR_WALK:  # the walk unrolled over scalar loads (no reduction per step)
                for j in tl.static_range(TAIL):
                    r = prefix + j
                    exists = r < num_spans
                    length = tl.load(Ranked + base + r, mask=exists, other=budget + 1)
                    walked_span = tl.load(Order + base + r, mask=exists, other=0)
                    take = exists & (length <= left)
                    left = left - tl.where(take, length, 0)
                    tl.store(Out + base + walked_span, take.to(tl.int8), mask=take)
            else:  # each step picks its length out of a register tile by a masked sum
                step = tl.arange(0, TAIL)
                walked = prefix + step
                exists = walked < num_spans
                lens = tl.load(Ranked + base + walked, mask=exists, other=budget + 1)
                taken = tl.full([TAIL], 0, dtype=tl.int32)
                for j in range(TAIL):
                    length = tl.reduce(tl.where(step == j, lens, 0), 0, _add)
                    take = length <= left
                    left = left - tl.where(take, length, 0)
                    taken = tl.where(step == j, take.to(tl.int32), taken)
                keep = exists & (taken != 0)
                spans = tl.load(Order + base + walked, mask=keep, other=0)
                tl.store(Out + base + spans, tl.full([TAIL], 1, tl.int8), mask=keep)


    @triton.jit
    def _minimum(a, b):
        return tl.minimum(a, b)

    @triton.jit(do_not_specialize=("num_spans", "rows", "row_stride"))
    def _recency_kernel(Recency, Selected, Out, num_spans, rows, row_stride, decay, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < num_spans
        taken = tl.full([BLOCK], 0, dtype=tl.int32)
        for r in range(rows):
            taken = taken | tl.load(Selected + r * row_stride + i, mask=ok, other=0).to(tl.int32)
        kept = tl.load(Recency + i, mask=ok, other=0.0) * decay  # launched without FMA contraction: two roundings
        tl.store(Out + i, kept + (taken != 0).to(tl.float32), mask=ok)

    @triton.jit(do_not_specialize=("num_spans", "span_chunk"))
    def _rank_partials_kernel(Scores, Prior, Sums, Counts, Part, num_spans, span_chunk,
                              GROUP: tl.constexpr, HAS_PRIOR: tl.constexpr, BLOCK: tl.constexpr):
        # program (row, part) walks spans part * span_chunk .. + span_chunk - 1 in tiles of BLOCK, keeping each
        # lane's partial sums in float64, and writes one set of partials (a fixed number of parts per row, so
        # that a long memory still spreads over the GPU and the key kernel's reduction stays one size)
        row = tl.program_id(0)
        part_id = tl.program_id(1)
        first = part_id * span_chunk
        acc_a = tl.full([BLOCK], 0.0, dtype=tl.float64)
        acc_n = tl.full([BLOCK], 0.0, dtype=tl.float64)
        acc_aa = tl.full([BLOCK], 0.0, dtype=tl.float64)
        acc_an = tl.full([BLOCK], 0.0, dtype=tl.float64)
        acc_nn = tl.full([BLOCK], 0.0, dtype=tl.float64)
        acc_p = tl.full([BLOCK], 0.0, dtype=tl.float64)
        acc_pp = tl.full([BLOCK], 0.0, dtype=tl.float64)
        low = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        for start in range(0, span_chunk, BLOCK):
            span = first + start + tl.arange(0, BLOCK)
            live = span < num_spans
            total = tl.full([BLOCK], 0.0, dtype=tl.float32)
            count = tl.full([BLOCK], 0, dtype=tl.int32)
            for g in range(GROUP):
                x = tl.load(Scores + (row * GROUP + g).to(tl.int64) * num_spans + span, mask=live, other=0.0)
                finite = (x == x) & (tl.abs(x) < float("inf"))
                total += tl.where(finite, x, 0.0)
                count += tl.where(finite | (span >= num_spans), 0, 1)
                low = tl.minimum(low, tl.where(finite & live, x, float("inf")))
            out = row.to(tl.int64) * num_spans + span
            tl.store(Sums + out, total, mask=live)
            tl.store(Counts + out, count, mask=live)
            a = tl.where(live, total, 0.0).to(tl.float64)
            n = count.to(tl.float64)
            acc_a += a
            acc_n += n
            acc_aa += a * a
            acc_an += a * n
            acc_nn += n * n
            if HAS_PRIOR:
                p = tl.load(Prior + span, mask=live, other=0.0).to(tl.float64)
                acc_p += p
                acc_pp += p * p
        part = Part + (row * tl.num_programs(1) + part_id).to(tl.int64) * 8
        tl.store(part, tl.reduce(low, 0, _minimum).to(tl.float64))
        tl.store(part + 1, tl.reduce(acc_a, 0, _add))
        tl.store(part + 2, tl.reduce(acc_n, 0, _add))
        tl.store(part + 3, tl.reduce(acc_aa, 0, _add))
        tl.store(part + 4, tl.reduce(acc_an, 0, _add))
        tl.store(part + 5, tl.reduce(acc_nn, 0, _add))
        if HAS_PRIOR:
            tl.store(part + 6, tl.reduce(acc_p, 0, _add))
            tl.store(part + 7, tl.reduce(acc_pp, 0, _add))

    @triton.jit(do_not_specialize=("num_spans", "num_parts", "parts_per_row"))
    def _rank_keys_kernel(Sums, Counts, Part, Prior, Recency, Keys, num_spans, num_parts, parts_per_row,
                          prior_weight, bonus,
                          GROUP: tl.constexpr, HAS_PRIOR: tl.constexpr, HAS_RECENCY: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        # the floor for non-finite scores: the lowest finite score of every row, minus 1 (0 if there is none)
        i = tl.arange(0, BLOCK_P)
        lows = tl.load(Part + i.to(tl.int64) * 8, mask=i < num_parts, other=float("inf")).to(tl.float32)
        low = tl.reduce(lows, 0, _minimum)
        floor = tl.where(low < 3.4028234663852886e38, low - 1.0, 0.0)
        # the row's mean and variance of base = (finite sum + count * floor) / G, from its parts' partials
        j = tl.arange(0, BLOCK_P)
        mine = Part + (row * parts_per_row + j).to(tl.int64) * 8
        ok = j < parts_per_row
        sa = tl.reduce(tl.load(mine + 1, mask=ok, other=0.0), 0, _add)
        sn = tl.reduce(tl.load(mine + 2, mask=ok, other=0.0), 0, _add)
        saa = tl.reduce(tl.load(mine + 3, mask=ok, other=0.0), 0, _add)
        san = tl.reduce(tl.load(mine + 4, mask=ok, other=0.0), 0, _add)
        snn = tl.reduce(tl.load(mine + 5, mask=ok, other=0.0), 0, _add)
        f = floor.to(tl.float64)
        size = num_spans.to(tl.float64)
        mean = (sa + f * sn) / GROUP / size
        var = (saa + 2.0 * f * san + f * f * snn) / (GROUP * GROUP) / size - mean * mean
        std = tl.sqrt(tl.maximum(var, 0.0)).to(tl.float32)
        span = block * BLOCK + tl.arange(0, BLOCK)
        live = span < num_spans
        at = row.to(tl.int64) * num_spans + span
        total = tl.load(Sums + at, mask=live, other=0.0)
        count = tl.load(Counts + at, mask=live, other=0).to(tl.float32)
        base = (total + count * floor) / GROUP
        z = (base - mean.to(tl.float32)) / (std + 1e-6)
        if HAS_PRIOR:
            psum = tl.reduce(tl.load(mine + 6, mask=ok, other=0.0), 0, _add)
            psq = tl.reduce(tl.load(mine + 7, mask=ok, other=0.0), 0, _add)
            pmean = psum / size
            pstd = tl.sqrt(tl.maximum(psq / size - pmean * pmean, 0.0)).to(tl.float32)
            p = tl.load(Prior + span, mask=live, other=0.0)
            z = (1.0 - prior_weight) * z + prior_weight * ((p - pmean.to(tl.float32)) / (pstd + 1e-6))
        if HAS_RECENCY:
            z = z + bonus * tl.load(Recency + span, mask=live, other=0.0)
        tl.store(Keys + at, z, mask=live)


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
        order, ranked_sums, ranked, out.view(torch.int8), num_spans, int(budget), TAIL=tail, BLOCK=block,
        SCALAR_WALK=SCALAR_WALK)
    return out


def rank_keys(scores: torch.Tensor, rows: int, prior: torch.Tensor | None = None, prior_weight: float = 0.0,
              recency: torch.Tensor | None = None, bonus: float = 0.0, block: int = 1024,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, S]`` float32 ranking keys from ``[H, S]`` span scores (module docstring), in two launches.

    Args:
        scores: ``[H, S]`` float32 span scores, ``H`` a multiple of ``rows``.
        rows: Selection rows (1: shared; the KV heads: per KV head); row ``r`` averages heads
            ``r * H / rows .. (r + 1) * H / rows - 1``.
        prior: ``[S]`` cross-layer evidence, mixed in with weight ``prior_weight`` when that is > 0.
        prior_weight: In [0, 1].
        recency: ``[S]`` float32 persistence state, added times ``bonus`` when that is > 0.
        bonus: Weight of ``recency``.
        block: Spans per program (a power of two >= 16).
        out: A contiguous ``[rows, S]`` float32 tensor on the scores' device to write the keys into (e.g. half
            of a tensor that ranks two selections together); returned.

    Raises:
        RuntimeError: triton is not installed.
        ValueError: shapes, dtypes or devices that do not match.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if scores.dim() != 2 or scores.dtype != torch.float32 or rows < 1 or scores.shape[0] % rows:
        raise ValueError(f"scores must be float32 [H, S] with H a multiple of rows ({rows}), got "
                         f"{scores.dtype} {tuple(scores.shape)}")
    if scores.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the kernels need CUDA tensors (got {scores.device}), or TRITON_INTERPRET=1 set before "
                         "ltri_rag.kernels.triton_select is imported")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    num_heads, num_spans = scores.shape
    device = scores.device
    if out is not None and (out.shape != (rows, num_spans) or out.dtype != torch.float32 or out.device != device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 [{rows}, {num_spans}] tensor on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device} with strides {out.stride()}")
    keys = torch.empty(rows, num_spans, dtype=torch.float32, device=device) if out is None else out
    if num_spans == 0:
        return keys
    use_prior = prior is not None and prior_weight > 0
    use_recency = recency is not None and bonus > 0
    for name, t in (("prior", prior if use_prior else None), ("recency", recency if use_recency else None)):
        if t is not None and (t.shape != (num_spans,) or t.device != device):
            raise ValueError(f"{name} must be [{num_spans}] on {device}, got {tuple(t.shape)} on {t.device}")
    prior_f = prior.float().contiguous() if use_prior else keys
    recency_f = recency.float().contiguous() if use_recency else keys
    scores = scores.contiguous()
    group = num_heads // rows
    # the partials: at most _MAX_PARTS programs per row, each over a run of whole tiles
    tile = min(block, _PARTIAL_TILE)
    parts = min(_MAX_PARTS, triton.cdiv(num_spans, tile))
    span_chunk = triton.cdiv(triton.cdiv(num_spans, parts), tile) * tile
    parts = triton.cdiv(num_spans, span_chunk)
    sums = torch.empty(rows, num_spans, dtype=torch.float32, device=device)
    counts = torch.empty(rows, num_spans, dtype=torch.int32, device=device)
    # per part: lowest finite score, five sums; the prior's two sums are written and read only with a prior
    part = torch.empty(rows * parts, 8, dtype=torch.float64, device=device)
    _rank_partials_kernel[(rows, parts)](scores, prior_f, sums, counts, part, num_spans, span_chunk,
                                         GROUP=group, HAS_PRIOR=use_prior, BLOCK=tile)
    _rank_keys_kernel[(rows, triton.cdiv(num_spans, block))](
        sums, counts, part, prior_f, recency_f, keys, num_spans, rows * parts, parts, float(prior_weight),
        float(bonus), GROUP=group, HAS_PRIOR=use_prior, HAS_RECENCY=use_recency, BLOCK=block,
        BLOCK_P=max(16, triton.next_power_of_2(rows * _MAX_PARTS)))
    return keys


def update_recency_triton(recency: torch.Tensor, selected: torch.Tensor, decay: float,
                          block: int = 1024) -> torch.Tensor:
    """The persistence state after a selection, ``recency * decay + selected.any(dim=0)``, in one launch instead of
    four torch operations (a multiplication, a reduction over the rows, a cast, an addition); the same float32
    operations, each rounded (the kernel is compiled without FMA contraction), so the reference's bits
    (:func:`ltri_rag.retrieval.update_recency`). No host synchronisation: a CUDA graph can capture it.

    Args:
        recency: ``[S]`` float32 persistence state.
        selected: ``[R, S]`` bool selection rows.
        decay: In ``[0, 1)``.
        block: Spans per program (a power of two >= 16).

    Returns:
        ``[S]`` float32, a new tensor.

    Raises:
        RuntimeError: triton is not installed.
        ValueError: shapes, dtypes or devices that do not match, or tensors the kernel cannot run on.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if recency.dim() != 1 or recency.dtype != torch.float32:
        raise ValueError(f"recency must be a [S] float32 tensor, got {tuple(recency.shape)} {recency.dtype}")
    if selected.dim() != 2 or selected.dtype != torch.bool or selected.shape[1] != recency.shape[0]:
        raise ValueError(f"selected must be a [R, {recency.shape[0]}] bool tensor, got {tuple(selected.shape)} "
                         f"{selected.dtype}")
    if selected.device != recency.device:
        raise ValueError(f"recency ({recency.device}) and selected ({selected.device}) must be on one device")
    if recency.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the kernel needs CUDA tensors (got {recency.device}), or TRITON_INTERPRET=1 set before "
                         "ltri_rag.kernels.triton_select is imported")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    num_spans = recency.shape[0]
    out = torch.empty_like(recency)
    if num_spans == 0:
        return out
    selected = selected.contiguous()
    _recency_kernel[(triton.cdiv(num_spans, block),)](
        recency.contiguous(), selected.view(torch.int8), out, num_spans, selected.shape[0], selected.stride(0),
        float(decay), BLOCK=block, enable_fp_fusion=False)
    return out
