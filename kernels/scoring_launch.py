"""Launch settings and tuning switches of the Triton span scorer (:mod:`ltri_rag.kernels.triton_scoring`), and the
launcher's plain-Python helpers (operand dtypes, splits).

No kernels here: the scorer reads these names at every call, so a benchmark (or a user) may change them
on this module (``benchmarks/e2e/modes.py`` does, for its A/B modes). Numbers quoted are H200 timings at
Llama-3-8B heads (32 query / 8 KV heads, head_dim 128), from ``benchmarks/results/span_scoring_h200/``.
"""

from __future__ import annotations

import torch

from ltri_rag.kernels._triton_support import multiprocessors
from ltri_rag.kernels.scoring import SpanLayout, _resolve_layout, has_scales

__all__ = ["CHUNK_LAUNCH", "CHUNK_LOAD_PADDING", "DECODE_LOAD_PADDING", "MASS_TILE", "ONE_QUERY_LAUNCH",
           "ONE_QUERY_WIDE_FROM", "SCORE_BUFFER_BYTES", "block_sizes", "num_splits", "operands"]

_HALF = (torch.float16, torch.bfloat16)

ONE_QUERY_LAUNCH = (128, 4, 3)
"""``(block_s, num_warps, num_stages)`` of the one-query (decode) scoring kernel on CUDA, 16-bit or int8 layouts.
Session 26's sweep on the H200 (``bench_span_scoring --shapes llama8b-decode --sweep``, 18 settings, eager calls
with the softmax): against the previous choice (tiles of 64 spans below 16K spans, 128 from there, 8 warps, 2
stages) 0.094 vs 0.117 ms at 4K spans, 0.165 vs 0.192 at 16K, 0.233 vs 0.246 at 32K, 0.328 vs 0.382 at 64K (bf16);
int8 layouts 0.143 / 0.199 / 0.299 ms at 16K / 32K / 64K. Heads of at most 128 dimensions (larger ones keep
:func:`block_sizes`'). None (or 0): the previous choice."""
ONE_QUERY_WIDE_FROM = 16384  # (ONE_QUERY_LAUNCH None) spans from which tiles of 128 spans are taken (64 below)
SCORE_BUFFER_BYTES = 256 * 2 ** 20
"""Default bytes of the float32 score buffer of a chunk's scoring (``score_buffer`` of
:func:`~ltri_rag.kernels.triton_scoring.span_probabilities_triton`): queries are taken in slabs whose
``[H, slab, S]`` scores fit in it (at least one row block, whatever the budget). 0 computes every score twice
instead, with no buffer."""
CHUNK_LAUNCH = (64, 32, 4, 4)
"""``block_sizes`` on CUDA for 16-bit heads of 65-128 dimensions. Session 29 timed launches on an H200 at
Llama-3-8B heads (head_dim 128, group 4; a chunk's 256 scored queries, 2K and 16K spans; scores stored; slot loads
with padding): 64 rows x 32 spans, 4 warps, 4 stages took 0.283 / 1.544 ms. Session 28's 128 x 64, 8 warps,
2 stages took 0.34-0.40 / 1.72-2.15 ms. Session 28's sweep had timed block sizes only: the chunk launcher ignored
``num_warps`` / ``num_stages`` until session 29. Details: ``span_scoring_h200/session29_stored_scores/``."""
CHUNK_LOAD_PADDING = True
DECODE_LOAD_PADDING = False
"""Whether the chunk / one-query kernels read a slot's vector rows for every span of a tile, padding included. Then
the load is masked by the span count only, not by the ``valid`` bits just read, and a slot without a vector is
dropped from the maximum after the product. Session 29 on the H200: the compute-bound chunk kernel pipelines
better that way (16K spans: 1.54-1.73 against 1.70-1.94 ms at the best launches). The bandwidth-bound one-query
kernel loses by it (64K spans: 0.338 against 0.276 ms, it reads the padding's bytes too)."""
MASS_TILE = (16, 256, 4)  # (queries, spans, warps) of a _span_mass_stored_kernel tile on CUDA


def block_sizes(head_dim: int, group: int, device: torch.device,
                dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """``(block_m, block_s, num_warps, num_stages)`` of the chunk kernels of
    :func:`~ltri_rag.kernels.triton_scoring.span_probabilities_triton`.

    ``block_m`` is the target number of packed ``(head, query)`` rows of a program (the launcher fits it to the
    group and to short query chunks), ``block_s`` the spans of a tile (each tile is ``width`` products of
    ``block_m x head_dim x block_s``). Off CUDA (the interpreter) small blocks keep the per-program numpy work
    light. 16-bit heads of 65-128 dimensions take ``CHUNK_LAUNCH``, timed on an H200 at Llama-3-8B heads (session
    29). The other CUDA values are untimed; they compile for sm_90 without register spills (checked with ptxas,
    without a GPU, for both kernels at G = 1 / 7, 64 and 16 rows, head_dim 64 / 128 / 256, bfloat16 and float32
    inputs; float32 at head_dim 256 spills up to 76 bytes).
    """
    del group  # the launcher fits the rows to the group; kept for tuning by group later
    if device.type != "cuda":
        return 32, 32, 1, 1
    if dtype == torch.float32:
        return (64, 32, 8, 2) if head_dim > 128 else (64, 32, 4, 1)
    if head_dim > 128:
        return 64, 32, 8, 2
    return CHUNK_LAUNCH if head_dim > 64 else (64, 64, 8, 2)


def num_splits(value: int | None, name: str, work: int, others: int, device: torch.device) -> int:
    """Splits of ``work`` tiles (each split a program per ``others`` of the grid): ``value`` if given (capped at
    ``work``), else on CUDA enough for about two programs per multiprocessor, else 1."""
    if value is not None:
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        return min(value, work)
    if device.type != "cuda":
        return 1
    target = 2 * multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(work, -(-target // others)))


def operands(queries: torch.Tensor, vectors: torch.Tensor, owner: torch.Tensor, num_spans: int,
             layout: SpanLayout | None, interpreted: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool,
                                                                    torch.Tensor, int, torch.dtype, str]:
    """What the scoring kernels read: ``(queries, padded, scale, scaled, valid, width, compute dtype, dot
    precision)``. 16-bit queries and vectors of one dtype are multiplied in it (float32 sums); int8 codes (a layout
    with scales) in the 16-bit queries' dtype (the codes convert exactly); anything else in float32 (TF32 where
    torch's float32 matmuls may use it). ``valid`` is viewed as uint8. ``scale`` is the layout's ``[rows, Hkv]``
    scales when ``scaled``, else a stand-in the kernels never read (``valid`` as one column). ``interpreted``: the
    kernels were built for the Triton interpreter, whose ``tl.dot`` multiplies bfloat16 bit patterns (triton issue
    11584), so bfloat16 is computed in float32 there."""
    half = (has_scales(layout) or queries.dtype == vectors.dtype) and queries.dtype in _HALF
    if interpreted and queries.dtype == torch.bfloat16:
        half = False
    compute = queries.dtype if half else torch.float32
    if queries.dtype != compute:
        queries = queries.to(compute)
    padded, valid, width, scale = _resolve_layout(layout, vectors, owner, num_spans, compute)
    if half or queries.device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32:
        dot_precision = "ieee"  # ignored for 16-bit inputs
    else:
        dot_precision = "tf32"
    valid = valid.view(torch.uint8)
    scaled = scale is not None
    return queries, padded, scale if scaled else valid[:, None], scaled, valid, width, compute, dot_precision
