"""Index vectors: the few keys of each span that retrieval matches queries against (pure functions).

A span's index vectors are its keys that received the most attention while they sat in the local window
(per KV head). Their number is static, or dynamic: a span whose rank stands out from its neighbours' (a confident,
self-contained span) gets few vectors; one that does not gets more.
"""

from __future__ import annotations

import torch

from ltri_rag.kernels.transfer import to_device

__all__ = ["dynamic_counts", "static_counts", "select_index_tokens"]


def static_counts(lengths: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """``[num_spans]`` int64: ``num_vectors`` per span, at most the span's length."""
    return torch.clamp(lengths, max=num_vectors).to(torch.int64)


def dynamic_counts(
    lengths: torch.Tensor,
    rank: torch.Tensor,
    *,
    base: int,
    minimum: int,
    maximum: int,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-span vector counts ``clip(round(base / confidence), minimum, maximum)``.

    ``confidence = max(rank, 0) / max(mean(rank of left and right neighbour), eps)``; a span with a rank no
    better than its neighbours' gets at least ``base`` vectors, a non-positive rank gets ``maximum``.

    Args:
        lengths: ``[num_spans]`` span lengths.
        rank: ``[num_spans]`` span ranks (see :mod:`ltri_rag.spans`), in order along the text.
        base: Count for a span as confident as its neighbours.
        minimum: Lower clip.
        maximum: Upper clip.
        eps: Floor of the neighbours' mean rank.

    Returns:
        ``[num_spans]`` int64 counts, each at most the span's length.
    """
    rank = rank.float()
    left = torch.cat([rank[:1], rank[:-1]])
    right = torch.cat([rank[1:], rank[-1:]])
    neighbours = torch.clamp((left + right) / 2, min=eps)
    confidence = torch.clamp(rank, min=0.0) / neighbours
    raw = torch.where(confidence > 0, torch.round(base / confidence.clamp(min=1e-9)),
                      torch.full_like(rank, float(maximum)))
    counts = torch.clamp(raw, minimum, maximum).to(torch.int64)
    return torch.minimum(counts, lengths.to(torch.int64))


def select_index_tokens(
    key_mass: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The most-attended tokens of each span, per KV head.

    Args:
        key_mass: ``[num_kv_heads, num_tokens]`` attention each token received in the window.
        starts: ``[num_spans]`` span starts (token offsets), increasing, partitioning ``[0, num_tokens)``.
        ends: ``[num_spans]`` span ends (exclusive).
        counts: ``[num_spans]`` vectors per span (<= span length).

    ``starts``, ``ends`` and ``counts`` are best kept on the host (the engine's are): which tokens of the ordering
    are kept is worked out there, and only the token ranking runs on ``key_mass``'s device, without a read-back.

    Returns:
        ``(token_idx, owner)``: ``[num_vectors, num_kv_heads]`` token offsets on ``key_mass``'s device (per head,
        the head's top tokens of the span, best first) and ``[num_vectors]`` owning span ids (host int64), with
        ``num_vectors = counts.sum()``.
    """
    device = key_mass.device
    num_tokens = key_mass.shape[1]
    starts, ends, counts = starts.cpu(), ends.cpu(), counts.cpu()
    lengths = ends - starts
    span_of_token = torch.repeat_interleave(torch.arange(starts.numel()), lengths)  # [T] (host)
    if span_of_token.numel() != num_tokens:
        raise ValueError(f"spans cover {span_of_token.numel()} tokens, key_mass has {num_tokens}")
    rank_in_span = torch.arange(num_tokens) - starts[span_of_token]  # [T]
    keep = rank_in_span < counts[span_of_token]  # same positions for every head
    kept = torch.nonzero(keep).flatten()  # [num_vectors] positions in the span-grouped order (host)
    # order tokens by (span, -mass): sort by mass first, then stable by span
    by_mass = torch.argsort(key_mass, dim=1, descending=True, stable=True)  # [Hkv, T]
    span_sorted = to_device(span_of_token, device)[by_mass]
    by_span = torch.argsort(span_sorted, dim=1, stable=True)
    order = torch.gather(by_mass, 1, by_span)  # [Hkv, T] tokens grouped by span, best first
    token_idx = order.index_select(1, to_device(kept, device)).T.contiguous()  # [num_vectors, Hkv]
    owner = span_of_token[kept]
    return token_idx, owner
