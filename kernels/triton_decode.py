"""Fused split-K decode attention over ``[memory | local window]`` (one decoded token per sequence).

The engine's decode step attends one query per sequence to two key sets and needs, besides the output, the
attention probabilities of the window keys (span detection). Today it runs, in torch::

    out_m, lse_m = attention_with_lse(q_mem, mem_k, mem_v, scaling=s, key_mask=mem_mask, softcap=c)
    local = local_attention(q, win_k, win_v, scaling=s, causal_offset=W - 1, extra_lse=lse_m,
                            band_width=bw, want_key_mass=wk, softcap=c)
    out, lse = merge_attention(out_m, lse_m, local.out, local.lse)

:func:`~ltri_rag.kernels.attention_decode.decode_attention` is that composition (the torch reference);
:func:`decode_attention_triton` computes the same
:class:`~ltri_rag.kernels.attention.LocalAttention` (``out``/``lse`` merged over both parts; ``key_mass`` /
``band`` of the window keys under the *combined* normaliser) in two Triton launches.

Shapes (``G = H // Hkv``, query head ``h`` reads KV head ``h // G``):
    q ``[B, H, 1, D]`` (and ``q_mem``, the queries for the memory keys when a position scheme rotates them
    differently; default ``q``); mem_k / mem_v ``[B, Hkv, M, D]``, mem_mask ``[B, Hkv, M]`` bool (False =
    padding; None = all valid; the memory may be absent or ``M = 0``); win_k / win_v ``[B, Hkv, W, D]``, the local
    window *including the new token as its last key* (``W >= 1``; the query sees all ``W`` keys).

Design (two kernels, deterministic, no host sync: graph-capturable; the finish is in :mod:`triton_decode_finish`):

* **Split pass** (``_decode_split_kernel``), grid ``(splits, B * Hkv)``. The keys are cut into tiles of
  ``BLOCK_N``: first ``cdiv(M, BLOCK_N)`` memory tiles, then ``cdiv(W, BLOCK_N)`` window tiles (the two tensors are
  read where they are, never concatenated); split ``s`` owns a contiguous run of ``tiles_per_split`` tiles, so a
  split reads from the memory, from the window, or from the end of one and the start of the other (two loops with
  scalar bounds). GQA is packed: a program holds the ``G`` query heads of its KV head as the rows of a
  ``[G_P, D]`` tile (``G_P`` = ``G`` rounded up to a power of two >= 16 for ``tl.dot``), so each K/V tile is read
  once for the whole group. It runs the online softmax (base 2, float32 statistics and accumulator) and writes per
  ``(split, head)`` the partial LSE and the normalised partial output (float32). With ``key_mass`` or ``band``
  wanted, the window tiles also write their scores (base 2, float32, ``[B, H, W]``): the finishing pass then needs
  no K re-read (``G * 4`` bytes per window key instead of ``D * itemsize``) and uses exactly the scores the
  softmax saw. The number of splits depends on shapes only: about two programs per multiprocessor
  (``B * Hkv * splits ~ 2 * SMs``, the SM count cached), at least two tiles per split, at most 256 splits; 3 under
  the interpreter; or ``num_splits``.

* **Finish pass** (``_decode_finish_kernel``), one launch, a flat grid of ``B * Hkv * wblocks`` programs, plus
  ``B`` band programs with ``band_width > 0``. Program ``(b, kvh, wblock)`` combines the partial LSEs of its rows
  into the total LSE (one ``[G, splits]`` tile); the first ``num_merge`` blocks each merge a slice of ``MERGE_D``
  columns of the partial outputs (a ``[G, chunk, MERGE_D]`` tile, chunk = every split where it fits) and write
  those columns of ``out`` (block 0 also ``lse``); with ``want_key_mass`` each program writes
  ``key_mass = sum over the group's heads of exp2(score - total)`` for its ``BLOCK_W`` window keys (one owner per
  key). Band program ``b`` reads the partial LSEs and the scores of keys ``W - 1 - o`` of all ``H`` heads of
  sequence ``b`` as two tiles and sums the probabilities over the heads: ``band[b, 0, o]`` is that sum over ``H``
  (0 where ``W - 1 - o < 0``). With ``q_len = 1``, band is the head mean of the last ``band_width`` columns.
  (``ONE_TILE_FINISH = False``: the previous form, block 0 merging every column and the band walking the KV heads.)

* **One launch** (``FUSED_FINISH``, off by default until timed on the GPU): the split pass does the finishing work
  itself. Each split program counts its arrival on a device counter of its ``(b, kvh)`` (an atomic after a block
  barrier); the last to arrive, when every partial of that head is written, runs the head's finish programs one
  after another, and the last head of a sequence to finish runs the band program. The same helpers in the same
  order: the results equal the two-launch form's. The counters (``B * Hkv + B`` int32, kept per device) are put
  back to 0 by the programs that used them, so a captured graph replays correctly.

* **Dependent launch** (``PDL_FINISH``, on by default since session 41; Hopper and later): the finishing pass is
  launched as a programmatic dependent launch, scheduled while the split pass runs and waiting on the device for its
  writes (same kernels, same results). Elsewhere (older GPUs, an older triton, the interpreter) it is a plain launch.

Window length on the device (``win_len=``, for a decode step replayed as a CUDA graph): ``win_k`` / ``win_v`` are
then buffers of capacity ``W`` and both kernels read the window's length from a one-element device tensor. Launch
shapes (splits, tiles, window blocks) come from the capacity; split programs skip the tiles past the length, the key
mass is 0 there, and the band is taken at the length. Without it the length is ``W`` (the same code path).

Dtypes: float16 / bfloat16 inputs of one dtype are multiplied in that dtype on tensor cores (``p`` rounded to it for
``p @ v``, as flash attention does) with float32 accumulation; anything else is computed in float32 with IEEE
products. Under the interpreter bfloat16 is computed in float32 (its ``tl.dot`` does not support bfloat16, triton
issue 11584). ``head_dim`` may be any size up to 256 (padded to a power of two >= 16 in registers, masked loads).

Block sizes come from :func:`~ltri_rag.kernels.decode_shapes.block_sizes` (small under the interpreter).
``TRITON_INTERPRET`` is read when this module is imported (Triton decides then how to build the kernels): set it
before the import.
"""

from __future__ import annotations

import importlib

import torch
from ltri_rag.kernels._triton_support import (dependent_launch, interpreted, launch_fitting, tl, triton,
                                              triton_available)
from ltri_rag.kernels.decode_shapes import block_sizes, finish_shapes, launch_settings, num_splits_for
from ltri_rag.kernels.attention import LocalAttention
from ltri_rag.kernels.attention_decode import _check_decode, decode_attention

__all__ = ["block_sizes", "decode_attention", "decode_attention_triton", "num_splits_for", "triton_available"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MAX_HEAD_DIM = 256
_HALF = (torch.float16, torch.bfloat16)

# The finishing pass's form. With ONE_TILE_FINISH (since session 22) the merge of the partial outputs is spread
# over column slices of MERGE_D columns, one program each (a [G, splits, MERGE_D] tile of at most MERGE_ELEMENTS
# values, so usually one load), and the band program reads every head of its sequence in one tile
# (BAND_TILE_ELEMENTS at most) instead of walking the KV heads one after another. Off, the previous form: block 0
# merged all columns in chunks of splits and the band walked the KV heads (7.3 µs per call at Llama-3-8B's 8K
# decode step, session 21's profile, for about 0.6 MB of data).
ONE_TILE_FINISH = True
MERGE_ELEMENTS = 4096
BAND_TILE_ELEMENTS = 8192

# With FUSED_FINISH the finishing work runs in the split pass itself, so a decode attention is one launch: each split
# program counts its arrival on a per-(sequence, KV head) device counter, and the last one to arrive (all partials
# written) does what that head's finishing programs would do, in the same order (same results); the last KV head of
# a sequence to finish also takes its band. The counters are reset by the programs that used them, so a captured
# graph replays with them at 0. Off until timed on the GPU: it saves one launch (~3.8 µs of a 16K step's 30 µs in
# session 34's profile) but serialises a head's finishing work in one program.
FUSED_FINISH = False

# With PDL_FINISH (on a GPU of compute capability 9.0 or later) the finishing pass is a *programmatic dependent
# launch*: the split pass lets it be scheduled as soon as every split program has started
# (``gdc_launch_dependents``), and its programs wait (``gdc_wait``, before any read or write) until the split
# pass's writes are visible. The same two kernels compute the same values; only the finishing launch's start-up
# overlaps the split pass's tail instead of following it. On since session 41 (H100, same call: 33.0-33.1 against
# 34.5-34.6 µs per layer at 16K keys for Llama-3-8B's shape, 188.7-188.9 against 189.7-190.0 at 128K; Qwen's shape
# 11.3 against 11.9-12.0 and 36.3 against 36.9-37.1; end to end 11.94 against 11.98 ms/token at 8K, 14.11 against
# 14.18 at 128K; benchmarks/results/decode_attention_h100/session41).
PDL_FINISH = True
_COUNTERS: dict[torch.device, torch.Tensor] = {}  # per device: zeros between launches (int32)
_NO_FINISH = {"FIN_GROUP_P": 1, "MERGE_D": 16, "SPLITS_P": 1, "SPLIT_CHUNK": 1, "BLOCK_W": 16, "BAND_P": 2,
              "HEADS_P": 1, "MASS": False, "BAND": False, "BAND_TILE": False}  # the split pass's, when not fused


# whether the kernels below were built for the Triton interpreter (it is decided when they are decorated)
INTERPRETED = interpreted()

# the finishing kernels live in their own module; the split kernel calls one of its jit helpers, so both must be
# built for the same mode: rebuild it where an earlier import built it for the other one
_finish = importlib.import_module("ltri_rag.kernels.triton_decode_finish")
if _finish.INTERPRETED != INTERPRETED:
    _finish = importlib.reload(_finish)
if triton is not None:
    _decode_finish_kernel, _fused_finish = _finish._decode_finish_kernel, _finish._fused_finish
    _sum_combine, _max_combine = _finish._sum_combine, _finish._max_combine  # built for this module's mode


if triton is not None:
    # As in triton_local: only triton *builtins* inside the kernels (plus jit helpers of this module and of the
    # finish module, built for the same mode above), so that the kernels also run under the interpreter when triton
    # was imported before TRITON_INTERPRET was set.

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
    def _split_tile(acc, l_i, m_i, q, k_base, v_base, mask_base, score_ptr, start, length,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale, cap2, row_ok,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr,
                    HAS_MASK: tl.constexpr, STORE_SCORES: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """One key tile ``[start, start + BLOCK_N)`` of a source of ``length`` keys: online-softmax update.

        ``score_ptr`` (with ``STORE_SCORES``): ``[G_P]`` row pointers of the score scratch, offset to key 0.
        """
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < length
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        k_t = tl.load(k_base + n[None, :] * stride_kn + d[:, None] * stride_kd,
                      mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [D, N]: K transposed
        v = tl.load(v_base + n[:, None] * stride_vn + d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [N, D]
        s = _score_tile(q, k_t, qk_scale, cap2, SOFTCAP, DOT_PRECISION)
        valid = n_ok
        if HAS_MASK:
            valid = valid & (tl.load(mask_base + n * stride_mn, mask=n_ok, other=0) != 0)
        s = tl.where(valid[None, :], s, float("-inf"))
        if STORE_SCORES:
            tl.store(score_ptr[:, None] + n[None, :], s, mask=row_ok[:, None] & n_ok[None, :])
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without a key so far stay at 0 mass
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, l_i, m_new

    @triton.jit(do_not_specialize=("mem_len", "win_len", "win_cap", "mem_tiles", "total_tiles", "tiles_per_split",
                                   "num_splits", "num_wblocks", "num_merge", "num_programs"))
    def _decode_split_kernel(
            Q, QM, MK, MV, MMask, WK, WV, PartO, PartLse, Scores, WinLen, Out, Lse, Mass, Band, Counters,
            stride_qb, stride_qh, stride_qd, stride_qmb, stride_qmh, stride_qmd,
            stride_mkb, stride_mkh, stride_mkn, stride_mkd,
            stride_mvb, stride_mvh, stride_mvn, stride_mvd,
            stride_mmb, stride_mmh, stride_mmn,
            stride_wkb, stride_wkh, stride_wkn, stride_wkd,
            stride_wvb, stride_wvh, stride_wvn, stride_wvd,
            num_kv_heads, mem_len, win_len, win_cap, mem_tiles, total_tiles, tiles_per_split, num_splits, qk_scale,
            cap2, num_wblocks, num_merge, num_programs, band_width, inv_heads,
            GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, STORE_SCORES: tl.constexpr,
            DEVICE_LEN: tl.constexpr, DOT_PRECISION: tl.constexpr, FUSED: tl.constexpr, FIN_GROUP_P: tl.constexpr,
            MERGE_D: tl.constexpr, SPLITS_P: tl.constexpr, SPLIT_CHUNK: tl.constexpr, BLOCK_W: tl.constexpr,
            BAND_P: tl.constexpr, HEADS_P: tl.constexpr, MASS: tl.constexpr, BAND: tl.constexpr,
            BAND_TILE: tl.constexpr, GDC_LAUNCH: tl.constexpr):
        if GDC_LAUNCH:  # PDL_FINISH: the finishing launch may be scheduled once every split program is here
            tl.extra.cuda.gdc_launch_dependents()
        pid_s = tl.program_id(0)
        if DEVICE_LEN:  # the window's length read from device memory, clamped to [1, win_cap]
            win_len = tl.minimum(tl.maximum(tl.load(WinLen).to(tl.int32), 1), win_cap)
        pid_bh = tl.program_id(1)
        b = (pid_bh // num_kv_heads).to(tl.int64)
        kvh = (pid_bh % num_kv_heads).to(tl.int64)
        num_heads = num_kv_heads * GROUP
        g = tl.arange(0, GROUP_P)
        row_ok = g < GROUP
        head = kvh * GROUP + g  # int64
        d = tl.arange(0, BLOCK_D)
        q_mask = row_ok[:, None] & (d[None, :] < HEAD_DIM)

        t_lo = pid_s * tiles_per_split
        t_hi = tl.minimum(t_lo + tiles_per_split, total_tiles)
        acc = tl.full([GROUP_P, BLOCK_D], 0.0, dtype=tl.float32)
        l_i = tl.full([GROUP_P], 0.0, dtype=tl.float32)
        m_i = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)
        score_ptr = Scores + (b * num_heads + head) * win_cap  # [G_P] rows of [B, H, W]

        # memory tiles [t_lo, min(t_hi, mem_tiles)): queries q_mem
        qm = tl.load(QM + b * stride_qmb + head[:, None] * stride_qmh + d[None, :] * stride_qmd, mask=q_mask,
                     other=0.0)
        mk_base = MK + b * stride_mkb + kvh * stride_mkh
        mv_base = MV + b * stride_mvb + kvh * stride_mvh
        mm_base = MMask + b * stride_mmb + kvh * stride_mmh
        for t in range(t_lo, tl.minimum(t_hi, mem_tiles)):
            acc, l_i, m_i = _split_tile(
                acc, l_i, m_i, qm, mk_base, mv_base, mm_base, score_ptr, t * BLOCK_N, mem_len,
                stride_mkn, stride_mkd, stride_mvn, stride_mvd, stride_mmn, qk_scale, cap2, row_ok,
                HEAD_DIM, BLOCK_D, BLOCK_N, SOFTCAP, HAS_MASK, False, DOT_PRECISION)

        # window tiles [max(t_lo, mem_tiles), t_hi): queries q, every key valid
        q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + d[None, :] * stride_qd, mask=q_mask, other=0.0)
        wk_base = WK + b * stride_wkb + kvh * stride_wkh
        wv_base = WV + b * stride_wvb + kvh * stride_wvh
        win_end = tl.minimum(t_hi, mem_tiles + (win_len + BLOCK_N - 1) // BLOCK_N)  # tiles past the length: none
        for t in range(tl.maximum(t_lo, mem_tiles), win_end):
            acc, l_i, m_i = _split_tile(
                acc, l_i, m_i, q, wk_base, wv_base, mm_base, score_ptr, (t - mem_tiles) * BLOCK_N, win_len,
                stride_wkn, stride_wkd, stride_wvn, stride_wvd, stride_mmn, qk_scale, cap2, row_ok,
                HEAD_DIM, BLOCK_D, BLOCK_N, SOFTCAP, False, STORE_SCORES, DOT_PRECISION)

        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        lse2 = tl.where(has_key, m_i + tl.log2(l_safe), float("-inf"))
        part_row = (pid_bh * num_splits + pid_s).to(tl.int64) * GROUP + g  # into [B * Hkv, splits, G]
        tl.store(PartLse + part_row, lse2, mask=row_ok)
        tl.store(PartO + part_row[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None], mask=q_mask)
        if FUSED:
            _fused_finish(PartO, PartLse, Scores, Out, Lse, Mass, Band, Counters, pid_bh, b, num_kv_heads, win_len,
                          win_cap, num_splits, num_wblocks, num_merge, num_programs, band_width, inv_heads, GROUP,
                          FIN_GROUP_P, HEAD_DIM, MERGE_D, SPLITS_P, SPLIT_CHUNK, BLOCK_W, BAND_P, HEADS_P, MASS,
                          BAND, BAND_TILE)


def decode_attention_triton(
    q: torch.Tensor,
    mem_k: torch.Tensor | None,
    mem_v: torch.Tensor | None,
    mem_mask: torch.Tensor | None,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    *,
    scaling: float,
    band_width: int = 0,
    want_key_mass: bool = False,
    softcap: float | None = None,
    q_mem: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    win_len: torch.Tensor | None = None,
) -> LocalAttention:
    """Triton version of :func:`decode_attention`; same arguments and result (see the module docstring).

    No host synchronisation and no data-dependent shape: the launch depends on tensor sizes only, so a CUDA graph
    can capture it (the outputs and scratch come from ``torch.empty``, i.e. the graph's memory pool).

    Args:
        q, mem_k, mem_v, mem_mask, win_k, win_v, scaling, band_width, want_key_mass, softcap, q_mem: As for
            :func:`decode_attention` (any strides; float16, bfloat16 or float32).
        num_splits: Programs sharing the keys of one KV head (None: :func:`num_splits_for`).
        block_n: Keys per tile of the split pass (power of two >= 16; None: :func:`block_sizes`).
        num_warps, num_stages: The split pass's launch settings (None: :func:`block_sizes`; tuning).
        win_len: A one-element integer tensor on ``q``'s device, or None. Given, ``win_k`` / ``win_v`` are buffers of
            capacity ``W`` of which only the first ``win_len`` keys are the window (the new token last); the kernels
            read the length from device memory (clamped to ``[1, W]``), so one launch (one captured graph) serves
            every length. ``key_mass`` keeps ``W`` columns, 0 past the length; ``band`` is taken at the length.
            The result equals the call on ``win_k[:, :, :win_len]``.

    Returns:
        A :class:`~ltri_rag.kernels.attention.LocalAttention` (float32 tensors on ``q``'s device).

    Raises:
        RuntimeError: triton is not installed.
        ValueError: inconsistent shapes, devices or arguments, or tensors the kernels cannot run on.
    """
    if triton is None:
        raise RuntimeError("triton is not installed: use ltri_rag.kernels.attention_decode.decode_attention instead")
    group, has_memory = _check_decode(q, mem_k, mem_v, mem_mask, win_k, win_v, q_mem, band_width, softcap)
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads, win_cap = win_k.shape[1], win_k.shape[2]  # the window's length, or its capacity with win_len
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} > {_MAX_HEAD_DIM} is not supported by the triton kernels")
    device = q.device
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the triton kernels need CUDA tensors (got {device}), or TRITON_INTERPRET=1 set "
                         "before ltri_rag.kernels.triton_decode is imported")
    if win_len is not None and (not isinstance(win_len, torch.Tensor) or win_len.numel() != 1
                                or win_len.device != device or win_len.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"win_len must be a one-element int32 / int64 tensor on {device}, got "
                         f"{getattr(win_len, 'shape', None)} {getattr(win_len, 'dtype', type(win_len).__name__)} on "
                         f"{getattr(win_len, 'device', None)}")
    if batch == 0 or num_heads == 0 or head_dim == 0:  # nothing to launch: the reference handles the empty shapes
        return decode_attention(q, mem_k, mem_v, mem_mask, win_k, win_v, scaling=scaling, band_width=band_width,
                                want_key_mass=want_key_mass, softcap=softcap, q_mem=q_mem)
    if not has_memory:
        mem_k = mem_v = mem_mask = None
    if q_mem is None:
        q_mem = q

    tensors = [q, q_mem, win_k, win_v] + ([mem_k, mem_v] if has_memory else [])
    half = all(t.dtype == q.dtype for t in tensors) and q.dtype in _HALF
    if INTERPRETED and q.dtype == torch.bfloat16:
        half = False  # the interpreter multiplies bfloat16 bit patterns in tl.dot (triton issue 11584)
    compute = q.dtype if half else torch.float32
    q, q_mem, win_k, win_v = (t if t.dtype == compute else t.to(compute) for t in (q, q_mem, win_k, win_v))
    if has_memory:
        mem_k, mem_v = (t if t.dtype == compute else t.to(compute) for t in (mem_k, mem_v))
    dot_precision = "ieee"  # ignored for 16-bit inputs; float32 inputs take IEEE products (no TF32)

    block_n, block_w, num_warps, num_stages, block_d = launch_settings(head_dim, device, compute, block_n,
                                                                       num_warps, num_stages)
    group_p = max(16, triton.next_power_of_2(group))
    mem_len = mem_k.shape[2] if has_memory else 0
    mem_tiles = triton.cdiv(mem_len, block_n)
    total_tiles = mem_tiles + triton.cdiv(win_cap, block_n)
    programs = batch * num_kv_heads
    splits = num_splits_for(total_tiles, programs, device, num_splits)
    tiles_per_split = triton.cdiv(total_tiles, splits)
    if softcap is None:
        qk_scale, cap2 = scaling * _LOG2E, 1.0
    else:
        cap = abs(float(softcap))
        qk_scale, cap2 = scaling / cap, cap * _LOG2E
    store_scores = want_key_mass or band_width > 0

    f32 = {"dtype": torch.float32, "device": device}
    part_o = torch.empty(programs, splits, group, head_dim, **f32)
    part_lse = torch.empty(programs, splits, group, **f32)
    scores = torch.empty(batch, num_heads, win_cap, **f32) if store_scores else part_lse
    out = torch.empty(batch, num_heads, 1, head_dim, **f32)
    lse = torch.empty(batch, num_heads, 1, **f32)
    key_mass = torch.empty(batch, num_kv_heads, win_cap, **f32) if want_key_mass else None
    band = torch.empty(batch, 1, band_width, **f32) if band_width > 0 else None

    mk, mv = (mem_k, mem_v) if has_memory else (win_k, win_v)  # dummies when there is no memory (no tile read)
    mask = mem_mask.view(torch.uint8) if mem_mask is not None else lse
    mask_strides = mem_mask.stride() if mem_mask is not None else (0, 0, 0)
    device_len = win_len is not None
    len_ptr = win_len if device_len else lse  # a dummy pointer without a device length (never read)
    fin = finish_shapes(group, splits, num_heads, block_d, band_width, win_cap, block_w, want_key_mass,
                        ONE_TILE_FINISH, MERGE_ELEMENTS, BAND_TILE_ELEMENTS)
    mass_ptr = key_mass if key_mass is not None else lse
    band_ptr = band if band is not None else lse
    fused = FUSED_FINISH
    pdl = PDL_FINISH and not fused and not INTERPRETED and dependent_launch(device)
    counters = _counters(device, programs + batch) if fused else lse
    finish = {"GROUP": group, "HEAD_DIM": head_dim, "MERGE_D": fin.merge_d, "SPLITS_P": fin.splits_p,
              "SPLIT_CHUNK": fin.chunk, "BLOCK_W": block_w, "BAND_P": fin.band_p, "HEADS_P": fin.heads_p,
              "MASS": want_key_mass, "BAND": band is not None, "BAND_TILE": fin.band_tile}
    # the split pass gets the finishing shapes only when it finishes: otherwise fixed values, so that it is not
    # compiled again for every split count or band width it will not use
    in_split = {**finish, "FIN_GROUP_P": fin.group_p} if fused else {**_NO_FINISH, "GROUP": group, "HEAD_DIM": head_dim}
    launch_fitting(_decode_split_kernel, (splits, programs),
        q, q_mem, mk, mv, mask, win_k, win_v, part_o, part_lse, scores, len_ptr, out, lse, mass_ptr, band_ptr,
        counters, q.stride(0), q.stride(1), q.stride(3), q_mem.stride(0), q_mem.stride(1), q_mem.stride(3),
        *mk.stride(), *mv.stride(), *mask_strides, *win_k.stride(), *win_v.stride(),
        num_kv_heads, mem_len, win_cap, win_cap, mem_tiles, total_tiles, tiles_per_split, splits, qk_scale, cap2,
        fin.num_wblocks, fin.num_merge, programs, band_width if fused else 0, 1.0 / num_heads,
        GROUP_P=group_p, BLOCK_D=block_d, BLOCK_N=block_n, SOFTCAP=softcap is not None,
        HAS_MASK=mem_mask is not None, STORE_SCORES=store_scores, DEVICE_LEN=device_len,
        DOT_PRECISION=dot_precision, FUSED=fused, **in_split, GDC_LAUNCH=pdl, num_warps=num_warps,
        num_stages=num_stages)
    if not fused:
        num_main = programs * fin.num_wblocks
        _decode_finish_kernel[(num_main + (batch if band is not None else 0),)](
            part_o, part_lse, scores, out, lse, mass_ptr, band_ptr, len_ptr,
            num_kv_heads, win_cap, win_cap, splits, fin.num_wblocks, fin.num_merge, num_main, band_width,
            1.0 / num_heads, GROUP_P=fin.group_p, DEVICE_LEN=device_len, **finish, GDC_WAIT=pdl, num_warps=4,
            **({"launch_pdl": True} if pdl else {}))
    return LocalAttention(out=out, lse=lse, key_mass=key_mass, band=band)


def _counters(device: torch.device, size: int) -> torch.Tensor:
    """``FUSED_FINISH``'s arrival counters on ``device``: at least ``size`` int32 zeros, kept between launches (each
    launch leaves them at 0). Grown outside a graph capture where possible (4,096 at first use). One buffer per
    device: one launch at a time per device may use them (launches on one stream run in turn; the engine runs its
    decode attention on one stream)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < size:
        counters = torch.zeros(max(size, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters
