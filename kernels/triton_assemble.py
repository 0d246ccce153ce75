"""A layer's memory part from a device-side slot list, in one Triton launch (no host plan, no read-back).

When spans are selected on the device (captured decode steps; prefill with ``selection_on_device``), the memory
part of one sequence is ``[sink tokens | the selected slots]`` per KV head, each key moved from the position it was
read at to the one the scheme gives it. In torch that is some twenty-five launches per layer (zero-filled buffers,
sink copies, the two-tier gather, the slot positions, the count / cumsum / shift arithmetic, the rotation, copies
into the graph buffers). Here each output row finds its source itself: a sink, or the slot's page through the page
table, in the pool's device tier or (read in place) its pinned host tier; its position; its shift; and writes the
rotated key, the value and the mask bit straight into the destination (the graph buffers, or a fresh part).

Shapes (one sequence):
    slots: ``[Hkv, W]`` int64 pool slots per KV head, valid ones first, -1 past a row's tokens (any strides with
        ``SLOT_GLUE_IN_KERNEL``, e.g. one row expanded over the heads; else made contiguous);
    count: ``[Hkv]`` int64 valid entries per head including the sinks (``num_sinks + (slots >= 0).sum(1)``; with
        ``SLOT_GLUE_IN_KERNEL`` each program finds its head's by a binary search of the row's valid prefix);
    page_table: ``[P]`` int64 page of each of the sequence's slot pages; positions: ``[num_slots]`` int64;
    fast_k / fast_v: ``[F, D]`` pool rows of the device tier (row ``token * Hkv + head``);
    slow_k / slow_v: ``[R, D]`` rows of the host tier (rows ``>= split_row`` of the two counted as one), or None;
    sink_k / sink_v: ``[Hkv, num_sinks, D]`` (any strides with a dense last dim), or None;
    out_k / out_v: ``[Hkv, >= num_sinks + W, D]`` and out_mask ``[Hkv, >= num_sinks + W]`` (bool), written in
        entries ``0 .. num_sinks + W - 1`` (later entries untouched).

Host-tier cache (``cache``: ``(tags [C], cache_k [C, D], cache_v [C, D], epoch [1])`` int64 / rows / int64 on the
GPU): a direct-mapped device copy of host-tier rows that recent launches read. Host row ``r`` (counted from the host
tier's first) may sit at line ``r % C``; ``tags`` holds ``(r + 1) << EPOCH_BITS | e`` for the row it holds (0: none)
and the last launch ``e`` that used the line. Each launch first counts ``epoch`` up by one; then each host row takes
its line with one compare-and-swap of the tag it read: a row that finds itself there (and wins the exchange) is
read from the cache at HBM speed instead of over PCIe; a row that finds another row, not yet used by this launch,
takes the line over, and having read itself from the host anyway, stores its K / V there (no second read). A line
changes hands at most once per launch, and never after a row was read from it in that launch (whoever loses an
exchange reads the host), so what a launch reads from a line is what an earlier launch stored. Output is the same
with or without the cache (exact copies; :meth:`ltri_rag.pool.PagedKVPool.write_layers` drops the lines of host rows
it overwrites). A decode step retrieves mostly what the step before it did (Qwen2.5-0.5B on 16K tokens of essays:
94% of the (token, head) rows), so after the first steps most host rows come from the cache.

Positions: sink ``i`` was read at position ``i``; ``contiguous`` moves valid entry ``i`` of head ``h`` to
``base - count[h] + i`` (``base``: the first position of the local window), ``fixed`` to 0 (the queries move
instead), ``absolute`` leaves keys where they are. Empty entries are zeros with a False mask. Angles as in
:mod:`ltri_rag.kernels.triton_rope` (float64 turns, float32 cosine and sine), on the rotate-half layout's two halves
held as separate tiles (``HALF_TILES``, ``_assemble_halves_kernel``). Reference: :func:`assemble_memory_torch`.
"""

from __future__ import annotations

import torch
from ltri_rag.kernels._triton_support import interpreted, tl, triton, triton_available, turns_per_position

__all__ = ["SCHEMES", "assemble_memory", "assemble_memory_torch", "triton_available"]

SCHEMES = ("contiguous", "fixed", "absolute")
_MAX_HEAD_DIM = 256
BLOCK_ROWS: int | None = None
"""Output rows (entries of one KV head) per program; None: ``min(64, 4096 // padded head_dim)`` (32 at head_dim
128). A power of two; settable for timing runs (``benchmarks.bench_e2e`` modes ``ltri_assemble_r*``)."""
EPOCH_BITS = 23
"""Low bits of a cache tag holding the launch count (the row above them; 40 bits leave room for 2**40 rows)."""
COUNT_HOST_CACHE = False
"""Whether :func:`assemble_memory` adds its host-tier rows read from the cache and in all to the ``stats`` tensor it
is given (two atomic adds per host row, on two addresses: for benchmarks, which time without it;
:attr:`ltri_rag.pool.PagedKVPool.host_cache_stats`)."""
HALF_TILES = True
"""Whether the kernel holds keys as the rotate-half layout's two halves (angles, cosines and sines once per
frequency, no gathered partner columns; ``_assemble_halves_kernel``) instead of one tile with gathered partners
(``_assemble_kernel``; kept for timing runs, ``benchmarks.bench_small_kernels``). The same formula either way."""
INTERPRETED = interpreted()

SLOT_GLUE_IN_KERNEL = True
"""Whether the kernel reads the slot matrix where it lies (an expanded ``[1, W]`` row included, by its strides) and
finds each head's valid-entry count itself, by a binary search of the row's valid prefix (slots are -1 past it),
instead of the launcher copying the slots contiguous and reducing ``(slots >= 0).sum(1) + num_sinks``: five small
launches per layer and decode step (13.7 µs of a Llama-3-8B 8K step's layer in session 25's profile). The same
integers either way, so the same output. On since session 38: an H100's end-to-end A/B (Llama-3-8B shape, 2 rounds,
``benchmarks/results/e2e_llama8b_h100/session38/slot_ab``) had every decode and prefill median at or below the
switch-off run's (the generation loop 12.24 / 12.46 vs 12.57 / 12.62 ms per token at 8K; 13.49 vs 13.81 / 13.86 at
128K); ``benchmarks.e2e`` mode ``ltri_s37_assembly`` runs the switch off."""

if triton is not None:

    @triton.jit
    def _entry_sources(Slots, Table, Positions, head, entry, width, num_sinks, split_row, page_size, num_kv_heads,
                       stride_lh, stride_ln, HAS_SLOW: tl.constexpr):
        """Per output entry ``[R]``: ``(live, is_sink, valid, row, pos, in_fast, in_slow)``; ``row`` the pool row of
        a slot through the page table (both tiers counted as one), ``pos`` the position it was read at."""
        live = entry < num_sinks + width
        is_sink = live & (entry < num_sinks)
        slot = tl.load(Slots + head.to(tl.int64) * stride_lh + (entry - num_sinks).to(tl.int64) * stride_ln,
                       mask=live & ~is_sink, other=-1)
        from_pool = live & ~is_sink & (slot >= 0)
        safe = tl.where(from_pool, slot, 0)
        page = tl.load(Table + safe // page_size, mask=from_pool, other=0)
        row = (page * page_size + safe % page_size) * num_kv_heads + head  # [R] int64
        pos = tl.where(is_sink, entry.to(tl.int64), tl.load(Positions + safe, mask=from_pool, other=0))
        if HAS_SLOW:
            in_fast = from_pool & (row < split_row)
            in_slow = from_pool & (row >= split_row)
        else:
            in_fast = from_pool
            in_slow = from_pool & False
        return live, is_sink, is_sink | from_pool, row, pos, in_fast, in_slow

    @triton.jit
    def _claim_lines(Tags, Epoch, in_slow, srow, spread, cache_rows, EPOCH_BITS: tl.constexpr,
                     EPOCH_MASK: tl.constexpr):
        """Each host row's compare-and-swap on its cache line (module docstring): ``(line, hit, store_line)``.
        ``srow``: the row counted from the host tier's first; ``spread``: a line index for entries without one."""
        cur = tl.load(Epoch) & EPOCH_MASK
        srow = tl.where(in_slow, srow, 0)
        # entries without a host row try no line (an exchange that cannot succeed, spread over lines)
        line = tl.where(in_slow, srow, spread) % cache_rows
        word = tl.load(Tags + line, mask=in_slow, other=0)
        held = (word >> EPOCH_BITS) == srow + 1
        free = (word & EPOCH_MASK) != cur  # no entry of this launch took the line yet
        attempt = in_slow & (held | free)
        old = tl.atomic_cas(Tags + line, tl.where(attempt, word, -1), ((srow + 1) << EPOCH_BITS) | cur)
        won = attempt & (old == word)  # this entry owns the line for the launch
        # a hit reads the line; a row read from the host that takes the line over stores itself there
        return line, won & held, won & ~held

    @triton.jit
    def _valid_prefix(Slots, head, width, stride_lh, stride_ln):
        """Entries of the head's slot row before its first -1 (the row is valid entries, then -1): a binary
        search, about log2(width) scalar loads."""
        lo = 0
        hi = width
        while lo < hi:
            mid = (lo + hi) // 2
            ok = tl.load(Slots + head.to(tl.int64) * stride_lh + mid.to(tl.int64) * stride_ln) >= 0
            lo = tl.where(ok, mid + 1, lo)
            hi = tl.where(ok, hi, mid)
        return lo

    @triton.jit
    def _head_count(Slots, Count, head, width, num_sinks, stride_lh, stride_ln, DERIVE: tl.constexpr,
                    SCHEME: tl.constexpr):
        """The head's valid entries with the sinks: found in the slot row (``DERIVE``) or read from ``Count``; only
        ``contiguous`` (0) needs it (``fixed`` moves every key to 0 whatever the count), so any other scheme reads
        nothing: with the glue on, ``Count`` stands in for a tensor that is never read (the launcher passes the
        slots, which may hold fewer elements than there are heads)."""
        if SCHEME != 0:
            count = 0
        elif DERIVE:
            count = _valid_prefix(Slots, head, width, stride_lh, stride_ln) + num_sinks
        else:
            count = tl.load(Count + head)
        return count

    @triton.jit
    def _shift(count, entry, pos, valid, base, SCHEME: tl.constexpr):
        """Positions each entry's key moves by: ``contiguous`` (0) puts valid entry ``i`` of the head (``count``
        valid entries with the sinks) at ``base - count + i``, ``fixed`` (1) every key at 0."""
        if SCHEME == 0:
            shift = tl.where(valid, base - count + entry - pos, 0)
        else:
            shift = tl.where(valid, -pos, 0)
        return shift

    @triton.jit(do_not_specialize=("width", "num_sinks", "split_row", "base"))
    def _assemble_kernel(Slots, Count, Table, Positions, FastK, FastV, SlowK, SlowV, SinkK, SinkV, Freq,
                         OutK, OutV, OutMask, Tags, CacheK, CacheV, Epoch, Stats,
                         width, num_sinks, split_row, base, page_size, num_kv_heads, cache_rows,
                         stride_lh, stride_ln, stride_sh, stride_sn, stride_oh, stride_on, stride_mh,
                         HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                         SCHEME: tl.constexpr, HAS_SLOW: tl.constexpr, HAS_SINKS: tl.constexpr,
                         HAS_CACHE: tl.constexpr, COUNT: tl.constexpr, EPOCH_BITS: tl.constexpr,
                         EPOCH_MASK: tl.constexpr, DERIVE: tl.constexpr):
        head = tl.program_id(0)
        entry = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
        live, is_sink, valid, row, pos, in_fast, in_slow = _entry_sources(
            Slots, Table, Positions, head, entry, width, num_sinks, split_row, page_size, num_kv_heads, stride_lh,
            stride_ln, HAS_SLOW)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < HEAD_DIM
        fast_off = tl.where(in_fast, row, 0)[:, None] * HEAD_DIM
        sink_off = head.to(tl.int64) * stride_sh + tl.where(is_sink, entry, 0).to(tl.int64)[:, None] * stride_sn
        if HAS_SLOW:
            slow_off = tl.where(in_slow, row - split_row, 0)[:, None] * HEAD_DIM
        if SCHEME != 2:
            in_rot = cols < 2 * HALF
            partner = tl.where(cols < HALF, cols + HALF, tl.where(in_rot, cols - HALF, cols))
            sign = tl.where(cols < HALF, -1.0, 1.0)
        # each source row is read once (over PCIe for host-tier rows): the rotation's partner columns are taken
        # from the loaded tile, not loaded again
        k = tl.load(FastK + fast_off + cols[None, :], mask=in_fast[:, None] & col_ok[None, :], other=0.0)
        k = k.to(tl.float32)
        v = tl.load(FastV + fast_off + cols[None, :], mask=in_fast[:, None] & col_ok[None, :], other=0.0)
        if HAS_SINKS:
            sink_mask = is_sink[:, None] & col_ok[None, :]
            k += tl.load(SinkK + sink_off + cols[None, :], mask=sink_mask, other=0.0).to(tl.float32)
            v += tl.load(SinkV + sink_off + cols[None, :], mask=sink_mask, other=0.0)
        if HAS_SLOW:
            from_host = in_slow
            if HAS_CACHE:  # host rows held by the device cache are read there (module docstring)
                line, hit, store_line = _claim_lines(Tags, Epoch, in_slow, row - split_row, head * width + entry,
                                                     cache_rows, EPOCH_BITS, EPOCH_MASK)
                from_host = in_slow & ~hit
                hit_mask = hit[:, None] & col_ok[None, :]
                k += tl.load(CacheK + line[:, None] * HEAD_DIM + cols[None, :], mask=hit_mask, other=0.0).to(
                    tl.float32)
                v += tl.load(CacheV + line[:, None] * HEAD_DIM + cols[None, :], mask=hit_mask, other=0.0)
                if COUNT:  # one atomic add per host row (no tl.sum: a jit'd helper the interpreter may not patch)
                    tl.atomic_add(Stats + entry * 0, hit.to(tl.int64), mask=in_slow)
                    tl.atomic_add(Stats + 1 + entry * 0, in_slow.to(tl.int64), mask=in_slow)
            slow_mask = from_host[:, None] & col_ok[None, :]
            k += tl.load(SlowK + slow_off + cols[None, :], mask=slow_mask, other=0.0).to(tl.float32)
            v += tl.load(SlowV + slow_off + cols[None, :], mask=slow_mask, other=0.0)
            if HAS_CACHE:  # the row as stored (before any rotation) into the line it took over
                put = store_line[:, None] & col_ok[None, :]
                tl.store(CacheK + line[:, None] * HEAD_DIM + cols[None, :], k.to(CacheK.dtype.element_ty), mask=put)
                tl.store(CacheV + line[:, None] * HEAD_DIM + cols[None, :], v.to(CacheV.dtype.element_ty), mask=put)
        if SCHEME != 2:
            kp = tl.gather(k, tl.broadcast_to(partner[None, :], (BLOCK_R, BLOCK_D)), axis=1)
            count = _head_count(Slots, Count, head, width, num_sinks, stride_lh, stride_ln, DERIVE, SCHEME)
            shift = _shift(count, entry, pos, valid, base, SCHEME)
            freq = tl.load(Freq + (cols % HALF), mask=in_rot, other=0.0)  # [C] float64, turns per position
            turns = shift.to(tl.float64)[:, None] * freq[None, :]
            angle = (turns - tl.floor(turns + 0.5)).to(tl.float32) * 6.283185307179586
            cos = tl.where(in_rot[None, :], tl.cos(angle), 1.0)
            sin = tl.where(in_rot[None, :], tl.sin(angle), 0.0)
            k = k * cos + sign[None, :] * (kp * sin)
        out = head.to(tl.int64) * stride_oh + entry.to(tl.int64)[:, None] * stride_on + cols[None, :]
        store = live[:, None] & col_ok[None, :]
        tl.store(OutK + out, k.to(OutK.dtype.element_ty), mask=store)
        tl.store(OutV + out, v.to(OutV.dtype.element_ty), mask=store)
        tl.store(OutMask + head.to(tl.int64) * stride_mh + entry, valid.to(tl.int8), mask=live)


    @triton.jit
    def _load_halves(K, V, rows, m, ch, cols, h_ok, past, col_ok, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
        """Rows ``rows [R, 1]`` (element offsets) of ``K`` / ``V`` where ``m [R, 1]``, else 0: the key's rotate-half
        tiles ``a``, ``b`` (float32), its columns past them ``r`` (float32; ``a`` again for a full rotary head,
        never used then) and the value row ``v``."""
        a = tl.load(K + rows + ch[None, :], mask=m & h_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(K + rows + HALF + ch[None, :], mask=m & h_ok[None, :], other=0.0).to(tl.float32)
        r = a
        if 2 * HALF < HEAD_DIM:
            r = tl.load(K + rows + cols[None, :], mask=m & past[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + rows + cols[None, :], mask=m & col_ok[None, :], other=0.0)
        return a, b, r, v

    @triton.jit
    def _add_halves(a, b, r, v, K, V, rows, m, ch, cols, h_ok, past, col_ok, HALF: tl.constexpr,
                    HEAD_DIM: tl.constexpr):
        """``(a, b, r, v)`` plus the rows :func:`_load_halves` reads (each row comes from exactly one source, the
        others add 0)."""
        a2, b2, r2, v2 = _load_halves(K, V, rows, m, ch, cols, h_ok, past, col_ok, HALF, HEAD_DIM)
        if 2 * HALF < HEAD_DIM:
            r = r + r2
        return a + a2, b + b2, r, v + v2

    @triton.jit
    def _store_halves(K, V, rows, m, a, b, r, v, ch, cols, h_ok, past, col_ok, HALF: tl.constexpr,
                      HEAD_DIM: tl.constexpr):
        """Store ``(a, b, r, v)`` as rows ``rows [R, 1]`` of ``K`` / ``V`` where ``m [R, 1]`` (in their dtypes)."""
        ty = K.dtype.element_ty
        tl.store(K + rows + ch[None, :], a.to(ty), mask=m & h_ok[None, :])
        tl.store(K + rows + HALF + ch[None, :], b.to(ty), mask=m & h_ok[None, :])
        if 2 * HALF < HEAD_DIM:
            tl.store(K + rows + cols[None, :], r.to(ty), mask=m & past[None, :])
        tl.store(V + rows + cols[None, :], v.to(V.dtype.element_ty), mask=m & col_ok[None, :])

    @triton.jit(do_not_specialize=("width", "num_sinks", "split_row", "base"))
    def _assemble_halves_kernel(Slots, Count, Table, Positions, FastK, FastV, SlowK, SlowV, SinkK, SinkV, Freq,
                                OutK, OutV, OutMask, Tags, CacheK, CacheV, Epoch, Stats,
                                width, num_sinks, split_row, base, page_size, num_kv_heads, cache_rows,
                                stride_lh, stride_ln, stride_sh, stride_sn, stride_oh, stride_on, stride_mh,
                                HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, SCHEME: tl.constexpr,
                                HAS_SLOW: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_CACHE: tl.constexpr,
                                COUNT: tl.constexpr, EPOCH_BITS: tl.constexpr, EPOCH_MASK: tl.constexpr,
                                DERIVE: tl.constexpr):
        # _assemble_kernel with the keys held as the rotate-half layout's two halves, ``a`` (columns
        # 0 .. HALF - 1) and ``b`` (HALF .. 2 HALF - 1), plus the columns past them: angles, cosines and sines are
        # computed once per frequency and no partner column is gathered
        head = tl.program_id(0)
        entry = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [R]
        live, is_sink, valid, row, pos, in_fast, in_slow = _entry_sources(
            Slots, Table, Positions, head, entry, width, num_sinks, split_row, page_size, num_kv_heads, stride_lh,
            stride_ln, HAS_SLOW)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < HEAD_DIM
        ch = tl.arange(0, BLOCK_H)
        h_ok = ch < HALF
        past = (cols >= 2 * HALF) & col_ok  # columns past the rotary pairs (none for a full rotary head)
        fast_row = tl.where(in_fast, row, 0)[:, None] * HEAD_DIM
        sink_row = head.to(tl.int64) * stride_sh + tl.where(is_sink, entry, 0).to(tl.int64)[:, None] * stride_sn
        a, b, r, v = _load_halves(FastK, FastV, fast_row, in_fast[:, None], ch, cols, h_ok, past, col_ok, HALF,
                                  HEAD_DIM)
        if HAS_SINKS:
            a, b, r, v = _add_halves(a, b, r, v, SinkK, SinkV, sink_row, is_sink[:, None], ch, cols, h_ok, past,
                                     col_ok, HALF, HEAD_DIM)
        if HAS_SLOW:
            from_host = in_slow
            if HAS_CACHE:  # host rows held by the device cache are read there (module docstring)
                line, hit, store_line = _claim_lines(Tags, Epoch, in_slow, row - split_row, head * width + entry,
                                                     cache_rows, EPOCH_BITS, EPOCH_MASK)
                from_host = in_slow & ~hit
                line_row = line[:, None] * HEAD_DIM
                a, b, r, v = _add_halves(a, b, r, v, CacheK, CacheV, line_row, hit[:, None], ch, cols, h_ok, past,
                                         col_ok, HALF, HEAD_DIM)
                if COUNT:  # one atomic add per host row (no tl.sum: a jit'd helper the interpreter may not patch)
                    tl.atomic_add(Stats + entry * 0, hit.to(tl.int64), mask=in_slow)
                    tl.atomic_add(Stats + 1 + entry * 0, in_slow.to(tl.int64), mask=in_slow)
            slow_row = tl.where(from_host, row - split_row, 0)[:, None] * HEAD_DIM
            a, b, r, v = _add_halves(a, b, r, v, SlowK, SlowV, slow_row, from_host[:, None], ch, cols, h_ok, past,
                                     col_ok, HALF, HEAD_DIM)
            if HAS_CACHE:  # the row as stored (before any rotation) into the line it took over
                _store_halves(CacheK, CacheV, line_row, store_line[:, None], a, b, r, v, ch, cols, h_ok, past, col_ok,
                              HALF, HEAD_DIM)
        if SCHEME != 2:
            count = _head_count(Slots, Count, head, width, num_sinks, stride_lh, stride_ln, DERIVE, SCHEME)
            shift = _shift(count, entry, pos, valid, base, SCHEME)
            freq = tl.load(Freq + ch, mask=h_ok, other=0.0)  # [H] float64, turns per position
            turns = shift.to(tl.float64)[:, None] * freq[None, :]
            angle = (turns - tl.floor(turns + 0.5)).to(tl.float32) * 6.283185307179586
            cos = tl.cos(angle)
            sin = tl.sin(angle)
            a, b = a * cos - b * sin, b * cos + a * sin
        out = head.to(tl.int64) * stride_oh + entry.to(tl.int64)[:, None] * stride_on
        _store_halves(OutK, OutV, out, live[:, None], a, b, r, v, ch, cols, h_ok, past, col_ok, HALF, HEAD_DIM)
        tl.store(OutMask + head.to(tl.int64) * stride_mh + entry, valid.to(tl.int8), mask=live)


def _rotate_rows(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` (float32) rotated by ``shift [...]`` positions, rotate-half layout, float64 angles."""
    half = inv_freq.numel()
    if half == 0:
        return x
    angle = shift.to(torch.float64)[..., None] * inv_freq.to(x.device, torch.float64)  # [..., half]
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    a, b, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def assemble_memory_torch(slots: torch.Tensor, page_table: torch.Tensor, page_size: int, positions: torch.Tensor,
                          fast_k: torch.Tensor, fast_v: torch.Tensor, slow_k: torch.Tensor | None,
                          slow_v: torch.Tensor | None, split_row: int, sink_k: torch.Tensor | None,
                          sink_v: torch.Tensor | None, base: int, inv_freq: torch.Tensor,
                          scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of :func:`assemble_memory` (module docstring): ``(k, v, mask)`` as ``[Hkv, num_sinks + W, D]``
    (the tiers' dtype) and ``[Hkv, num_sinks + W]`` bool, on ``slots``' device, in float32 arithmetic."""
    num_kv_heads, width = slots.shape
    num_sinks = 0 if sink_k is None else sink_k.shape[1]
    device = slots.device
    valid_slot = slots >= 0
    safe = slots.clamp(min=0)
    rows = (page_table[safe // page_size] * page_size + safe % page_size) * num_kv_heads \
        + torch.arange(num_kv_heads, device=device)[:, None]
    both_k = fast_k if slow_k is None else torch.cat([fast_k[:split_row], slow_k.to(device)])
    both_v = fast_v if slow_v is None else torch.cat([fast_v[:split_row], slow_v.to(device)])
    k = torch.where(valid_slot[..., None], both_k[rows].float(), 0.0)
    v = torch.where(valid_slot[..., None], both_v[rows], torch.zeros((), dtype=both_v.dtype, device=device))
    pos = torch.where(valid_slot, positions[safe], 0)
    mask = valid_slot
    if num_sinks:
        k = torch.cat([sink_k.float(), k], dim=1)
        v = torch.cat([sink_v.to(v.dtype), v], dim=1)
        pos = torch.cat([torch.arange(num_sinks, device=device).expand(num_kv_heads, -1), pos], dim=1)
        mask = torch.cat([torch.ones(num_kv_heads, num_sinks, dtype=torch.bool, device=device), mask], dim=1)
    if scheme != "absolute":
        entry = torch.arange(num_sinks + width, device=device)[None, :]
        if scheme == "contiguous":
            shift = base - mask.sum(dim=1, keepdim=True) + entry - pos
        else:
            shift = -pos
        k = _rotate_rows(k, torch.where(mask, shift, 0), inv_freq)
    return k.to(fast_k.dtype), v, mask


def assemble_memory(slots: torch.Tensor, page_table: torch.Tensor, page_size: int, positions: torch.Tensor,
                    fast_k: torch.Tensor, fast_v: torch.Tensor, slow_k: torch.Tensor | None,
                    slow_v: torch.Tensor | None, split_row: int, sink_k: torch.Tensor | None,
                    sink_v: torch.Tensor | None, base: int, inv_freq: torch.Tensor, scheme: str,
                    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    count: torch.Tensor | None = None,
                    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence's memory part in one launch (module docstring); returns ``(k, v, mask)``, the first
    ``num_sinks + W`` entries of ``out`` when given (the graph buffers ``[Hkv, cap, D]`` twice and ``[Hkv, cap]``).

    Args:
        slots: ``[Hkv, W]`` int64 slots, -1 past each row's valid prefix.
        page_table, page_size, positions: The pool's page table and slot positions of the sequence (device).
        fast_k, fast_v: ``[F, D]`` device-tier rows; slow_k / slow_v: ``[R, D]`` host-tier rows or None;
        split_row: First row of the host tier in the two tiers counted as one.
        sink_k, sink_v: ``[Hkv, num_sinks, D]`` or None.
        base: The local window's first position (``contiguous``).
        inv_freq: ``[rot_dim / 2]`` rotary inverse frequencies.
        scheme: ``contiguous``, ``fixed`` or ``absolute``.
        out: Destination tensors, or None for fresh ones.
        count: ``[Hkv]`` valid entries per head with the sinks, if the caller has it (else one reduction, or with
            ``SLOT_GLUE_IN_KERNEL`` a binary search in the kernel).
        cache: ``(tags [C] int64, cache_k [C, D], cache_v [C, D], epoch [1] int64)``, the device cache of host-tier
            rows (module docstring; tags 0 and any epoch to start), or None; used only with a host tier (updated in
            place: rows read from the host may take lines over).
        stats: ``[2]`` int64 on the device, with ``COUNT_HOST_CACHE``: host-tier rows found in the cache and in
            all are added to it.

    Raises:
        RuntimeError: triton is not installed.
        ValueError: an unknown scheme, tensors on other devices, or CPU tensors without the interpreter.
    """
    if triton is None:
        raise RuntimeError("triton is not installed: use assemble_memory_torch")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    device = slots.device
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the kernel needs CUDA tensors (got {device}), or TRITON_INTERPRET=1 set before "
                         "ltri_rag.kernels.triton_assemble is imported")
    num_kv_heads, width = slots.shape
    head_dim = fast_k.shape[1]
    if head_dim > _MAX_HEAD_DIM or 2 * inv_freq.numel() > head_dim:
        raise ValueError(f"head_dim {head_dim} with rotary dim {2 * inv_freq.numel()} is not supported")
    for name, t in (("page_table", page_table), ("positions", positions), ("fast_k", fast_k)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, slots on {device}")
    num_sinks = 0 if sink_k is None else sink_k.shape[1]
    total = num_sinks + width
    dtype = fast_k.dtype
    if out is None:
        out = (torch.empty(num_kv_heads, total, head_dim, dtype=dtype, device=device),
               torch.empty(num_kv_heads, total, head_dim, dtype=dtype, device=device),
               torch.empty(num_kv_heads, total, dtype=torch.bool, device=device))
    out_k, out_v, out_mask = out
    if out_k.shape[1] < total or out_mask.shape[1] < total or out_k.stride(2) != 1:
        raise ValueError(f"out holds {out_k.shape[1]} entries per head, {total} needed")
    if total == 0:
        return out_k[:, :0], out_v[:, :0], out_mask[:, :0]
    if INTERPRETED and dtype == torch.bfloat16:  # the interpreter truncates float32 -> bfloat16: round in torch
        tmp = (torch.empty(num_kv_heads, total, head_dim, dtype=torch.float32, device=device),
               torch.empty(num_kv_heads, total, head_dim, dtype=torch.float32, device=device), out_mask)
        k, v, mask = assemble_memory(slots, page_table, page_size, positions, fast_k.float(), fast_v.float(),
                                     None if slow_k is None else slow_k.float(),
                                     None if slow_v is None else slow_v.float(), split_row,
                                     None if sink_k is None else sink_k.float(),
                                     None if sink_v is None else sink_v.float(), base, inv_freq, scheme, tmp, count,
                                     cache, stats)  # the cache as it is: its rows are stored, not rounded
        out_k[:, :total].copy_(k)
        out_v[:, :total].copy_(v)
        return out_k[:, :total], out_v[:, :total], mask
    derive = SLOT_GLUE_IN_KERNEL and count is None
    if not derive:
        slots = slots.contiguous()
        if count is None:
            count = (slots >= 0).sum(dim=1) + num_sinks
    else:
        count = slots  # a stand-in pointer (int64), never read: each program finds its head's count
    has_slow = slow_k is not None and slow_k.shape[0] > 0
    has_cache = has_slow and cache is not None
    if has_cache:
        _check_cache(cache, head_dim, device)
    tags, cache_k, cache_v, epoch = cache if has_cache else (count, out_k, out_v, count)
    if has_cache:
        epoch.add_(1)  # this launch's number (a device op: a replayed graph counts on)
    count_hits = has_cache and COUNT_HOST_CACHE and stats is not None
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_r = BLOCK_ROWS if BLOCK_ROWS is not None else max(1, min(64, 4096 // block_d))
    rotate = scheme != "absolute" and inv_freq.numel() > 0
    freq = turns_per_position(inv_freq, device) if rotate else count
    sink_k_, sink_v_ = (sink_k, sink_v) if sink_k is not None else (out_k, out_v)
    args = (slots, count, page_table, positions, fast_k, fast_v,
            slow_k if has_slow else fast_k, slow_v if has_slow else fast_v, sink_k_, sink_v_, freq,
            out_k, out_v, out_mask.view(torch.int8), tags, cache_k, cache_v, epoch, stats if count_hits else count,
            width, num_sinks, int(split_row), int(base), page_size, num_kv_heads, tags.shape[0] if has_cache else 1,
            slots.stride(0), slots.stride(1), sink_k_.stride(0), sink_k_.stride(1), out_k.stride(0), out_k.stride(1),
            out_mask.stride(0))
    flags = dict(HEAD_DIM=head_dim, HALF=max(inv_freq.numel(), 1), BLOCK_D=block_d, BLOCK_R=block_r,
                 SCHEME=SCHEMES.index(scheme) if rotate else 2, HAS_SLOW=has_slow, HAS_SINKS=sink_k is not None,
                 HAS_CACHE=has_cache, COUNT=count_hits, EPOCH_BITS=EPOCH_BITS, EPOCH_MASK=(1 << EPOCH_BITS) - 1,
                 DERIVE=derive and scheme == "contiguous")
    grid = (num_kv_heads, triton.cdiv(total, block_r))
    if HALF_TILES:
        _assemble_halves_kernel[grid](*args, BLOCK_H=max(16, triton.next_power_of_2(flags["HALF"])), **flags)
    else:
        _assemble_kernel[grid](*args, **flags)
    return out_k[:, :total], out_v[:, :total], out_mask[:, :total]


def _check_cache(cache: tuple[torch.Tensor, ...], head_dim: int, device: torch.device) -> None:
    """Raise ValueError unless ``cache`` is ``(tags [C] int64, cache_k [C, D], cache_v [C, D], epoch [1] int64)`` on
    ``device``."""
    if len(cache) != 4:
        raise ValueError(f"cache must be (tags, cache_k, cache_v, epoch), got {len(cache)} tensors")
    tags, cache_k, cache_v, epoch = cache
    if tags.dtype != torch.int64 or tags.dim() != 1 or tags.numel() == 0 or not tags.is_contiguous():
        raise ValueError(f"cache tags must be a non-empty [C] int64 tensor, got {tuple(tags.shape)} {tags.dtype}")
    if epoch.dtype != torch.int64 or epoch.numel() != 1:
        raise ValueError(f"cache epoch must be a [1] int64 tensor, got {tuple(epoch.shape)} {epoch.dtype}")
    for name, t in (("tags", tags), ("cache_k", cache_k), ("cache_v", cache_v), ("epoch", epoch)):
        if t.device != device:
            raise ValueError(f"cache {name} is on {t.device}, slots on {device}")
    if cache_k.shape != (tags.numel(), head_dim) or cache_v.shape != cache_k.shape or not cache_k.is_contiguous() \
            or not cache_v.is_contiguous():
        raise ValueError(f"cache rows must be contiguous [{tags.numel()}, {head_dim}], got {tuple(cache_k.shape)} / "
                         f"{tuple(cache_v.shape)}")
