"""The finishing work of the fused decode attention (:mod:`ltri_rag.kernels.triton_decode`): the partial outputs of
a KV head's splits merged, the window's key mass and the band, from the partial LSEs and the window scores the split
pass stored.

Two forms share these jit helpers: a launch of its own after the split pass (:func:`_decode_finish_kernel`), or, with
``triton_decode.FUSED_FINISH``, the tail of the split pass (:func:`_fused_finish`: the last split program of a KV
head to arrive runs that head's finishing programs, the last KV head of a sequence its band). Shapes and launch
sizes are in :mod:`ltri_rag.kernels.triton_decode` (module docstring) and
:func:`ltri_rag.kernels.decode_shapes.finish_shapes`.

``TRITON_INTERPRET`` is read when this module is imported; :mod:`~ltri_rag.kernels.triton_decode` rebuilds it when
the two were built for different modes (a test process switching to the interpreter).
"""

from __future__ import annotations

from ltri_rag.kernels._triton_support import interpreted, tl, triton

__all__ = ["INTERPRETED"]

# whether the kernels below were built for the Triton interpreter (it is decided when they are decorated)
INTERPRETED = interpreted()


if triton is not None:
    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def _maximum(a, b):
        return tl.maximum(a, b)

    _sum_combine = getattr(tl.standard, "_sum_combine", _add)
    _max_combine = getattr(tl.standard, "_elementwise_max", _maximum)

    @triton.jit
    def _total_lse2(PartLse, pid_bh, num_splits, g, row_ok, GROUP: tl.constexpr, SPLITS_P: tl.constexpr):
        """``[G_P]`` base-2 LSE over every split of the rows of KV head ``pid_bh``.

        A real row always sees its window (``W >= 1``), so only padded rows have no key: they get 0, not ``-inf``,
        so that ``score - total`` stays NaN-free in the (masked) padded rows.
        """
        s = tl.arange(0, SPLITS_P)
        ok = row_ok[:, None] & (s[None, :] < num_splits)
        x = tl.load(PartLse + (pid_bh * num_splits + s[None, :]).to(tl.int64) * GROUP + g[:, None], mask=ok,
                    other=float("-inf"))  # [G_P, SPLITS_P]
        return _combine_lse2(x)

    @triton.jit
    def _combine_lse2(x):
        """``[rows]`` base-2 LSE of the rows of ``x [rows, SPLITS_P]`` (partial LSEs, -inf where absent); 0 for a row
        with none (see :func:`_total_lse2`)."""
        mx = tl.reduce(x, 1, _max_combine)
        safe = tl.where(mx == float("-inf"), 0.0, mx)
        total = tl.reduce(tl.exp2(x - safe[:, None]), 1, _sum_combine)
        return tl.where(total > 0.0, safe + tl.log2(tl.where(total > 0.0, total, 1.0)), 0.0)

    @triton.jit
    def _finish_main(PartO, PartLse, Scores, Out, Lse, Mass, pid, num_kv_heads, win_len, win_cap, num_splits,
                     num_wblocks, num_merge,
                     GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, MERGE_D: tl.constexpr,
                     SPLITS_P: tl.constexpr, SPLIT_CHUNK: tl.constexpr, BLOCK_W: tl.constexpr, MASS: tl.constexpr):
        """Program ``(b, kvh, wblock)``: total LSE; blocks ``wblock < num_merge`` merge columns
        ``[wblock * MERGE_D, (wblock + 1) * MERGE_D)`` of ``out`` (block 0 also writes ``lse``); key mass of its
        window keys (rows of ``win_cap``; 0 past ``win_len``)."""
        g = tl.arange(0, GROUP_P)
        row_ok = g < GROUP
        pid_bh = pid // num_wblocks
        wb = pid % num_wblocks
        b = (pid_bh // num_kv_heads).to(tl.int64)
        kvh = (pid_bh % num_kv_heads).to(tl.int64)
        head_row = b * (num_kv_heads * GROUP) + kvh * GROUP + g  # int64 rows of [B, H]
        total2 = _total_lse2(PartLse, pid_bh, num_splits, g, row_ok, GROUP, SPLITS_P)
        if wb < num_merge:  # merge this program's columns of the partial outputs, SPLIT_CHUNK splits at a time
            d = wb * MERGE_D + tl.arange(0, MERGE_D)
            d_ok = d < HEAD_DIM
            c = tl.arange(0, SPLIT_CHUNK)
            acc = tl.full([GROUP_P, MERGE_D], 0.0, dtype=tl.float32)
            for s0 in range(0, num_splits, SPLIT_CHUNK):
                split = s0 + c
                ok = row_ok[:, None] & (split[None, :] < num_splits)  # [G_P, C]
                part_row = (pid_bh * num_splits + split[None, :]).to(tl.int64) * GROUP + g[:, None]
                lse_s = tl.load(PartLse + part_row, mask=ok, other=float("-inf"))
                w = tl.where(ok, tl.exp2(lse_s - total2[:, None]), 0.0)
                o = tl.load(PartO + part_row[:, :, None] * HEAD_DIM + d[None, None, :],
                            mask=ok[:, :, None] & d_ok[None, None, :], other=0.0)  # [G_P, C, D]
                acc += tl.reduce(o * w[:, :, None], 1, _sum_combine)
            tl.store(Out + head_row[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
            tl.store(Lse + head_row, total2 * 0.6931471805599453, mask=row_ok & ((g * 0 + wb) == 0))
        if MASS:
            n = wb * BLOCK_W + tl.arange(0, BLOCK_W)
            n_ok = n < win_len
            ok = row_ok[:, None] & n_ok[None, :]
            s = tl.load(Scores + head_row[:, None] * win_cap + n[None, :], mask=ok, other=float("-inf"))
            p = tl.where(ok, tl.exp2(s - total2[:, None]), 0.0)
            tl.store(Mass + pid_bh.to(tl.int64) * win_cap + n, tl.reduce(p, 0, _sum_combine), mask=n < win_cap)

    @triton.jit
    def _finish_band(PartLse, Scores, Band, b, num_kv_heads, win_len, win_cap, num_splits, band_width, inv_heads,
                     GROUP: tl.constexpr, GROUP_P: tl.constexpr, SPLITS_P: tl.constexpr, BAND_P: tl.constexpr):
        """Band program of sequence ``b``: head mean over every KV head's group of the probabilities of keys
        ``W - 1 - o``."""
        g = tl.arange(0, GROUP_P)
        row_ok = g < GROUP
        o = tl.arange(0, BAND_P)
        col = win_len - 1 - o
        ok = row_ok[:, None] & ((o < band_width) & (col >= 0))[None, :]
        band = tl.full([BAND_P], 0.0, dtype=tl.float32)
        for kvh in range(num_kv_heads):
            pid_bh = b * num_kv_heads + kvh
            total2 = _total_lse2(PartLse, pid_bh, num_splits, g, row_ok, GROUP, SPLITS_P)
            head_row = pid_bh * GROUP + g  # = b * H + kvh * G + g
            s = tl.load(Scores + head_row[:, None] * win_cap + col[None, :], mask=ok, other=float("-inf"))
            band += tl.reduce(tl.where(ok, tl.exp2(s - total2[:, None]), 0.0), 0, _sum_combine)
        tl.store(Band + b * band_width + o, band * inv_heads, mask=o < band_width)

    @triton.jit
    def _finish_band_tile(PartLse, Scores, Band, b, num_kv_heads, win_len, win_cap, num_splits, band_width,
                          inv_heads, GROUP: tl.constexpr, HEADS_P: tl.constexpr, SPLITS_P: tl.constexpr,
                          BAND_P: tl.constexpr):
        """Band program of sequence ``b`` with every head of the sequence in one ``[H_P, ...]`` tile: the heads'
        total LSEs (``[H_P, SPLITS_P]`` partial LSEs) and the band's scores (``[H_P, BAND_P]``) are two loads
        issued together, with no loop over the KV heads (``ONE_TILE_FINISH``)."""
        r = tl.arange(0, HEADS_P)  # head index within the sequence, kvh * G + g
        r_ok = r < num_kv_heads * GROUP
        kvh = r // GROUP
        g = r % GROUP
        s = tl.arange(0, SPLITS_P)
        ok_s = r_ok[:, None] & (s[None, :] < num_splits)
        x = tl.load(PartLse + ((b * num_kv_heads + kvh[:, None]) * num_splits + s[None, :]).to(tl.int64) * GROUP
                    + g[:, None], mask=ok_s, other=float("-inf"))  # [H_P, SPLITS_P]
        total2 = _combine_lse2(x)
        o = tl.arange(0, BAND_P)
        col = win_len - 1 - o
        ok = r_ok[:, None] & ((o < band_width) & (col >= 0))[None, :]
        head_row = b * (num_kv_heads * GROUP) + r  # int64 rows of [B, H]
        sc = tl.load(Scores + head_row[:, None] * win_cap + col[None, :], mask=ok, other=float("-inf"))
        band = tl.reduce(tl.where(ok, tl.exp2(sc - total2[:, None]), 0.0), 0, _sum_combine)
        tl.store(Band + b * band_width + o, band * inv_heads, mask=o < band_width)

    @triton.jit
    def _fused_finish(PartO, PartLse, Scores, Out, Lse, Mass, Band, Counters, pid_bh, b, num_kv_heads, win_len,
                      win_cap, num_splits, num_wblocks, num_merge, num_programs, band_width, inv_heads,
                      GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, MERGE_D: tl.constexpr,
                      SPLITS_P: tl.constexpr, SPLIT_CHUNK: tl.constexpr, BLOCK_W: tl.constexpr,
                      BAND_P: tl.constexpr, HEADS_P: tl.constexpr, MASS: tl.constexpr, BAND: tl.constexpr,
                      BAND_TILE: tl.constexpr):
        """``FUSED_FINISH``: the last split program of KV head ``pid_bh`` to arrive runs that head's finishing
        programs one after another; the last KV head of sequence ``b`` to finish runs its band program."""
        tl.debug_barrier()  # every thread's partial stores are issued before the arrival is counted (release)
        arrived = tl.atomic_add(Counters + pid_bh, 1, sem="acq_rel")
        if arrived == num_splits - 1:  # every split of this head has written its partials (acquire)
            tl.atomic_xchg(Counters + pid_bh, 0, sem="relaxed")  # 0 again for the next launch (graph replays)
            for wb in range(0, num_wblocks):
                _finish_main(PartO, PartLse, Scores, Out, Lse, Mass, pid_bh * num_wblocks + wb, num_kv_heads,
                             win_len, win_cap, num_splits, num_wblocks, num_merge, GROUP, GROUP_P, HEAD_DIM, MERGE_D,
                             SPLITS_P, SPLIT_CHUNK, BLOCK_W, MASS)
            if BAND:
                tl.debug_barrier()
                heads_done = tl.atomic_add(Counters + num_programs + b, 1, sem="acq_rel")
                if heads_done == num_kv_heads - 1:  # every head of the sequence is merged: its band
                    tl.atomic_xchg(Counters + num_programs + b, 0, sem="relaxed")
                    if BAND_TILE:
                        _finish_band_tile(PartLse, Scores, Band, b, num_kv_heads, win_len, win_cap, num_splits,
                                          band_width, inv_heads, GROUP, HEADS_P, SPLITS_P, BAND_P)
                    else:
                        _finish_band(PartLse, Scores, Band, b, num_kv_heads, win_len, win_cap, num_splits,
                                     band_width, inv_heads, GROUP, GROUP_P, SPLITS_P, BAND_P)

    @triton.jit(do_not_specialize=("win_len", "win_cap", "num_splits", "num_wblocks", "num_main", "num_merge"))
    def _decode_finish_kernel(
            PartO, PartLse, Scores, Out, Lse, Mass, Band, WinLen,
            num_kv_heads, win_len, win_cap, num_splits, num_wblocks, num_merge, num_main, band_width, inv_heads,
            GROUP: tl.constexpr, GROUP_P: tl.constexpr, HEAD_DIM: tl.constexpr, MERGE_D: tl.constexpr,
            SPLITS_P: tl.constexpr, SPLIT_CHUNK: tl.constexpr, BLOCK_W: tl.constexpr, BAND_P: tl.constexpr,
            HEADS_P: tl.constexpr, MASS: tl.constexpr, BAND: tl.constexpr, BAND_TILE: tl.constexpr,
            DEVICE_LEN: tl.constexpr, GDC_WAIT: tl.constexpr):
        if GDC_WAIT:  # a programmatic dependent launch (PDL_FINISH): the split pass's writes visible first
            tl.extra.cuda.gdc_wait()
        pid = tl.program_id(0)
        if DEVICE_LEN:
            win_len = tl.minimum(tl.maximum(tl.load(WinLen).to(tl.int32), 1), win_cap)
        if pid < num_main:
            _finish_main(PartO, PartLse, Scores, Out, Lse, Mass, pid, num_kv_heads, win_len, win_cap, num_splits,
                         num_wblocks, num_merge, GROUP, GROUP_P, HEAD_DIM, MERGE_D, SPLITS_P, SPLIT_CHUNK, BLOCK_W,
                         MASS)
        elif BAND:
            if BAND_TILE:
                _finish_band_tile(PartLse, Scores, Band, (pid - num_main).to(tl.int64), num_kv_heads, win_len,
                                  win_cap, num_splits, band_width, inv_heads, GROUP, HEADS_P, SPLITS_P, BAND_P)
            else:
                _finish_band(PartLse, Scores, Band, (pid - num_main).to(tl.int64), num_kv_heads, win_len, win_cap,
                             num_splits, band_width, inv_heads, GROUP, GROUP_P, SPLITS_P, BAND_P)
