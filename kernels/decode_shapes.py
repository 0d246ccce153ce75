"""Launch shapes of the fused decode attention (:mod:`ltri_rag.kernels.triton_decode`): tile sizes, pipeline depth
and the number of splits, worked out from tensor shapes only (no host synchronisation, so a CUDA graph can capture
the launch). Plain Python: no Triton needed to import it."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ltri_rag.kernels._triton_support import multiprocessors as _multiprocessors

__all__ = ["FinishShapes", "block_sizes", "finish_shapes", "launch_settings", "num_splits_for", "prev_pow2",
           "stages_that_fit"]

_MAX_SPLITS = 256
_MIN_TILES_PER_SPLIT = 2
_INTERPRETER_SPLITS = 3


def prev_pow2(value: int) -> int:
    """The largest power of two <= ``value`` (1 for values below 2)."""
    return 1 << max(0, int(value).bit_length() - 1)


def block_sizes(head_dim: int, device: torch.device,
                dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """``(block_n, block_w, num_warps, num_stages)`` for
    :func:`~ltri_rag.kernels.triton_decode.decode_attention_triton`.

    ``block_n`` keys per tile of the split pass (its ``num_warps`` / ``num_stages``), ``block_w`` window keys per
    program of the finishing pass. Off CUDA (the interpreter) small tiles keep the per-program numpy work light.
    The CUDA values aim at about two programs per multiprocessor on sm_90. Compiled ahead of
    time for sm_90 without a GPU (the launcher's arguments, Triton's runtime specialisation, ptxas): no register
    spill; the split pass pipelines its K/V loads (cp.async) and takes about 72-76 KiB of shared memory and 100-140
    registers for 16-bit inputs at head_dim 64/80/128/256 (float32: up to 194 registers, 146 KiB at head_dim 256).
    On the H200 (session 12) 35 launch settings were swept with ``benchmarks/bench_decode_attention.py --grid``:
    these were the best.
    """
    if device.type != "cuda":
        return 32, 32, 1, 1
    wide = dtype == torch.float32 or head_dim > 128
    if head_dim <= 64 and not wide:
        return 128, 256, 4, 3
    return (32 if wide else 64), 256, 4, 3


# sm_90 gives a block at most 227 KiB of shared memory; leave room for the compiler's own scratch
_SHARED_BYTES = 200 * 1024


def stages_that_fit(num_stages: int, block_n: int, block_d: int, itemsize: int, device: torch.device) -> int:
    """``num_stages`` lowered until the split pass's pipelined K and V tiles (``2 * block_n * block_d * itemsize``
    bytes per stage) fit in a block's shared memory on CUDA (at least 1). An explicit ``block_n`` of 128 in float32
    at head_dim 128 needs 128 KiB per stage: three stages would not launch. Off CUDA it is returned unchanged."""
    if device.type != "cuda":
        return num_stages
    per_stage = 2 * block_n * block_d * itemsize
    return max(1, min(num_stages, _SHARED_BYTES // per_stage))


def launch_settings(head_dim: int, device: torch.device, dtype: torch.dtype, block_n: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None) -> tuple[int, int, int, int, int]:
    """``(block_n, block_w, num_warps, num_stages, block_d)`` of a launch in the decode kernel's split layout: the
    given settings (checked) or :func:`block_sizes`'s, the pipeline depth lowered to fit (:func:`stages_that_fit`),
    ``block_d`` the head dimension padded to a power of two >= 16.

    Raises:
        ValueError: ``block_n`` not a power of two >= 16, ``num_warps`` not a power of two >= 1, ``num_stages`` < 1.
    """
    default_n, block_w, default_warps, default_stages = block_sizes(head_dim, device, dtype)
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if num_warps is not None and (num_warps < 1 or num_warps & (num_warps - 1)):
        raise ValueError(f"num_warps must be a power of two >= 1, got {num_warps}")
    if num_stages is not None and num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    block_n = default_n if block_n is None else block_n
    block_d = max(16, _next_pow2(head_dim))
    num_stages = stages_that_fit(default_stages if num_stages is None else num_stages, block_n, block_d,
                                 dtype.itemsize, device)
    return block_n, block_w, default_warps if num_warps is None else num_warps, num_stages, block_d


def num_splits_for(num_tiles: int, programs: int, device: torch.device, value: int | None = None) -> int:
    """Splits of ``num_tiles`` key tiles for ``programs = B * Hkv`` (shapes only, no sync).

    ``value`` if given (capped at ``num_tiles`` and 256); else on CUDA about two programs per multiprocessor with
    at least two tiles per split; else (interpreter) 3. The count is then tightened so that no split is empty.
    """
    if value is not None:
        if value < 1:
            raise ValueError(f"num_splits must be >= 1, got {value}")
        splits = value
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        splits = min(-(-2 * _multiprocessors(index) // programs), max(1, num_tiles // _MIN_TILES_PER_SPLIT))
    else:
        splits = _INTERPRETER_SPLITS
    splits = max(1, min(splits, num_tiles, _MAX_SPLITS))
    per_split = -(-num_tiles // splits)
    return -(-num_tiles // per_split)


def _next_pow2(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


class FinishShapes(NamedTuple):
    """Launch shapes of the decode attention's finishing work (the finishing pass, or the split pass's tail with
    ``FUSED_FINISH``), from tensor shapes only."""

    group_p: int  # query heads per KV head, rounded up to a power of two
    splits_p: int  # splits, rounded up to a power of two
    band_p: int  # band width, rounded up to a power of two (at least 2)
    heads_p: int  # query heads, rounded up to a power of two
    merge_d: int  # columns of the partial outputs merged per program (a slice of the head dimension)
    chunk: int  # splits per load of the merge (a [group_p, chunk, merge_d] tile)
    num_merge: int  # column slices, one program each
    num_wblocks: int  # programs per (sequence, KV head): the column slices, or the window's key-mass blocks
    band_tile: bool  # the band reads every head of its sequence in one tile (else it walks the KV heads)


def finish_shapes(group: int, splits: int, num_heads: int, block_d: int, band_width: int, win_cap: int,
                  block_w: int, want_key_mass: bool, one_tile: bool, merge_elements: int,
                  band_tile_elements: int) -> FinishShapes:
    """The finishing work's shapes: the merge spread over column slices of at most ``merge_elements`` values per
    tile and the band in one tile of at most ``band_tile_elements`` (``one_tile``); otherwise one program merges
    every column and the band walks the KV heads."""
    group_p, splits_p = _next_pow2(group), _next_pow2(splits)
    band_p, heads_p = max(2, _next_pow2(band_width)), _next_pow2(num_heads)
    if one_tile:
        merge_d = max(16, min(block_d, prev_pow2(merge_elements // (group_p * splits_p))))
        band_tile = heads_p * max(splits_p, band_p) <= band_tile_elements
    else:
        merge_d, band_tile = block_d, False
    chunk = max(1, min(splits_p, merge_elements // (group_p * merge_d)))
    num_merge = block_d // merge_d
    num_wblocks = max(-(-win_cap // block_w) if want_key_mass else 1, num_merge)
    return FinishShapes(group_p, splits_p, band_p, heads_p, merge_d, chunk, num_merge, num_wblocks, band_tile)
