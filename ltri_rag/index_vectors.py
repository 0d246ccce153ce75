"""Index vectors: the few keys of each span that retrieval matches queries against (pure functions).

A span's index vectors are its keys that received the most attention while they sat in the local window
(per KV head). Their number is static, or dynamic: a span whose rank stands out from its neighbours' (a confident,
self-contained span) gets few vectors; one that does not gets more.
"""

from __future__ import annotations

import numpy as np
import torch

from ltri_rag.kernels.transfer import to_device

__all__ = ["dynamic_counts", "static_counts", "select_index_tokens", "select_index_tokens_batch", "span_bookkeeping"]


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
    token_idx, owners = select_index_tokens_batch(key_mass[None], [(starts, ends, counts)])
    return token_idx, owners[0]


def span_bookkeeping(spans: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_tokens: int
                     ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The host side of :func:`select_index_tokens_batch`: which span each token belongs to and which tokens
    the spans keep.

    Runs in NumPy: a segment has a few hundred spans, and torch's CPU ``repeat_interleave`` runs a parallel loop of
    grain 1 that wakes the whole intra-op thread pool at every call (0.22 s of a 32K prefill's host time on a
    16-core GPU host, ``benchmarks/results/e2e_llama8b_h200/session31/host_profile_32k.txt``;
    ``python -m benchmarks.bench_index_tokens`` times both forms).

    Args:
        spans: Per segment ``(starts, ends, counts)`` (any device), covering ``num_tokens`` tokens.
        num_tokens: Tokens per segment.

    Returns:
        ``(span_of_token [B, T] int64, kept [num_vectors] int64, owners)``, host tensors: each token's span, the
        kept tokens' positions in the span-grouped order flat over segments (each span's first ``count``), and per
        segment the kept tokens' spans.
    """
    span_of_token = np.empty((len(spans), num_tokens), dtype=np.int64)
    kept, owners = [], []
    for b, (starts, ends, counts) in enumerate(spans):
        starts, ends, counts = (t.cpu().numpy().astype(np.int64, copy=False) for t in (starts, ends, counts))
        of_token = np.repeat(np.arange(starts.size), ends - starts)  # [T]
        if of_token.size != num_tokens:
            raise ValueError(f"spans cover {of_token.size} tokens, key_mass has {num_tokens}")
        span_of_token[b] = of_token
        rank_in_span = np.arange(num_tokens) - starts[of_token]  # [T]
        keep = np.flatnonzero(rank_in_span < counts[of_token])  # same positions for every head
        kept.append(keep + b * num_tokens)  # positions in the span-grouped order, flat over segments
        owners.append(torch.from_numpy(of_token[keep]))
    flat_kept = np.concatenate(kept) if kept else np.empty(0, dtype=np.int64)
    return torch.from_numpy(span_of_token), torch.from_numpy(flat_kept), owners


def select_index_tokens_batch(
    key_mass: torch.Tensor, spans: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`select_index_tokens` of several independent segments of equal length at once (e.g. every layer's).

    Args:
        key_mass: ``[batch, num_kv_heads, num_tokens]``.
        spans: Per segment, ``(starts, ends, counts)`` as in :func:`select_index_tokens` (host).

    Returns:
        ``(token_idx, owners)``: ``[num_vectors, num_kv_heads]`` token offsets within each segment, the segments'
        vectors one after another (segment 0's first), on ``key_mass``'s device; per segment its ``[n_b]`` owning
        span ids (host int64), ``sum(n_b) = num_vectors``.
    """
    device = key_mass.device
    batch, num_kv_heads, num_tokens = key_mass.shape
    if len(spans) != batch:
        raise ValueError(f"{len(spans)} span lists for {batch} segments")
    span_of_token, kept, owners = span_bookkeeping(spans, num_tokens)
    # order tokens by (span, -mass): sort by mass first, then stable by span
    by_mass = torch.argsort(key_mass, dim=2, descending=True, stable=True)  # [B, Hkv, T]
    of_token_dev = to_device(span_of_token, device)[:, None, :].expand(-1, num_kv_heads, -1)
    by_span = torch.argsort(torch.gather(of_token_dev, 2, by_mass), dim=2, stable=True)
    order = torch.gather(by_mass, 2, by_span)  # [B, Hkv, T] tokens grouped by span, best first
    flat = order.transpose(1, 2).reshape(batch * num_tokens, num_kv_heads)
    token_idx = flat.index_select(0, to_device(kept, device))  # [num_vectors, Hkv]
    return token_idx, owners
