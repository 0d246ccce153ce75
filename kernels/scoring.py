"""Span scoring: how well a query summary matches each span's index vectors.

Plain-torch reference; a Triton backend plugs in behind :func:`span_scores` later.
"""

from __future__ import annotations

import torch

__all__ = ["span_scores"]


def span_scores(
    query: torch.Tensor,
    vectors: torch.Tensor,
    owner: torch.Tensor,
    num_spans: int,
) -> torch.Tensor:
    """Best match of each query head against each span's index vectors.

    Args:
        query: ``[num_heads, head_dim]`` query summary per query head.
        vectors: ``[num_vectors, num_kv_heads, head_dim]`` index vectors, one per (vector, KV head).
        owner: ``[num_vectors]`` int64 span id of each vector, in ``[0, num_spans)``.
        num_spans: Number of spans.

    Returns:
        ``[num_heads, num_spans]`` float32: ``max`` over the span's vectors of ``query_h . vector_{kv(h)}``;
        ``-inf`` for a span without vectors.
    """
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
    qg = query.float().view(num_kv_heads, group, head_dim)
    dots = torch.einsum("hgd,nhd->hgn", qg, vectors.float()).reshape(num_heads, -1)  # [H, N]
    out = torch.full((num_heads, num_spans), -float("inf"), dtype=torch.float32, device=query.device)
    index = owner.to(query.device).view(1, -1).expand(num_heads, -1)
    return out.scatter_reduce(1, index, dots, reduce="amax", include_self=True)
