"""Span scoring: how well a query summary matches each span's index vectors.

Plain-torch reference. :func:`span_probabilities` (the engine's scorer, and its dominant cost at long context)
also has a fused Triton backend, :func:`ltri_rag.kernels.triton_scoring.span_probabilities_triton`, selected by
its ``backend`` argument and imported only when asked for (this module works without triton).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from ltri_rag.kernels.attention import auto_uses_triton
from ltri_rag.kernels.transfer import to_device

__all__ = ["SpanLayout", "dequantize_rows", "has_scales", "quantize_rows", "span_layout", "span_probabilities",
           "span_scores"]

_BACKENDS = ("torch", "triton", "auto")


class SpanLayout(NamedTuple):
    """Index vectors laid out densely per span (see :func:`span_layout`).

    ``padded [num_spans * width, num_kv_heads, head_dim]``, ``valid [num_spans * width]`` bool, ``width``; and
    ``scale``: None for vectors kept in a float dtype, or ``[num_spans * width, num_kv_heads]`` float32 when
    ``padded`` holds int8 codes (:func:`quantize_rows`: vector = code * scale).
    """

    padded: torch.Tensor
    valid: torch.Tensor
    width: int
    scale: torch.Tensor | None = None


def has_scales(layout: SpanLayout | tuple | None) -> bool:
    """Whether ``layout`` (a :class:`SpanLayout` or a plain ``(padded, valid, width)`` tuple) holds int8 codes with
    scales."""
    return layout is not None and SpanLayout(*layout).scale is not None


def quantize_rows(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, Hkv, D]`` vectors -> int8 codes ``[N, Hkv, D]`` and float32 scales ``[N, Hkv]``, symmetric, one scale
    per (vector, KV head): ``scale = max |v| / 127``, ``code = round(v / scale)`` (a zero vector: scale 0, codes
    0). Each coordinate is off by at most ``scale / 2`` (half a step of its own vector's grid)."""
    x = vectors.float()
    scale = x.abs().amax(dim=-1) / 127.0  # [N, Hkv]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x / safe[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`quantize_rows` undone: ``codes * scale`` (computed in float32) in ``dtype``."""
    return (codes.float() * scale[..., None]).to(dtype)


def span_layout(vectors: torch.Tensor, owner: torch.Tensor, num_spans: int,
                dtype: torch.dtype = torch.float32, min_width: int = 1, quantize: bool = False) -> SpanLayout:
    """Index vectors laid out densely per span, so that the max over a span's vectors is a plain ``amax``.

    Returns ``(padded, valid, width, scale)``: ``padded [num_spans * width, num_kv_heads, head_dim]`` of ``dtype``
    (float32 unless asked otherwise; span ``s`` owns rows ``s * width .. s * width + width - 1``, its vectors
    first; padding rows are 0), ``valid [num_spans * width]`` bool, and ``width``, the most vectors any span has
    (at least ``min_width``). A dense layout replaces a ``scatter_reduce`` over every
    (query, vector) score, the costliest step of scoring a large memory. With ``quantize`` the rows are int8 codes
    and ``scale [num_spans * width, num_kv_heads]`` float32 their scales (:func:`quantize_rows`; 0 for padding):
    half the bytes of 16-bit vectors for scoring to read; else ``scale`` is None.

    The index arithmetic runs where ``owner`` lives. Given a device ``owner``, reading the largest span's vector
    count back to the host synchronises the device; given a host ``owner`` (the engine's span tables keep a host
    copy), nothing does: the row indices and the mask are built on the host and copied asynchronously. A caller that
    scores the same spans many times builds the layout once and passes it as ``layout``.
    """
    counts = torch.bincount(owner, minlength=num_spans)
    width = max(min_width, int(counts.max())) if owner.numel() else max(1, min_width)
    order = torch.argsort(owner, stable=True)
    sorted_owner = owner[order]
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each span
    rank = torch.arange(owner.numel(), device=owner.device) - starts[sorted_owner]  # position within its span
    rows = sorted_owner * width + rank
    valid = torch.zeros(num_spans * width, dtype=torch.bool, device=owner.device)
    valid[rows] = True
    rows, order, valid = (to_device(t, vectors.device) for t in (rows, order, valid))
    if quantize:
        codes, scale = quantize_rows(vectors[order])
        padded = vectors.new_zeros((num_spans * width, *vectors.shape[1:]), dtype=torch.int8)
        padded[rows] = codes
        scales = vectors.new_zeros((num_spans * width, vectors.shape[1]), dtype=torch.float32)
        scales[rows] = scale
        return SpanLayout(padded, valid, width, scales)
    padded = vectors.new_zeros((num_spans * width, *vectors.shape[1:]), dtype=dtype)
    padded[rows] = vectors[order].to(dtype)
    return SpanLayout(padded, valid, width)


_HALF_MATMUL: dict[torch.device, bool] = {}  # device -> whether bmm(..., out_dtype=float32) runs there


def _half_matmul_ok(queries: torch.Tensor) -> bool:
    """Whether half-precision ``queries`` can be multiplied into float32 sums by ``torch.bmm(..., out_dtype=)``
    on their device: CUDA, a half dtype, and a torch that has it (probed once per device, never while a CUDA graph
    is being captured, where an unknown answer means no)."""
    if queries.device.type != "cuda" or queries.dtype not in (torch.float16, torch.bfloat16):
        return False
    known = _HALF_MATMUL.get(queries.device)
    if known is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        try:
            probe = torch.ones(1, 1, 16, dtype=queries.dtype, device=queries.device)
            known = torch.bmm(probe, probe.transpose(1, 2), out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            known = False
        _HALF_MATMUL[queries.device] = known
    return known


def _resolve_layout(layout: SpanLayout | None, vectors: torch.Tensor, owner: torch.Tensor, num_spans: int,
                    dtype: torch.dtype) -> SpanLayout:
    """``layout`` (checked against ``vectors`` / ``num_spans``, cast to ``dtype``) or a fresh one. An int8 layout
    (with scales) keeps its codes as they are: the caller multiplies by the scales."""
    if layout is None:
        return span_layout(vectors, owner, num_spans, dtype=dtype)
    padded, valid, width, scale = SpanLayout(*layout)
    if padded.shape[0] != num_spans * width or valid.shape[0] != padded.shape[0] or \
            padded.shape[1:] != vectors.shape[1:]:
        raise ValueError(f"layout {tuple(padded.shape)} (width {width}) does not fit {num_spans} spans of vectors "
                         f"{tuple(vectors.shape)}")
    if scale is not None:
        if padded.dtype != torch.int8 or scale.shape != padded.shape[:2] or scale.dtype != torch.float32:
            raise ValueError(f"a layout with scales needs int8 rows and [rows, num_kv_heads] float32 scales, got "
                             f"{padded.dtype} rows and {tuple(scale.shape)} {scale.dtype} scales")
        return SpanLayout(padded, valid, width, scale)
    return SpanLayout(padded if padded.dtype == dtype else padded.to(dtype), valid, width)


def _span_max(dots: torch.Tensor, valid: torch.Tensor, num_spans: int, width: int) -> torch.Tensor:
    """``[R, num_spans * width]`` scores of padded vectors -> ``[R, num_spans]`` max per span (in place on
    ``dots``; ``-inf`` for a span without vectors)."""
    dots.masked_fill_(~valid, -float("inf"))
    return dots.view(dots.shape[0], num_spans, width).amax(dim=-1)


def _from_layout(vectors: torch.Tensor | None, owner: torch.Tensor | None,
                 layout: SpanLayout | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(vectors, owner)`` as given, or, when either is None, the layout's padded rows standing in for the
    vectors (their shape, dtype and device are what the checks read) and no owner: a caller that keeps only the
    layout (the engine's span tables) passes it alone."""
    if vectors is not None and owner is not None:
        return vectors, owner
    if layout is None:
        raise ValueError("vectors and owner are required without a layout")
    return layout[0], None


def _check_span_inputs(queries: torch.Tensor, vectors: torch.Tensor, owner: torch.Tensor | None,
                       num_spans: int) -> int:
    """Validate the arguments of :func:`span_probabilities` (and its Triton backend); returns the GQA group size.
    ``owner`` None: ``vectors`` are a layout's padded rows (see :func:`_from_layout`)."""
    if queries.dim() != 3:
        raise ValueError(f"queries must be [num_heads, q_len, head_dim], got {tuple(queries.shape)}")
    if owner is None:
        owner = torch.empty(vectors.shape[0], dtype=torch.int64, device="meta")
    if vectors.dim() != 3 or owner.dim() != 1:
        raise ValueError(f"expected vectors [num_vectors, num_kv_heads, head_dim] and owner [num_vectors]; got "
                         f"{tuple(vectors.shape)} and {tuple(owner.shape)}")
    if vectors.shape[0] != owner.shape[0]:
        raise ValueError(f"vectors ({vectors.shape[0]}) and owner ({owner.shape[0]}) disagree on num_vectors")
    num_heads, num_kv_heads = queries.shape[0], vectors.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0 or vectors.shape[2] != queries.shape[2]:
        raise ValueError(f"queries {tuple(queries.shape)} do not fit vectors {tuple(vectors.shape)}: num_heads must "
                         "be a multiple of num_kv_heads and head_dim must agree")
    if num_spans < 0:
        raise ValueError(f"num_spans must be >= 0, got {num_spans}")
    if vectors.device != queries.device:
        raise ValueError(f"vectors are on {vectors.device}, queries on {queries.device}")
    return num_heads // num_kv_heads


def span_scores(
    query: torch.Tensor,
    vectors: torch.Tensor | None,
    owner: torch.Tensor | None,
    num_spans: int,
    layout: SpanLayout | None = None,
) -> torch.Tensor:
    """Best match of each query head against each span's index vectors.

    Args:
        query: ``[num_heads, head_dim]`` query summary per query head.
        vectors: ``[num_vectors, num_kv_heads, head_dim]`` index vectors, one per (vector, KV head).
        owner: ``[num_vectors]`` int64 span id of each vector, in ``[0, num_spans)``.
        num_spans: Number of spans.
        layout: :func:`span_layout` of these vectors, if the caller keeps one (saves rebuilding it). With a
            layout, ``vectors`` and ``owner`` may be None.

    Returns:
        ``[num_heads, num_spans]`` float32: ``max`` over the span's vectors of ``query_h . vector_{kv(h)}``;
        ``-inf`` for a span without vectors.
    """
    vectors, owner = _from_layout(vectors, owner, layout)
    if owner is None:
        owner = torch.empty(vectors.shape[0], dtype=torch.int64, device="meta")
    if query.dim() != 2 or vectors.dim() != 3 or owner.dim() != 1:
        raise ValueError(f"expected query [H, D], vectors [N, Hkv, D], owner [N]; got {tuple(query.shape)}, "
                         f"{tuple(vectors.shape)}, {tuple(owner.shape)}")
    if vectors.shape[0] != owner.shape[0]:
        raise ValueError(f"vectors ({vectors.shape[0]}) and owner ({owner.shape[0]}) disagree on num_vectors")
    num_heads, head_dim = query.shape
    num_kv_heads = vectors.shape[1]
    if num_heads % num_kv_heads != 0 or vectors.shape[2] != head_dim:
        raise ValueError(f"query {tuple(query.shape)} does not fit vectors {tuple(vectors.shape)}")
    group = num_heads // num_kv_heads
    if num_spans == 0:
        return torch.zeros(num_heads, 0, dtype=torch.float32, device=query.device)
    padded, valid, width, scale = _resolve_layout(layout, vectors, owner, num_spans, torch.float32)
    qg = query.float().view(num_kv_heads, group, head_dim)
    dots = torch.einsum("hgd,nhd->hgn", qg, padded.float())  # [Hkv, G, S * width]
    if scale is not None:  # int8 codes: each column times its vector's scale
        dots.mul_(scale.t()[:, None, :])
    dots = dots.reshape(num_heads, -1)  # [H, S * width]
    return _span_max(dots, valid, num_spans, width)


AUTO_ONE_QUERY_TRITON = True
"""Whether ``auto`` scores a single query (a decoded token) with the Triton kernel (True since it measured
1.6-2.2x faster than the torch path on the H200 at Llama-3-8B heads, 4K-64K spans: ``benchmarks/results/
span_scoring_h200/session17_llama8b_decode``); False restores the torch path for comparisons."""


def scoring_uses_triton(backend: str, queries: torch.Tensor) -> bool:
    """Whether :func:`span_probabilities` takes the Triton kernels for ``queries [H, q_len, D]`` under ``backend``:
    always for ``triton``; for ``auto`` on CUDA tensors of a device where ``auto`` takes Triton
    (:func:`~ltri_rag.kernels.attention.auto_uses_triton`: compute capability 8.0 or later; a single query too,
    unless ``AUTO_ONE_QUERY_TRITON`` is off; see ``backend`` there)."""
    if backend == "triton":
        return True
    if backend != "auto" or queries.dim() != 3 or not auto_uses_triton(queries.device):
        return False
    return queries.shape[1] > 1 or AUTO_ONE_QUERY_TRITON


def span_probabilities(
    queries: torch.Tensor,
    vectors: torch.Tensor | None,
    owner: torch.Tensor | None,
    num_spans: int,
    scaling: float,
    query_block: int = 128,
    *,
    backend: str = "torch",
    layout: SpanLayout | None = None,
) -> torch.Tensor:
    """Attention-like distribution of each query head over spans, averaged over the chunk's queries.

    For query ``c`` of head ``h``: ``s[h, c, span] = scaling * max_{v in span} q_{h,c} . v``, turned into a
    distribution over spans by a softmax, then averaged over ``c``. Heads whose queries point sharply at a few
    spans (retrieval heads) contribute peaked distributions; diffuse heads contribute nearly uniform ones.

    Args:
        queries: ``[num_heads, q_len, head_dim]`` position-free queries.
        vectors: ``[num_vectors, num_kv_heads, head_dim]`` index vectors.
        owner: ``[num_vectors]`` int64 span id of each vector.
        num_spans: Number of spans.
        scaling: Score multiplier (the layer's attention scaling).
        query_block: Queries processed at once by the torch path (bounds memory to ``heads x block x vectors``;
            the Triton kernels materialise no score matrix and ignore it).
        backend: ``torch`` (this plain-torch path, everywhere), ``triton`` (the fused kernels of
            :mod:`ltri_rag.kernels.triton_scoring`: CUDA tensors, or CPU under ``TRITON_INTERPRET=1``) or ``auto``
            (Triton for CUDA tensors of compute capability 8.0 or later when triton imports, torch elsewhere; a
            decoded token's single query takes
            a one-pass kernel of its own, 1.6-2.2x faster than the torch path on the H200: see
            ``AUTO_ONE_QUERY_TRITON``). The engine passes ``LtriConfig.attention_backend``.
        layout: :func:`span_layout` of these vectors (any dtype), if the caller keeps one: the engine's span tables
            do, so that scoring does not rebuild it (nor sync the device) at every chunk and decoded token. With a
            layout, ``vectors`` and ``owner`` may be None (the tables keep only the layout).

    Returns:
        ``[num_heads, num_spans]`` float32, each row summing to 1 (0 rows if there are no spans).

    Raises:
        ValueError: inconsistent shapes, an unknown ``backend``, or ``triton`` where triton does not import.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'torch', 'triton' or 'auto', got {backend!r}")
    vectors, owner = _from_layout(vectors, owner, layout)
    if scoring_uses_triton(backend, queries):
        from ltri_rag.kernels.triton_scoring import span_probabilities_triton, triton_available  # triton is optional

        if triton_available():
            return span_probabilities_triton(queries, vectors, owner, num_spans, scaling, layout=layout)
        if backend == "triton":
            raise ValueError("backend 'triton' needs the triton package, which did not import")
    _check_span_inputs(queries, vectors, owner, num_spans)
    num_heads, q_len, _ = queries.shape
    total = torch.zeros(num_heads, num_spans, dtype=torch.float32, device=queries.device)
    if num_spans == 0:
        return total
    num_kv_heads, head_dim = vectors.shape[1], vectors.shape[2]
    group = num_heads // num_kv_heads
    # half-precision queries and kept layout on a GPU: multiplied as they are into float32 sums (the products of
    # half values are exact in float32, so this equals the float32 path up to summation order) instead of copying
    # the whole layout to float32 at every call: at 1M tokens that copy moved ~5x the layout's bytes per layer
    half = layout is not None and (has_scales(layout) or queries.dtype == layout[0].dtype) and \
        _half_matmul_ok(queries)
    padded, valid, width, scale = _resolve_layout(layout, vectors, owner, num_spans,
                                                  queries.dtype if half else torch.float32)
    if scale is not None:  # int8 codes, exact in any float dtype; the scales multiply the dot products
        padded = padded.to(queries.dtype if half else torch.float32)
        col_scale = scale.t()[:, None, :]  # [Hkv, 1, S * width]
    keys = padded.transpose(0, 1).transpose(1, 2)  # [Hkv, D, S * width]
    for start in range(0, q_len, query_block):
        if half:
            block = queries[:, start:start + query_block]  # [H, c, D]
        else:
            block = queries[:, start:start + query_block].float() * scaling  # [H, c, D]
        c = block.shape[1]
        qg = block.reshape(num_kv_heads, group * c, head_dim)
        if half:
            dots = torch.bmm(qg, keys, out_dtype=torch.float32)
            dots = (dots.mul_(col_scale) if scale is not None else dots).view(num_heads * c, -1).mul_(scaling)
        else:
            dots = torch.bmm(qg, keys)  # [Hkv, G*c, S * width]
            dots = (dots.mul_(col_scale) if scale is not None else dots).view(num_heads * c, -1)  # heads in order
        scores = _span_max(dots, valid, num_spans, width)  # [H*c, S]
        probs = torch.softmax(scores, dim=-1).view(num_heads, c, num_spans)
        total += probs.sum(dim=1)
    return total / q_len
