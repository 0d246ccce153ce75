"""Triton backend of :func:`ltri_rag.kernels.attention.local_attention` (same arguments, same result).

Semantics and shapes are those of the torch reference (see its docstring); in short, with ``G = H // Hkv``:

    q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]``, ``causal_offset + Lq == Lk``; query ``i`` sits at key index
    ``causal_offset + i`` and sees keys ``j <= causal_offset + i``; query head ``h`` reads KV head ``h // G``.

Design (two kernels, no atomics, deterministic):

* **Forward** (``_local_fwd_kernel``), grid ``(cdiv(Lq * G, BLOCK_M), B * Hkv)``. GQA is *packed*: the ``Lq * G``
  query rows of one KV head are ordered query-major, row ``r`` = (query ``r // G``, head ``(r % G)`` of the group),
  and one program takes ``BLOCK_M`` consecutive rows. Each K/V tile it loads thus serves every query head of the
  group, any ``G`` works (7 for Qwen) with no padding of the group to a power of two, and the rows of a block
  still cover a contiguous query range, so the causal bound is one scalar per program. The program runs the
  flash-attention online softmax (base 2, float32 statistics and accumulator) over the key blocks its queries
  can see: first the blocks every row sees in full (no mask), then the blocks on the diagonal (masked); blocks
  past the last visible key are never visited. It writes ``out`` and ``lse``.

  With ``band_width > 0`` the masked phase starts early enough to also cover keys ``causal_offset + i - o``
  (``o < band_width``); there the row's diagonal scores are picked out of the score tile (``tl.gather``) and kept
  in registers. After the loop the row's final ``lse`` and ``extra_lse`` give ``total`` and the program writes
  ``exp(score - total)`` per head into a float32 scratch ``[B, H, Lq, band_width]``; the head mean is one torch
  reduction afterwards (a program only holds the ``G`` heads of its KV head, and the mean is over all ``H``).
  No score is computed twice for the band.

  With ``memory`` (the working set's other part: sinks and retrieved spans, ``[B, Hkv, M, D]`` with a key mask),
  the program first runs the same online softmax over the memory keys (every row sees every real one; the
  ``fixed`` position scheme gives them queries of their own), then over the local keys, so memory attention,
  local attention and their merge are one kernel and ``lse`` is the working set's total.

* **Key mass** (``_local_key_mass_kernel``, only with ``want_key_mass``), grid ``(cdiv(Lk, BLOCK_N),
  B * Hkv)``. It needs the final ``lse`` of every row, hence a second pass: each program holds one K tile and
  walks the packed row blocks (the same ``(query, head)`` packing) from the first query that can see the tile
  to the end, recomputes the scores, and sums ``exp(score - total)``, ``total = logaddexp(lse, extra_lse)``,
  over rows (queries and the group's heads). The sum runs elementwise into a ``[BLOCK_M, BLOCK_N]`` tile, reduced
  over its rows once after the loop (a reduction across rows per block would cross warps every step), and only
  the row blocks on the causal diagonal are masked. Each key column is owned by one program, so no atomics.

Inputs may be float16, bfloat16 or float32 (mixed dtypes are computed in float32); both matrix products take
the input dtype (``p`` is rounded to it for ``p @ v``, as in flash attention) and accumulate in float32.
float32 inputs use IEEE products (no TF32), so they match the reference to ~1e-6. Under the interpreter,
bfloat16 inputs are computed in float32: its ``tl.dot`` does not support bfloat16 (triton issue 11584).
``head_dim`` may be any size up to 256 (padded to a power of two >= 16 in registers, masked loads).

Block sizes come from :func:`block_sizes`: small ones under the Triton interpreter (``TRITON_INTERPRET=1``,
CPU tensors), spill-free but untimed defaults on CUDA (8 warps, ``64 x 64``; ``64 x 32`` for float32 inputs or
``head_dim > 128``), still to be tuned on the GPU. ``TRITON_INTERPRET`` is read when this module is imported
(Triton decides then how to build the kernels): set it before the import.
"""


import torch
from ltri_rag.kernels._triton_support import (interpreted, launch_fitting, tl, triton, triton_available,
                                              pow2_block as _pow2_block)
from ltri_rag.kernels.attention import LocalAttention, _check_mass_rows, _check_memory, _check_qkv, local_attention
from ltri_rag.kernels.local_launch import block_sizes, launch_setting as _launch_setting

__all__ = ["block_sizes", "local_attention_triton", "triton_available"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# whether the kernels below were built for the Triton interpreter (it is decided when they are decorated)
INTERPRETED = interpreted()

KEY_MASS_LAUNCH: tuple[int, int, int, int] | None = None
"""``(block_m, block_n, num_warps, num_stages)`` of the key-mass kernel when :func:`local_attention_triton` is
given no launch settings; None: the forward kernel's (what :func:`block_sizes` returns). For sweeps
(``benchmarks/bench_local_attention.py --mass-sweep``)."""


if triton is not None:
    # Only triton *builtins* are called inside the kernels, plus jit helpers of this module: the library's own jit
    # functions (tl.zeros, tl.sum, tl.max) are built when triton is imported, and under the interpreter calling
    # them fails when triton was imported before TRITON_INTERPRET was set (as in a test session). tl.sum / tl.max
    # are tl.reduce with the combine functions below (the library's own where they exist: the interpreter
    # recognises those and reduces with numpy, without calling them), so the compiled code is the same.

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _maximum(a, b):
        return tl.maximum(a, b)

    _sum_combine = getattr(tl.standard, "_sum_combine", _add)
    _max_combine = getattr(tl.standard, "_elementwise_max", _maximum)

    @triton.jit
    def _logaddexp2(a, b):
        """``log2(2^a + 2^b)``, ``-inf`` when both are ``-inf``."""
        mx = tl.maximum(a, b)
        empty = mx == float("-inf")
        safe = tl.where(empty, 0.0, mx)
        both = tl.maximum(tl.exp2(a - safe) + tl.exp2(b - safe), 1.0)  # in [1, 2] unless both are -inf
        return tl.where(empty, float("-inf"), safe + tl.log2(both))

    @triton.jit
    def _score_tile(q, k_t, qk_scale, cap2, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Scores of ``q [M, D]`` against ``k_t [D, N]`` in base 2 (natural scores times log2(e)), float32."""
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        if SOFTCAP:
            x = s * qk_scale  # q . k * scaling / cap
            t = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|), in (0, 1]: no overflow
            th = (1.0 - t) / (1.0 + t)
            s = tl.where(x < 0, -th, th) * cap2  # cap * tanh(x) * log2(e)
        else:
            s = s * qk_scale  # scaling * log2(e)
        return s

    @triton.jit
    def _fwd_block(acc, l_i, m_i, band_s, q, k_base, v_base, start, q_pos, kv_len,
                   stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, cap2,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   SOFTCAP: tl.constexpr, MASKED: tl.constexpr, BAND: tl.constexpr, BAND_P: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
        """One key block of the online softmax; ``MASKED`` blocks apply the causal and the length mask."""
        n = start + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        k_ptrs = k_base + n[None, :] * stride_kn + d[:, None] * stride_kd  # [D, N]: K transposed
        v_ptrs = v_base + n[:, None] * stride_vn + d[None, :] * stride_vd  # [N, D]
        if MASKED:
            k_t = tl.load(k_ptrs, mask=(n[None, :] < kv_len) & (d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs, mask=(n[:, None] < kv_len) & (d[None, :] < HEAD_DIM), other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k_t = tl.load(k_ptrs, mask=d[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=d[None, :] < HEAD_DIM, other=0.0)
        else:
            k_t = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = _score_tile(q, k_t, qk_scale, cap2, SOFTCAP, DOT_PRECISION)
        if MASKED:
            s = tl.where((n[None, :] <= q_pos[:, None]) & (n[None, :] < kv_len), s, float("-inf"))
            if BAND:
                # band column o of row r is key q_pos - o: tile column q_pos - o - start when inside the tile
                o = tl.arange(0, BAND_P)
                col = q_pos[:, None] - o[None, :] - start
                inside = (col >= 0) & (col < BLOCK_N)
                picked = tl.gather(s, tl.minimum(tl.maximum(col, 0), BLOCK_N - 1), axis=1)
                band_s = tl.where(inside, picked, band_s)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without a key so far stay at 0 mass
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, l_i, m_new, band_s

    @triton.jit
    def _mem_block(acc, l_i, m_i, qm, mk_base, mv_base, mm_base, start, mem_len,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, cap2,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One block of memory keys (no causality; the key mask says which are real) of the online softmax."""
        n = start + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)
        n_ok = n < mem_len
        k_t = tl.load(mk_base + n[None, :] * stride_kn + d[:, None] * stride_kd,
                      mask=n_ok[None, :] & (d[:, None] < HEAD_DIM), other=0.0)
        v = tl.load(mv_base + n[:, None] * stride_vn + d[None, :] * stride_vd,
                    mask=n_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        valid = n_ok & (tl.load(mm_base + n * stride_mn, mask=n_ok, other=0) != 0)
        s = _score_tile(qm, k_t, qk_scale, cap2, SOFTCAP, DOT_PRECISION)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, l_i, m_new

    @triton.jit(do_not_specialize=("q_len", "kv_len", "causal_offset", "mem_len"))
    def _local_fwd_kernel(Q, K, V, Out, Lse, Extra, Band, QM, MK, MV, MMask,
                          stride_qb, stride_qh, stride_qm, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_qmb, stride_qmh, stride_qmm, stride_qmd,
                          stride_mkb, stride_mkh, stride_mkn, stride_mkd,
                          stride_mvb, stride_mvh, stride_mvn, stride_mvd,
                          stride_mmb, stride_mmh, stride_mmn,
                          num_kv_heads, q_len, kv_len, causal_offset, band_width, mem_len, qk_scale, cap2,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                          HAS_EXTRA: tl.constexpr, HAS_MEM: tl.constexpr, MEM_OWN_Q: tl.constexpr,
                          BAND: tl.constexpr, BAND_P: tl.constexpr, DOT_PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // num_kv_heads).to(tl.int64)
        kvh = (pid_bh % num_kv_heads).to(tl.int64)
        num_heads = num_kv_heads * GROUP
        # packed rows: r -> (query r // G, head kvh * G + r % G)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len * GROUP
        qi = rows // GROUP
        head = kvh * GROUP + rows % GROUP  # int64
        q_pos = causal_offset + qi  # key index of each row's query
        d = tl.arange(0, BLOCK_D)
        q_ptrs = (Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None].to(tl.int64) * stride_qm
                  + d[None, :] * stride_qd)
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh

        # key ranges: [0, masked_start) seen by every row (no mask), [masked_start, key_end) masked
        first_q = (pid_m * BLOCK_M) // GROUP
        last_q = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, q_len - 1)
        key_end = causal_offset + last_q + 1
        masked_start = (tl.maximum(causal_offset + first_q + 1, 0) // BLOCK_N) * BLOCK_N
        if BAND:
            band_lo = (tl.maximum(causal_offset + first_q - band_width + 1, 0) // BLOCK_N) * BLOCK_N
            masked_start = tl.minimum(masked_start, band_lo)

        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        band_s = tl.full([BLOCK_M, BAND_P], float("-inf"), dtype=tl.float32)
        if HAS_MEM:  # the memory part first: sinks and retrieved spans, all visible to every row, key-masked
            if MEM_OWN_Q:
                qm = tl.load(QM + b * stride_qmb + head[:, None] * stride_qmh + qi[:, None].to(tl.int64) * stride_qmm
                             + d[None, :] * stride_qmd, mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
            else:  # the memory part is read with the chunk's own queries (every scheme but ``fixed``)
                qm = q
            mk_base = MK + b * stride_mkb + kvh * stride_mkh
            mv_base = MV + b * stride_mvb + kvh * stride_mvh
            mm_base = MMask + b * stride_mmb + kvh * stride_mmh
            for start in range(0, mem_len, BLOCK_N):
                acc, l_i, m_i = _mem_block(acc, l_i, m_i, qm, mk_base, mv_base, mm_base, start, mem_len,
                                           stride_mkn, stride_mkd, stride_mvn, stride_mvd, stride_mmn, qk_scale,
                                           cap2, HEAD_DIM, BLOCK_D, BLOCK_N, SOFTCAP, DOT_PRECISION)
        for start in range(0, masked_start, BLOCK_N):
            acc, l_i, m_i, band_s = _fwd_block(
                acc, l_i, m_i, band_s, q, k_base, v_base, start, q_pos, kv_len,
                stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, cap2,
                HEAD_DIM, BLOCK_D, BLOCK_N, SOFTCAP, False, BAND, BAND_P, DOT_PRECISION)
        for start in range(masked_start, key_end, BLOCK_N):
            acc, l_i, m_i, band_s = _fwd_block(
                acc, l_i, m_i, band_s, q, k_base, v_base, start, q_pos, kv_len,
                stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, cap2,
                HEAD_DIM, BLOCK_D, BLOCK_N, SOFTCAP, True, BAND, BAND_P, DOT_PRECISION)

        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        lse2 = tl.where(has_key, m_i + tl.log2(l_safe), float("-inf"))
        row_idx = (b * num_heads + head) * q_len + qi  # int64 index into [B, H, Lq]
        tl.store(Out + row_idx[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None],
                 mask=row_ok[:, None] & (d[None, :] < HEAD_DIM))
        tl.store(Lse + row_idx, lse2 * 0.6931471805599453, mask=row_ok)
        if BAND:
            total2 = lse2
            if HAS_EXTRA:
                extra = tl.load(Extra + row_idx, mask=row_ok, other=float("-inf"))
                total2 = _logaddexp2(lse2, extra * 1.4426950408889634)
            prob = tl.where(band_s == float("-inf"), 0.0, tl.exp2(band_s - total2[:, None]))
            o = tl.arange(0, BAND_P)
            tl.store(Band + row_idx[:, None] * band_width + o[None, :], prob,
                     mask=row_ok[:, None] & (o[None, :] < band_width))

    @triton.jit
    def _mass_rows(part, q_base, k_t, lse_base, extra_base, n, n_ok, r0, q_len, causal_offset, pos_off, pos_step,
                   qk_scale, cap2, stride_qh, stride_qm, stride_qd, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, SOFTCAP: tl.constexpr,
                   HAS_EXTRA: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
        """``part [M, N]`` plus one packed row block's ``exp(score - total)`` against the program's key tile;
        ``MASKED`` blocks apply the causal mask (blocks whose rows all see the tile only the row count's). Query
        ``qi`` of the (sampled) rows sits at chunk position ``pos_off + qi * pos_step``."""
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len * GROUP
        qi = rows // GROUP
        head = (rows % GROUP).to(tl.int64)  # within the KV head's group; q_base / lse_base point at its first
        d = tl.arange(0, BLOCK_D)
        q = tl.load(q_base + head[:, None] * stride_qh + qi[:, None].to(tl.int64) * stride_qm + d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
        row_idx = head * q_len + qi
        total2 = tl.load(lse_base + row_idx, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        if HAS_EXTRA:
            extra = tl.load(extra_base + row_idx, mask=row_ok, other=float("-inf"))
            total2 = _logaddexp2(total2, extra * 1.4426950408889634)
        s = _score_tile(q, k_t, qk_scale, cap2, SOFTCAP, DOT_PRECISION)
        if MASKED:
            seen = (n[None, :] <= causal_offset + pos_off + qi[:, None] * pos_step) & row_ok[:, None] & n_ok[None, :]
            return part + tl.where(seen, tl.exp2(s - total2[:, None]), 0.0)
        # every row sees every key of the tile; rows past the end have total -inf: their exp2 would be inf
        return part + tl.where(row_ok[:, None], tl.exp2(s - total2[:, None]), 0.0)

    @triton.jit(do_not_specialize=("q_len", "kv_len", "causal_offset", "pos_off", "pos_step"))
    def _local_key_mass_kernel(Q, K, Lse, Extra, Mass,
                               stride_qb, stride_qh, stride_qm, stride_qd,
                               stride_kb, stride_kh, stride_kn, stride_kd,
                               num_kv_heads, q_len, kv_len, causal_offset, pos_off, pos_step, qk_scale, cap2,
                               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                               HAS_EXTRA: tl.constexpr, DOT_PRECISION: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // num_kv_heads).to(tl.int64)
        kvh = (pid_bh % num_kv_heads).to(tl.int64)
        num_heads = num_kv_heads * GROUP
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < kv_len
        d = tl.arange(0, BLOCK_D)
        k_t = tl.load(K + b * stride_kb + kvh * stride_kh + n[None, :] * stride_kn + d[:, None] * stride_kd,
                      mask=n_ok[None, :] & (d[:, None] < HEAD_DIM), other=0.0)
        q_base = Q + b * stride_qb + (kvh * GROUP) * stride_qh
        lse_base = Lse + (b * num_heads + kvh * GROUP) * q_len
        extra_base = Extra + (b * num_heads + kvh * GROUP) * q_len
        rows_total = q_len * GROUP
        # the packed row block holding the first (sampled) query that sees the tile's first key, and the first
        # block whose rows all see its last key (from there on no causal mask); query qi sits at pos_off + qi * step
        first_q = (tl.maximum(pid_n * BLOCK_N - causal_offset - pos_off, 0) + pos_step - 1) // pos_step
        row_start = (first_q * GROUP // BLOCK_M) * BLOCK_M
        full_q = tl.minimum((tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - causal_offset - pos_off, 0) + pos_step - 1)
                            // pos_step, q_len)
        full_start = tl.maximum((full_q * GROUP + BLOCK_M - 1) // BLOCK_M * BLOCK_M, row_start)
        # exp(score - total) summed elementwise over row blocks; the one reduction over rows comes after the loops
        part = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
        for r0 in range(row_start, full_start, BLOCK_M):
            part = _mass_rows(part, q_base, k_t, lse_base, extra_base, n, n_ok, r0, q_len, causal_offset,
                              pos_off, pos_step, qk_scale, cap2, stride_qh, stride_qm, stride_qd, GROUP, HEAD_DIM,
                              BLOCK_D, BLOCK_M, SOFTCAP, HAS_EXTRA, DOT_PRECISION, True)
        for r0 in range(full_start, rows_total, BLOCK_M):
            part = _mass_rows(part, q_base, k_t, lse_base, extra_base, n, n_ok, r0, q_len, causal_offset,
                              pos_off, pos_step, qk_scale, cap2, stride_qh, stride_qm, stride_qd, GROUP, HEAD_DIM,
                              BLOCK_D, BLOCK_M, SOFTCAP, HAS_EXTRA, DOT_PRECISION, False)
        mass = tl.reduce(part, 0, _sum_combine) * pos_step
        tl.store(Mass + (b * num_kv_heads + kvh) * kv_len + n, mass, mask=n_ok)


def local_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    causal_offset: int,
    extra_lse: torch.Tensor | None = None,
    band_width: int = 0,
    want_key_mass: bool = False,
    softcap: float | None = None,
    memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    mass_step: int = 1,
    mass_anchor: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> LocalAttention:
    """Triton version of :func:`ltri_rag.kernels.attention.local_attention`; same arguments and result.

    GQA is packed: one forward program serves all ``G`` query heads of a KV head for a block of queries (see the
    module docstring for the grid and the second, key-mass kernel).

    Args:
        q, k, v, scaling, causal_offset, extra_lse, band_width, want_key_mass, softcap, memory, mass_step,
            mass_anchor: As for the reference. With ``memory`` the forward program first runs its online softmax
            over the memory keys (key-masked, all visible), then over the local ones, so memory, window and merge
            are one kernel. With ``mass_step`` > 1 the key-mass kernel walks the sampled queries' rows only.
        block_m: Packed ``(query, head)`` rows per program (power of two >= 16); None = :func:`block_sizes`.
        block_n: Keys per tile (power of two >= 16); None = :func:`block_sizes`.
        num_warps, num_stages: Launch settings of both kernels; None = :func:`block_sizes` (for tuning sweeps:
            ``benchmarks/bench_local_attention.py --sweep``). With all four None the key-mass kernel takes
            ``KEY_MASS_LAUNCH`` where it applies.

    Returns:
        A :class:`~ltri_rag.kernels.attention.LocalAttention` (float32 tensors on ``q``'s device).

    Raises:
        RuntimeError: triton is not installed.
        ValueError: inconsistent shapes, devices or arguments, or tensors the kernels cannot run on.
    """
    if triton is None:
        raise RuntimeError("triton is not installed: use ltri_rag.kernels.attention.local_attention instead")
    group = _check_qkv(q, k, v)
    batch, num_heads, q_len, head_dim = q.shape
    anchor = _check_mass_rows(q_len, mass_step, mass_anchor)
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    if causal_offset + q_len != kv_len:
        raise ValueError(f"causal_offset {causal_offset} + q_len {q_len} must equal kv_len {kv_len}")
    if band_width < 0:
        raise ValueError(f"band_width must be >= 0, got {band_width}")
    if softcap is not None and softcap == 0:
        raise ValueError("softcap must be non-zero (or None)")
    if extra_lse is not None:
        if tuple(extra_lse.shape) != (batch, num_heads, q_len):
            raise ValueError(f"extra_lse must be [batch, num_heads, q_len]={(batch, num_heads, q_len)}, "
                             f"got {tuple(extra_lse.shape)}")
        if extra_lse.device != q.device:
            raise ValueError(f"extra_lse is on {extra_lse.device}, q on {q.device}")
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {_MAX_HEAD_DIM} is not supported by the triton kernels")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the triton kernels need CUDA tensors (got {q.device}), or TRITON_INTERPRET=1 set "
                         "before ltri_rag.kernels.triton_local is imported")
    if memory is not None:
        _check_memory(q, k, memory, extra_lse)
    if q.numel() == 0 or k.numel() == 0:  # nothing to launch: the reference handles the empty shapes
        return local_attention(q, k, v, scaling=scaling, causal_offset=causal_offset, extra_lse=extra_lse,
                               band_width=band_width, want_key_mass=want_key_mass, softcap=softcap, memory=memory,
                               mass_step=mass_step, mass_anchor=anchor)
    q_mem = mem_k = mem_v = mem_mask = None
    if memory is not None:
        q_mem, mem_k, mem_v, mem_mask = memory
    own_q = memory is not None and q_mem is not q  # memory queries of their own (else the chunk's, loaded once)
    tensors = [t for t in (q, k, v, q_mem, mem_k, mem_v) if t is not None]
    if not (all(t.dtype == q.dtype for t in tensors) and q.dtype in _DTYPES) or (
            INTERPRETED and q.dtype == torch.bfloat16):
        # mixed dtypes are computed in float32; so is bfloat16 under the interpreter, which multiplies bfloat16
        # bit patterns in tl.dot (triton issue 11584, unsupported upstream)
        q, k, v = q.float(), k.float(), v.float()
        if memory is not None:
            q_mem, mem_k, mem_v = q_mem.float(), mem_k.float(), mem_v.float()

    tuned = block_m is None and block_n is None and num_warps is None and num_stages is None
    default_m, default_n, default_warps, default_stages = block_sizes(head_dim, group, q.device, q.dtype)
    num_warps = _launch_setting(num_warps, default_warps, "num_warps", (1, 2, 4, 8, 16))
    num_stages = _launch_setting(num_stages, default_stages, "num_stages", range(1, 8))
    block_m = _pow2_block(block_m, default_m, "block_m")
    block_n = _pow2_block(block_n, default_n, "block_n")
    block_d = max(16, triton.next_power_of_2(head_dim))
    if softcap is None:
        qk_scale, cap2 = scaling * _LOG2E, 1.0
    else:
        cap = abs(float(softcap))
        qk_scale, cap2 = scaling / cap, cap * _LOG2E
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    band = band_width > 0
    band_p = max(2, triton.next_power_of_2(band_width))

    out = torch.empty(batch, num_heads, q_len, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, q_len, dtype=torch.float32, device=q.device)
    extra = None if extra_lse is None else extra_lse.to(torch.float32).contiguous()
    scratch = torch.empty(batch, num_heads, q_len, band_width, dtype=torch.float32, device=q.device) if band else lse
    common = {"GROUP": group, "HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": block_m,
              "SOFTCAP": softcap is not None, "HAS_EXTRA": extra is not None, "DOT_PRECISION": dot_precision,
              "num_warps": num_warps, "num_stages": num_stages}

    has_mem = memory is not None and mem_k.shape[2] > 0
    if has_mem:
        mask = mem_mask.view(torch.uint8)
        mem_args = (q_mem, mem_k, mem_v, mask)
        mem_strides = (*q_mem.stride(), *mem_k.stride(), *mem_v.stride(), *mask.stride())
        mem_len = mem_k.shape[2]
    else:  # unused pointers and strides
        mem_args, mem_strides, mem_len = (q, k, v, lse), (0,) * 15, 0
    grid = (triton.cdiv(q_len * group, block_m), batch * num_kv_heads)
    launch_fitting(_local_fwd_kernel, grid,
        q, k, v, out, lse, lse if extra is None else extra, scratch, *mem_args,
        *q.stride(), *k.stride(), *v.stride(), *mem_strides,
        num_kv_heads, q_len, kv_len, causal_offset, band_width, mem_len, qk_scale, cap2,
        BLOCK_N=block_n, BAND=band, BAND_P=band_p, HAS_MEM=has_mem, MEM_OWN_Q=has_mem and own_q,
        **common)

    key_mass = None
    if want_key_mass:
        key_mass = torch.empty(batch, num_kv_heads, kv_len, dtype=torch.float32, device=q.device)
        mass_n, mass = block_n, common
        if tuned and KEY_MASS_LAUNCH:
            mass_m, mass_n, mass_warps, mass_stages = KEY_MASS_LAUNCH
            mass_m, mass_n = _pow2_block(mass_m, 0, "block_m"), _pow2_block(mass_n, 0, "block_n")
            mass_warps = _launch_setting(mass_warps, 0, "num_warps", (1, 2, 4, 8, 16))
            mass_stages = _launch_setting(mass_stages, 0, "num_stages", range(1, 8))
            mass = {**common, "BLOCK_M": mass_m, "num_warps": mass_warps, "num_stages": mass_stages}
        # the sampled queries anchor - j * mass_step inside the chunk, as a strided view (their LSEs compacted);
        # first = 0 with every query
        first = anchor % mass_step
        rows_q, rows_lse, rows_extra = q, lse, extra
        if mass_step > 1:
            rows_q = q[:, :, first::mass_step]
            rows_lse = lse[:, :, first::mass_step].contiguous()
            rows_extra = None if extra is None else extra[:, :, first::mass_step].contiguous()
        grid = (triton.cdiv(kv_len, mass_n), batch * num_kv_heads)
        launch_fitting(_local_key_mass_kernel, grid,
            rows_q, k, rows_lse, rows_lse if rows_extra is None else rows_extra, key_mass,
            *rows_q.stride(), *k.stride(),
            num_kv_heads, rows_q.shape[2], kv_len, causal_offset, first, mass_step,
            qk_scale, cap2, BLOCK_N=mass_n, **mass)
    band_out = scratch.mean(dim=1) if band else None
    return LocalAttention(out=out, lse=lse, key_mass=key_mass, band=band_out)

