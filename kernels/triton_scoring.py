"""Triton backend of :func:`ltri_rag.kernels.scoring.span_probabilities` (same arguments, same result).

Semantics (see the reference's docstring): queries ``[H, Lq, D]``, index vectors ``[N, Hkv, D]`` with ``owner [N]``
span ids, ``G = H // Hkv``; query head ``h`` reads KV head ``h // G``. For query ``c`` of head ``h``,
``s[h, c, span] = scaling * max_{v in span} q[h, c] . v`` (``-inf`` for a span without vectors), a softmax over
spans, averaged over the ``Lq`` queries: ``[H, num_spans]`` float32. The torch path materialises
``[H * block, num_spans * width]`` score matrices; the kernels below write at most one float32 score per query
and span (the span max), within a bounded buffer.

Layout. The vectors are laid out densely per span by :func:`ltri_rag.kernels.scoring.span_layout` (span ``s`` owns
rows ``s * width .. s * width + width - 1`` and a ``valid`` mask says which hold a vector). A tile of
``BLOCK_S`` spans is scored slot by slot: for ``w < width`` one ``[rows, D] x [D, BLOCK_S]`` product against each
span's ``w``-th vector, kept as a running max (no reshape, any width). One product over all of a tile's slots with
the max as a reduction was slower at every engine shape (session 30, ``span_scoring_h200/session30_one_product/``).

Rows. A program holds the ``G`` query heads of one KV head for ``BLOCK_Q`` queries, so every vector tile it
loads serves the whole group: ``BLOCK_M = G_P * BLOCK_Q`` rows, ordered head-major (row ``r`` = head
``r // BLOCK_Q`` of the group, query ``r % BLOCK_Q`` of the block), ``G_P`` the group rounded up to a power of two
(the padded heads are masked; G = 7 wastes 1/8 of the rows). Head-major rows make the sum over a block's queries
a reduction over the middle axis of ``[G_P, BLOCK_Q, BLOCK_S]``.

A chunk (``Lq > 1``), no atomics, deterministic:

* **Row statistics** (``_span_stats_kernel``), grid ``(cdiv(Lq, BLOCK_Q), Hkv, span_splits)``: the online max /
  sum-exp (base 2, float32) of a program's rows over its share of the spans, ``(m, l)`` per row, combined by torch
  into ``lse`` per ``(head, query)``. Splitting the spans keeps the GPU busy when there are few queries. With
  ``STORE`` it also writes the row's base-2 scores into a ``[H, Lq', S]`` float32 buffer.
* **Span mass from the stored scores** (``_span_mass_stored_kernel``, the default), grid ``(cdiv(S, BLOCK_S), H)``:
  sums ``exp2(s - lse)`` over the queries. Every score is computed once; reading 4 bytes of it back costs far less
  than the ``width`` dot products that made it. The queries go in slabs of ``Lq'`` so the buffer stays within
  ``score_buffer`` bytes (a softmax row needs only its own query's scores), each slab's mass added to the last.
* **Span mass recomputed** (``_span_mass_kernel``, ``score_buffer=0``), grid ``(cdiv(S, BLOCK_S), Hkv,
  query_splits)``: each program recomputes its tile of spans' scores over its share of the queries into a
  ``[G_P, BLOCK_S]`` accumulator, written into ``[query_splits, H, S]`` and summed by torch: every score is
  computed twice (as in the torch path's two passes), nothing is stored.

A decoded token (``Lq = 1``) takes a third kernel instead (``_span_decode_scores_kernel``), grid
``(cdiv(S, BLOCK_S), Hkv)``: the group's heads are the rows (padded to the 16 of ``tl.dot``), each program writes
its tile of ``[H, S]`` float32 scores once, and ``torch.softmax`` turns them into the distribution. The layout is
read once (the two passes read it twice and combine split statistics in torch).

Dtypes. float16 / bfloat16 queries *and* vectors of the same dtype are multiplied in that dtype on tensor cores
with float32 accumulation: a product of two 16-bit floats is exact in float32, so this is the float32 reference
up to the order of the additions. Anything else is computed in float32: IEEE products, or TF32 when torch's own
float32 matmuls may use it (``torch.backends.cuda.matmul.allow_tf32``, as the torch path then does). Under the
interpreter bfloat16 is computed in float32: its ``tl.dot`` does not support bfloat16 (triton issue 11584).
A layout of int8 codes with scales (:func:`~ltri_rag.kernels.scoring.span_layout` with ``quantize``,
``LtriConfig.index_precision="int8"``) is read as int8 (half the bytes of 16-bit vectors: decode scoring is bound
by them), converted in registers to the queries' dtype (exact: codes are at most 127 in magnitude), multiplied
like 16-bit vectors, and each score column is then multiplied by its vector's scale in float32 (``SCALED``).
``head_dim`` may be any size up to 256 (padded to a power of two >= 16 in registers, masked loads).

Launch settings come from :mod:`ltri_rag.kernels.scoring_launch` (small blocks under the Triton interpreter,
``TRITON_INTERPRET=1``, read when this module is imported: set it before the import).
"""

from __future__ import annotations

import torch
from ltri_rag.kernels._triton_support import interpreted, launch_fitting, tl, triton, triton_available
from ltri_rag.kernels._triton_support import pow2_block as _pow2_block
from ltri_rag.kernels import scoring_launch as _launch
from ltri_rag.kernels.scoring import SpanLayout, _check_span_inputs, _from_layout, span_probabilities
from ltri_rag.kernels.scoring_launch import block_sizes

__all__ = ["block_sizes", "span_probabilities_triton", "triton_available"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256


# whether the kernels below were built for the Triton interpreter (it is decided when they are decorated)
INTERPRETED = interpreted()


if triton is not None:
    # Only triton builtins and jit helpers of this module are called in the kernels (tl.sum / tl.max are tl.reduce
    # with the combine functions below): the library's own jit functions are built when triton is imported, and
    # under the interpreter calling them fails when triton was imported before TRITON_INTERPRET was set. See
    # kernels/triton_local.py for the same arrangement.

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _maximum(a, b):
        return tl.maximum(a, b)

    _sum_combine = getattr(tl.standard, "_sum_combine", _add)
    _max_combine = getattr(tl.standard, "_elementwise_max", _maximum)

    @triton.jit
    def _load_rows(Q, kvh, q0, q_end, stride_qh, stride_qm, stride_qd,
                   GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """Packed rows ``[BLOCK_M, BLOCK_D]`` of queries ``q0 .. q0 + BLOCK_Q - 1`` for the group's heads, with each
        row's head, query index and validity (padded heads and queries at or past ``q_end`` are 0 and not ok)."""
        r = tl.arange(0, BLOCK_M)
        g = r // BLOCK_Q
        qi = q0 + r % BLOCK_Q
        head = kvh * GROUP + g
        row_ok = (g < GROUP) & (qi < q_end)
        d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + head[:, None].to(tl.int64) * stride_qh + qi[:, None].to(tl.int64) * stride_qm
                    + d[None, :] * stride_qd, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        return q, head, qi, row_ok

    @triton.jit
    def _span_tile_scores(q, vec_base, scale_base, Valid, s0, num_spans, width, stride_vn, stride_vd, stride_sn,
                          qk_scale, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALED: tl.constexpr,
                          LOAD_PADDING: tl.constexpr):
        """``[BLOCK_M, BLOCK_S]`` base-2 scores (``scaling * log2(e) * max_v q . v``) of the rows ``q`` against spans
        ``s0 .. s0 + BLOCK_S - 1``; ``-inf`` for a span without vectors or past ``num_spans``. ``SCALED``: the
        vectors are int8 codes, converted to ``q``'s dtype (exactly) for the product, whose columns are then
        multiplied by the vectors' scales (``scale_base``: the KV head's scales, row stride ``stride_sn``)."""
        span = s0 + tl.arange(0, BLOCK_S)
        span_ok = span < num_spans
        d = tl.arange(0, BLOCK_D)
        best = tl.full([BLOCK_M, BLOCK_S], float("-inf"), dtype=tl.float32)
        for w in range(width):
            row = span.to(tl.int64) * width + w  # the w-th vector slot of each span
            ok = tl.load(Valid + row, mask=span_ok, other=0) != 0
            if LOAD_PADDING:  # the slot's rows read whether they hold a vector or not (not waiting on ok)
                load_ok = span_ok
            else:
                load_ok = ok
            v_t = tl.load(vec_base + row[None, :] * stride_vn + d[:, None] * stride_vd,
                          mask=load_ok[None, :] & (d[:, None] < HEAD_DIM), other=0)  # [D, S]: transposed
            if SCALED:
                col = tl.load(scale_base + row * stride_sn, mask=ok, other=0.0) * qk_scale  # [S]
                s = tl.dot(q, v_t.to(q.dtype), input_precision=DOT_PRECISION) * col[None, :]
            else:
                s = tl.dot(q, v_t, input_precision=DOT_PRECISION) * qk_scale
            best = tl.maximum(best, tl.where(ok[None, :], s, float("-inf")))
        return best

    @triton.jit(do_not_specialize=("q_len", "num_spans", "width", "spans_per_split"))
    def _span_stats_kernel(Q, Vec, Scale, Valid, M, L, Scores,
                           stride_qh, stride_qm, stride_qd, stride_vn, stride_vh, stride_vd, stride_sn, stride_sh,
                           num_heads, q_len, num_spans, width, spans_per_split, qk_scale,
                           GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, SCALED: tl.constexpr, STORE: tl.constexpr,
                           LOAD_PADDING: tl.constexpr):
        pid_q = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        q, head, qi, row_ok = _load_rows(Q, kvh, pid_q * BLOCK_Q, q_len, stride_qh, stride_qm, stride_qd,
                                         GROUP, BLOCK_Q, BLOCK_M, HEAD_DIM, BLOCK_D)
        vec_base = Vec + kvh.to(tl.int64) * stride_vh
        scale_base = Scale + kvh.to(tl.int64) * stride_sh
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        s_begin = split * spans_per_split  # a multiple of BLOCK_S: the splits' tiles do not overlap
        s_end = tl.minimum(s_begin + spans_per_split, num_spans)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s = _span_tile_scores(q, vec_base, scale_base, Valid, s0, num_spans, width, stride_vn, stride_vd,
                                  stride_sn, qk_scale, BLOCK_M, BLOCK_S, HEAD_DIM, BLOCK_D, DOT_PRECISION, SCALED,
                                  LOAD_PADDING)
            if STORE:  # the scores, for _span_mass_stored_kernel: [H, q_len, S] float32 (base 2)
                span = s0 + tl.arange(0, BLOCK_S)
                row = (head.to(tl.int64) * q_len + qi) * num_spans
                tl.store(Scores + row[:, None] + span[None, :], s,
                         mask=row_ok[:, None] & (span[None, :] < num_spans))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no span with a vector yet: mass stays 0
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.reduce(tl.exp2(s - m_safe[:, None]), 1, _sum_combine)
            m_i = m_new
        idx = (split * num_heads + head).to(tl.int64) * q_len + qi  # into [splits, H, Lq]
        tl.store(M + idx, m_i, mask=row_ok)
        tl.store(L + idx, l_i, mask=row_ok)

    @triton.jit(do_not_specialize=("q_len", "num_spans", "width", "queries_per_split"))
    def _span_mass_kernel(Q, Vec, Scale, Valid, Lse, Out,
                          stride_qh, stride_qm, stride_qd, stride_vn, stride_vh, stride_vd, stride_sn, stride_sh,
                          num_heads, q_len, num_spans, width, queries_per_split, qk_scale,
                          GROUP: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALED: tl.constexpr,
                          LOAD_PADDING: tl.constexpr):
        pid_s = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        s0 = pid_s * BLOCK_S
        vec_base = Vec + kvh.to(tl.int64) * stride_vh
        scale_base = Scale + kvh.to(tl.int64) * stride_sh
        acc = tl.full([GROUP_P, BLOCK_S], 0.0, dtype=tl.float32)
        q_begin = split * queries_per_split  # a multiple of BLOCK_Q
        q_end = tl.minimum(q_begin + queries_per_split, q_len)
        for q0 in range(q_begin, q_end, BLOCK_Q):
            q, head, qi, row_ok = _load_rows(Q, kvh, q0, q_end, stride_qh, stride_qm, stride_qd,
                                             GROUP, BLOCK_Q, BLOCK_M, HEAD_DIM, BLOCK_D)
            lse = tl.load(Lse + head.to(tl.int64) * q_len + qi, mask=row_ok, other=0.0)
            s = _span_tile_scores(q, vec_base, scale_base, Valid, s0, num_spans, width, stride_vn, stride_vd,
                                  stride_sn, qk_scale, BLOCK_M, BLOCK_S, HEAD_DIM, BLOCK_D, DOT_PRECISION, SCALED,
                                  LOAD_PADDING)
            p = tl.where(row_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
            acc += tl.reduce(tl.reshape(p, [GROUP_P, BLOCK_Q, BLOCK_S]), 1, _sum_combine)
        g = tl.arange(0, GROUP_P)
        span = s0 + tl.arange(0, BLOCK_S)
        out_row = (split * num_heads + kvh * GROUP + g).to(tl.int64) * num_spans  # into [splits, H, S]
        tl.store(Out + out_row[:, None] + span[None, :], acc,
                 mask=(g[:, None] < GROUP) & (span[None, :] < num_spans))

    @triton.jit(do_not_specialize=("q_len", "num_spans", "splits"))
    def _span_mass_stored_kernel(Scores, M, L, Out, num_heads, q_len, num_spans, splits,
                                 BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, ACCUMULATE: tl.constexpr):
        """``Out[h, s] (+)= sum_q exp2(Scores[h, q, s] - lse[h, q])`` for a tile of ``BLOCK_S`` spans of head ``h``
        (``ACCUMULATE``: added to what ``Out`` holds, the earlier query slabs' mass). Each row's base-2
        log-sum-exp is combined here from ``_span_stats_kernel``'s ``[splits, H, Lq]`` running maxima ``M`` and
        sums ``L`` (as torch would: the largest maximum, each share rescaled to it; ``-inf`` for a row without
        any vector), so no torch operations run between the two launches."""
        pid_s = tl.program_id(0)
        head = tl.program_id(1).to(tl.int64)
        span = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        span_ok = span < num_spans
        acc = tl.full([BLOCK_S], 0.0, dtype=tl.float32)  # not tl.zeros: a jit function of triton (see above)
        for q0 in range(0, q_len, BLOCK_Q):
            qi = q0 + tl.arange(0, BLOCK_Q)
            q_ok = qi < q_len
            m_max = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
            for part in range(0, splits):
                m_max = tl.maximum(m_max, tl.load(M + (part * num_heads + head) * q_len + qi, mask=q_ok,
                                                  other=float("-inf")))
            m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
            total = tl.full([BLOCK_Q], 0.0, dtype=tl.float32)
            for part in range(0, splits):
                at = (part * num_heads + head) * q_len + qi
                m_part = tl.load(M + at, mask=q_ok, other=float("-inf"))
                total += tl.load(L + at, mask=q_ok, other=0.0) * tl.exp2(m_part - m_safe)
            lse = m_safe + tl.log2(tl.where(q_ok, total, 1.0))  # no vector at all: log2(0) = -inf
            s = tl.load(Scores + (head * q_len + qi)[:, None] * num_spans + span[None, :],
                        mask=q_ok[:, None] & span_ok[None, :], other=0.0)
            p = tl.where(q_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
            acc += tl.reduce(p, 0, _sum_combine)
        if ACCUMULATE:
            acc += tl.load(Out + head * num_spans + span, mask=span_ok, other=0.0)
        tl.store(Out + head * num_spans + span, acc, mask=span_ok)

    @triton.jit(do_not_specialize=("num_spans", "width"))
    def _span_decode_scores_kernel(Q, Vec, Scale, Valid, Out,
                                   stride_qh, stride_qd, stride_vn, stride_vh, stride_vd, stride_sn, stride_sh,
                                   num_spans, width, scale,
                                   GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                   DOT_PRECISION: tl.constexpr, SCALED: tl.constexpr,
                                   LOAD_PADDING: tl.constexpr):
        """One query per head: ``Out[h, s] = scale * max_v q_h . v`` (``-inf`` without a vector), one program per
        (tile of ``BLOCK_S`` spans, KV head), each vector tile read once for the group's heads."""
        pid_s = tl.program_id(0)
        kvh = tl.program_id(1)
        q, head, qi, row_ok = _load_rows(Q, kvh, 0, 1, stride_qh, 0, stride_qd,
                                         GROUP, BLOCK_Q, BLOCK_M, HEAD_DIM, BLOCK_D)
        vec_base = Vec + kvh.to(tl.int64) * stride_vh
        scale_base = Scale + kvh.to(tl.int64) * stride_sh
        s0 = pid_s * BLOCK_S
        s = _span_tile_scores(q, vec_base, scale_base, Valid, s0, num_spans, width, stride_vn, stride_vd, stride_sn,
                              scale, BLOCK_M, BLOCK_S, HEAD_DIM, BLOCK_D, DOT_PRECISION, SCALED, LOAD_PADDING)
        span = s0 + tl.arange(0, BLOCK_S)
        tl.store(Out + head[:, None].to(tl.int64) * num_spans + span[None, :], s,
                 mask=row_ok[:, None] & (span[None, :] < num_spans))


def span_probabilities_triton(
    queries: torch.Tensor,
    vectors: torch.Tensor | None,
    owner: torch.Tensor | None,
    num_spans: int,
    scaling: float,
    *,
    block_m: int | None = None,
    block_s: int | None = None,
    span_splits: int | None = None,
    query_splits: int | None = None,
    layout: SpanLayout | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    score_buffer: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`ltri_rag.kernels.scoring.span_probabilities`; same arguments and result.

    The torch path's ``query_block`` has no counterpart: no score matrix is materialised, whatever ``q_len``.

    Args:
        queries: ``[num_heads, q_len, head_dim]`` position-free queries (float16, bfloat16 or float32; any strides).
        vectors: ``[num_vectors, num_kv_heads, head_dim]`` index vectors.
        owner: ``[num_vectors]`` int64 span id of each vector, in ``[0, num_spans)``.
        num_spans: Number of spans.
        scaling: Score multiplier (the layer's attention scaling).
        block_m: Target packed ``(head, query)`` rows per program (power of two >= 16); None = :func:`block_sizes`.
        block_s: Spans per tile (power of two >= 16); None = :func:`block_sizes`.
        span_splits: Programs sharing the spans of one row block in the statistics pass (None: enough to fill a
            GPU, 1 off CUDA).
        query_splits: Programs sharing the queries of one span tile in the recomputing probability pass
            (``score_buffer=0``; None: likewise).
        layout: :func:`~ltri_rag.kernels.scoring.span_layout` of these vectors, if the caller keeps one (then
            ``vectors`` and ``owner`` may be None).
        num_warps, num_stages: Launch settings of the kernels, for sweeps (None: :func:`block_sizes`', or for
            one query ``scoring_launch.ONE_QUERY_LAUNCH``'s where it applies). The chunk kernels ignored them
            before session 29.
        score_buffer: Bytes of float32 scores a chunk (``q_len > 1``) may keep between its two passes (None:
            ``scoring_launch.SCORE_BUFFER_BYTES``); 0 recomputes them instead.

    Returns:
        ``[num_heads, num_spans]`` float32 on ``queries``' device, each row summing to 1; 0 for a span without
        vectors (0 columns if there are no spans).

    Raises:
        RuntimeError: triton is not installed.
        ValueError: inconsistent shapes or devices, tensors the kernels cannot run on, or a bad launch setting
            (block sizes, splits, warps, stages, a negative ``score_buffer``).
    """
    if triton is None:
        raise RuntimeError("triton is not installed: use ltri_rag.kernels.scoring.span_probabilities instead")
    vectors, owner = _from_layout(vectors, owner, layout)
    group = _check_span_inputs(queries, vectors, owner, num_spans)
    num_heads, q_len, head_dim = queries.shape
    score_buffer = _launch.SCORE_BUFFER_BYTES if score_buffer is None else score_buffer
    if score_buffer < 0:
        raise ValueError(f"score_buffer must be >= 0 bytes, got {score_buffer}")
    if query_splits is not None and query_splits < 1:  # read by the recomputing pass only: checked for all
        raise ValueError(f"query_splits must be >= 1, got {query_splits}")
    if num_warps is not None and (num_warps < 1 or num_warps & (num_warps - 1)):
        raise ValueError(f"num_warps must be a power of two >= 1, got {num_warps}")
    if num_stages is not None and num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {_MAX_HEAD_DIM} is not supported by the triton kernels")
    device = queries.device
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the triton kernels need CUDA tensors (got {device}), or TRITON_INTERPRET=1 set "
                         "before ltri_rag.kernels.triton_scoring is imported")
    if num_spans == 0 or q_len == 0:  # nothing to launch: the reference handles the empty shapes
        return span_probabilities(queries, vectors, owner, num_spans, scaling, layout=layout)
    if q_len == 1:  # a decoded token: one pass writes the scores, a softmax makes them the distribution
        return _span_probabilities_one_query(queries, vectors, owner, num_spans, scaling, block_s, layout,
                                             num_warps, num_stages)

    queries, padded, scale, scaled, valid, width, compute, dot_precision = _launch.operands(
        queries, vectors, owner, num_spans, layout, INTERPRETED)
    default_m, default_s, default_warps, default_stages = block_sizes(head_dim, group, device, compute)
    num_warps = default_warps if num_warps is None else num_warps
    num_stages = default_stages if num_stages is None else num_stages
    block_m = _pow2_block(block_m, default_m, "block_m")
    block_s = _pow2_block(block_s, default_s, "block_s")
    # rows: G_P heads x block_q queries, block_q no longer than the chunk (decode), at least 16 rows (tl.dot)
    group_p = triton.next_power_of_2(group)
    block_q = max(1, min(block_m // group_p, triton.next_power_of_2(q_len)))
    block_q = max(block_q, 16 // min(group_p, 16))
    block_m = group_p * block_q
    block_d = max(16, triton.next_power_of_2(head_dim))
    qk_scale = float(scaling) * _LOG2E
    common = {"GROUP": group, "BLOCK_Q": block_q, "BLOCK_M": block_m, "BLOCK_S": block_s, "HEAD_DIM": head_dim,
              "BLOCK_D": block_d, "DOT_PRECISION": dot_precision, "SCALED": scaled,
              "LOAD_PADDING": _launch.CHUNK_LOAD_PADDING,
              "num_warps": num_warps, "num_stages": num_stages}

    if score_buffer == 0:
        return _two_pass(queries, padded, scale, valid, num_spans, width, qk_scale, block_q, block_s, group_p,
                         span_splits, query_splits, common) / q_len
    # queries in slabs whose [H, slab, S] float32 scores fit the buffer (at least one row block)
    slab = max(block_q, score_buffer // (4 * num_heads * num_spans) // block_q * block_q)
    slab = min(slab, q_len)
    scores = torch.empty(num_heads, slab, num_spans, dtype=torch.float32, device=device)
    out = torch.empty(num_heads, num_spans, dtype=torch.float32, device=device)
    mass_q, mass_s, mass_warps = _launch.MASS_TILE if device.type == "cuda" else (4, 32, 1)
    for q_lo in range(0, q_len, slab):
        part = queries[:, q_lo:q_lo + slab]
        m, l_ = _row_stats(part, padded, scale, valid, num_spans, width, qk_scale, block_q, block_s, span_splits,
                           common, scores=scores)
        _span_mass_stored_kernel[(triton.cdiv(num_spans, mass_s), num_heads)](
            scores, m, l_, out, num_heads, part.shape[1], num_spans, m.shape[0], BLOCK_Q=mass_q, BLOCK_S=mass_s,
            ACCUMULATE=q_lo > 0, num_warps=mass_warps)
    return out / q_len


def _row_stats(queries: torch.Tensor, padded: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor,
               num_spans: int, width: int, qk_scale: float, block_q: int, block_s: int, span_splits: int | None,
               common: dict, scores: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``_span_stats_kernel`` over shares of the spans: ``[splits, H, Lq]`` float32 running maxima and sums of
    ``exp2(score - maximum)`` (base 2) of every (head, query) row's span scores, one share per split. ``scores``: a
    ``[H, >= Lq, S]`` float32 buffer that also receives the scores (its first ``Lq`` queries)."""
    num_heads, q_len, _ = queries.shape
    num_kv_heads = padded.shape[1]
    device = queries.device
    num_qblocks = triton.cdiv(q_len, block_q)
    num_sblocks = triton.cdiv(num_spans, block_s)
    splits = _launch.num_splits(span_splits, "span_splits", num_sblocks, num_qblocks * num_kv_heads, device)
    spans_per_split = triton.cdiv(num_sblocks, splits) * block_s
    splits = triton.cdiv(num_spans, spans_per_split)
    m = torch.empty(splits, num_heads, q_len, dtype=torch.float32, device=device)
    l_ = torch.empty_like(m)
    launch_fitting(_span_stats_kernel, (num_qblocks, num_kv_heads, splits),
        queries, padded, scale, valid, m, l_, m if scores is None else scores,
        *queries.stride(), *padded.stride(), *scale.stride(),
        num_heads, q_len, num_spans, width, spans_per_split, qk_scale, STORE=scores is not None, **common)
    return m, l_


def _row_lse(queries: torch.Tensor, padded: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor,
             num_spans: int, width: int, qk_scale: float, block_q: int, block_s: int, span_splits: int | None,
             common: dict) -> torch.Tensor:
    """``[H, Lq]`` base-2 log-sum-exp of every (head, query) row's span scores: :func:`_row_stats`' shares
    combined in torch (``-inf`` for a row with no vector at all)."""
    m, l_ = _row_stats(queries, padded, scale, valid, num_spans, width, qk_scale, block_q, block_s, span_splits,
                       common)
    if m.shape[0] == 1:
        return torch.where(torch.isneginf(m[0]), m[0], m[0] + torch.log2(l_[0]))
    m_max = m.amax(dim=0)
    m_safe = torch.where(torch.isneginf(m_max), torch.zeros_like(m_max), m_max)
    return (m_safe + torch.log2((l_ * torch.exp2(m - m_safe)).sum(dim=0))).contiguous()  # -inf: no vector at all


def _two_pass(queries: torch.Tensor, padded: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor,
              num_spans: int, width: int, qk_scale: float, block_q: int, block_s: int, group_p: int,
              span_splits: int | None, query_splits: int | None, common: dict) -> torch.Tensor:
    """``[H, S]`` mass summed over the queries with every score computed twice and nothing stored: the row
    statistics, then ``_span_mass_kernel`` recomputing the scores per tile of spans over shares of the queries."""
    num_heads, q_len, _ = queries.shape
    num_kv_heads = padded.shape[1]
    device = queries.device
    lse = _row_lse(queries, padded, scale, valid, num_spans, width, qk_scale, block_q, block_s, span_splits, common)
    num_qblocks = triton.cdiv(q_len, block_q)
    num_sblocks = triton.cdiv(num_spans, block_s)
    splits = _launch.num_splits(query_splits, "query_splits", num_qblocks, num_sblocks * num_kv_heads, device)
    queries_per_split = triton.cdiv(num_qblocks, splits) * block_q
    splits = triton.cdiv(q_len, queries_per_split)
    out = torch.empty(splits, num_heads, num_spans, dtype=torch.float32, device=device)
    launch_fitting(_span_mass_kernel, (num_sblocks, num_kv_heads, splits),
        queries, padded, scale, valid, lse, out, *queries.stride(), *padded.stride(), *scale.stride(),
        num_heads, q_len, num_spans, width, queries_per_split, qk_scale, GROUP_P=group_p, **common)
    return out[0] if splits == 1 else out.sum(dim=0)


def _span_probabilities_one_query(queries: torch.Tensor, vectors: torch.Tensor, owner: torch.Tensor,
                                  num_spans: int, scaling: float, block_s: int | None,
                                  layout: SpanLayout | None, num_warps: int | None = None,
                                  num_stages: int | None = None) -> torch.Tensor:
    """:func:`span_probabilities_triton` for ``q_len == 1`` (checked inputs, ``num_spans > 0``): one launch of
    ``_span_decode_scores_kernel`` writes the ``[H, S]`` float32 scores (each vector tile read once, from the
    layout as it is kept), then ``torch.softmax`` (spans without vectors get 0; with no vector at all a row is NaN,
    as in the reference). No host synchronisation: capturable in a CUDA graph."""
    num_heads, _, head_dim = queries.shape
    num_kv_heads = vectors.shape[1]
    group = num_heads // num_kv_heads
    queries, padded, scale, scaled, valid, width, compute, dot_precision = _launch.operands(
        queries, vectors, owner, num_spans, layout, INTERPRETED)
    device = queries.device
    _, default_s, default_warps, default_stages = block_sizes(head_dim, group, device, compute)
    if device.type == "cuda" and compute != torch.float32 and head_dim <= 128 and _launch.ONE_QUERY_LAUNCH:
        default_s, default_warps, default_stages = _launch.ONE_QUERY_LAUNCH
    elif device.type == "cuda" and num_spans >= _launch.ONE_QUERY_WIDE_FROM:
        default_s = 128  # measured on the H200 (bench_span_scoring --shapes llama8b-decode): 64 wins below
    num_warps = default_warps if num_warps is None else num_warps
    num_stages = default_stages if num_stages is None else num_stages
    block_s = _pow2_block(block_s, default_s, "block_s")
    group_p = triton.next_power_of_2(group)
    block_q = max(1, 16 // min(group_p, 16))  # tl.dot needs 16 rows: the group's heads, padded
    scores = torch.empty(num_heads, num_spans, dtype=torch.float32, device=device)
    launch_fitting(_span_decode_scores_kernel, (triton.cdiv(num_spans, block_s), num_kv_heads),
        queries, padded, scale, valid, scores, queries.stride(0), queries.stride(2), *padded.stride(),
        *scale.stride(), num_spans, width, float(scaling),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=group_p * block_q, BLOCK_S=block_s, HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), DOT_PRECISION=dot_precision, SCALED=scaled,
        LOAD_PADDING=_launch.DECODE_LOAD_PADDING,
        num_warps=num_warps, num_stages=num_stages)
    return torch.softmax(scores, dim=-1)  # no vector at all: a row of -inf, NaN as in the reference
