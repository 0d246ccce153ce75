"""Choosing which spans a layer loads for the current chunk (pure functions).

Inputs are per-query-head span scores (from :func:`ltri_rag.kernels.span_scores`). Options:
    scope ``shared``: one selection for all heads (mean score over heads);
    scope ``per_kv_head``: one selection per KV head (mean over its query group);
    voting: each query head votes for its own top spans; spans rank by votes, ties broken by score;
    persistence: a decaying bonus for spans recalled in recent steps (in units of the score's std);
    prior: cross-layer evidence mixed into the (z-normalised) score;
    pinned: spans that rank first (decode steps keeping what the prompt's end retrieved).
Selection fills the token budget greedily in rank order.

The engine runs these on the host (``layer`` reads the scores back once per retrieval): the ranking and the fill
are a few dozen small operations whose launches and read-backs would cost more on a GPU than their work.
:func:`_fill_budget` takes a NumPy path for host keys and a device path (no read-back) for device keys; both
select the same spans.
"""

from __future__ import annotations

import numpy as np
import torch

from ltri_rag.config import LtriConfig
from ltri_rag.kernels.transfer import to_device

__all__ = ["query_summary", "scored_queries", "select_spans", "update_recency"]


def scored_queries(q_len: int, config: LtriConfig) -> torch.Tensor | None:
    """Which of a pass's ``q_len`` queries span scoring reads (``LtriConfig.score_queries``).

    Returns:
        ``[c]`` int64 host indices, increasing, evenly spaced and ending at ``q_len - 1``, with
        ``c = score_queries``; or None when every query is scored (``q_len <= score_queries``, no limit, or
        ``dot`` scoring, which reads only the chunk's mean query).
    """
    limit = config.score_queries
    if limit is None or q_len <= limit or config.span_scoring != "softmax":
        return None
    # the spacing is q_len / limit (not a whole number in general); counted back from the last query
    return (q_len - 1) - torch.div(torch.arange(limit - 1, -1, -1) * q_len, limit, rounding_mode="floor")


def query_summary(query: torch.Tensor) -> torch.Tensor:
    """Mean over the chunk of position-free queries.

    Args:
        query: ``[num_heads, q_len, head_dim]`` queries with rotary positions removed.

    Returns:
        ``[num_heads, head_dim]`` float32.
    """
    return query.float().mean(dim=1)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True, unbiased=False) + 1e-6)


def _rank_keys(
    scores: torch.Tensor, rows: int, recency: torch.Tensor | None, bonus: float, voting: bool, top_k: int,
    prior: torch.Tensor | None, prior_weight: float,
) -> torch.Tensor:
    """``[rows, num_spans]`` ranking keys from ``[num_heads, num_spans]`` scores."""
    num_heads, num_spans = scores.shape
    # spans without vectors (-inf) rank below every scored span (worked out on the device: no read-back)
    finite = torch.isfinite(scores)
    big = torch.finfo(scores.dtype).max
    low = torch.where(finite, scores, torch.full_like(scores, big)).amin()  # the lowest finite score, or big
    floor = torch.where(low < big, low - 1.0, torch.zeros_like(low))
    scores = torch.where(finite, scores, floor)
    grouped = scores.view(rows, num_heads // rows, num_spans)  # [R, G, S]
    base = grouped.mean(dim=1)  # [R, S]
    z = _zscore(base)
    if prior is not None and prior_weight > 0:
        z = (1.0 - prior_weight) * z + prior_weight * _zscore(prior.to(z.device).float())[None, :]
    if recency is not None and bonus > 0:
        z = z + bonus * recency.to(z.device)[None, :]
    if not voting:
        return z
    k = min(top_k, num_spans)
    top = grouped.topk(k, dim=2).indices  # [R, G, k]
    votes = torch.zeros(rows, num_spans, device=scores.device)
    votes.scatter_add_(1, top.reshape(rows, -1), torch.ones(top.reshape(rows, -1).shape, device=scores.device))
    return votes + torch.sigmoid(z)


def select_spans(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    budget: int,
    *,
    num_kv_heads: int,
    scope: str = "shared",
    voting: bool = False,
    recency: torch.Tensor | None = None,
    bonus: float = 0.0,
    prior: torch.Tensor | None = None,
    prior_weight: float = 0.0,
    pinned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spans to load, filling ``budget`` tokens in rank order.

    Args:
        scores: ``[num_heads, num_spans]`` per-query-head span scores.
        lengths: ``[num_spans]`` span lengths in tokens.
        budget: Token budget.
        num_kv_heads: KV heads of the layer (for ``per_kv_head`` scope).
        scope: ``shared`` or ``per_kv_head``.
        voting: Rank by per-head votes first.
        recency: ``[num_spans]`` persistence state (see :func:`update_recency`) or None.
        bonus: Weight of ``recency``.
        prior: ``[num_spans]`` cross-layer evidence (see :mod:`ltri_rag.consensus`) or None.
        prior_weight: Weight in [0, 1] of ``prior`` against the layer's own scores (both z-normalised).
        pinned: ``[num_spans]`` bool, spans ranked before all others (still within the budget), or None.

    Returns:
        ``[rows, num_spans]`` bool, ``rows`` = 1 (shared) or ``num_kv_heads``.
    """
    if scope not in ("shared", "per_kv_head"):
        raise ValueError(f"scope must be 'shared' or 'per_kv_head', got {scope!r}")
    num_heads, num_spans = scores.shape
    rows = 1 if scope == "shared" else num_kv_heads
    if num_spans == 0:
        return torch.zeros(rows, 0, dtype=torch.bool, device=scores.device)
    # read on the host: span tables keep their lengths there (no device sync)
    mean_len = float(lengths.float().mean())
    top_k = max(1, int(budget / max(mean_len, 1.0)))
    keys = _rank_keys(scores, rows, recency, bonus, voting, top_k, prior, prior_weight)
    if pinned is not None:
        # above every unpinned key (keys are z-scores, or votes + sigmoid), order among the pinned kept
        lift = keys.abs().max() + float(num_heads) + 1.0
        keys = keys + lift * 2 * pinned.to(keys.device)[None, :].float()
    return _fill_budget(keys, lengths, budget)


_TAIL = 64  # ranked spans after the prefix that the greedy fill still tries


def _fill_budget(keys: torch.Tensor, lengths: torch.Tensor, budget: int) -> torch.Tensor:
    """``[rows, S]`` bool: walk each row's spans in rank order, taking every span that still fits (the prefix of
    ranked spans that fits, then up to ``_TAIL`` more ranks), on the keys' device (see :func:`_fill_budget_host`
    and :func:`_fill_budget_device`).

    Args:
        keys: ``[rows, S]`` ranking keys (higher first; ties keep span order).
        lengths: ``[S]`` span lengths (>= 1), best kept on the host.
        budget: Token budget per row.
    """
    if keys.device.type == "cpu":
        return _fill_budget_host(keys, lengths.cpu(), budget)
    return _fill_budget_device(keys, lengths, budget)


def _fill_budget_device(keys: torch.Tensor, lengths: torch.Tensor, budget: int) -> torch.Tensor:
    """``[rows, S]`` bool: walk each row's spans in rank order, taking every span that still fits.

    Args:
        keys: ``[rows, S]`` ranking keys (higher first; ties keep span order).
        lengths: ``[S]`` span lengths (>= 1), best kept on the host: the longest is read from it.
        budget: Token budget per row.

    The prefix of ranked spans that fits is taken at once; then the next ``_TAIL`` ranked spans are walked
    greedily, each taken if it fits in what is left. Everything stays on the keys' device, without a read-back:
    once the prefix stops, fewer tokens are left than the next span's length, so the tokens left during the walk
    take one of ``longest`` values, and step ``j`` of the walk is a map ``f_j`` on that small set of states
    (``s -> s - len_j`` if ``len_j <= s``, else ``s``). The state before each step is a prefix composition of
    those maps, computed in ``log2(_TAIL)`` gathers (a Hillis-Steele scan). Equal to the walk on the host.
    """
    rows, num_spans = keys.shape
    longest = int(lengths.max()) if num_spans else 1  # a host read when ``lengths`` lives on the host
    lengths = to_device(lengths, keys.device)
    order = torch.argsort(keys, dim=1, descending=True, stable=True)  # [R, S]
    ranked = lengths[order]  # [R, S]
    fits = torch.cumsum(ranked, dim=1) <= budget  # the prefix that fits (lengths >= 1)
    selected = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
    selected.scatter_(1, order, fits)
    prefix = fits.sum(dim=1)  # [R]
    used = (ranked * fits).sum(dim=1)  # [R] tokens in the prefix
    steps = torch.arange(_TAIL, device=keys.device)[None, :]  # [1, T]
    tail = (prefix[:, None] + steps).clamp(max=num_spans - 1)  # [R, T] ranks walked after the prefix
    tail_len = ranked.gather(1, tail)  # [R, T]
    in_walk = steps < (num_spans - prefix)[:, None]  # [R, T] ranks that exist
    # states 0 .. longest - 1 (tokens left); a row whose prefix took every span walks nothing, any state will do
    left0 = (budget - used).clamp(max=longest - 1)[:, None]  # [R, 1]
    state = torch.arange(longest, device=keys.device)[None, None, :]  # [1, 1, L]
    maps = torch.where(tail_len[:, :, None] <= state, state - tail_len[:, :, None], state)  # [R, T, L]: f_j
    shift = 1
    while shift < _TAIL:  # maps[:, j] becomes f_j o f_(j-1) o ... o f_0
        maps = torch.cat([maps[:, :shift], maps[:, shift:].gather(2, maps[:, :-shift])], dim=1)
        shift *= 2
    after = maps.gather(2, left0[:, :, None].expand(-1, _TAIL, 1))[:, :, 0]  # [R, T] tokens left after step j
    before = torch.cat([left0, after[:, :-1]], dim=1)  # [R, T] tokens left before step j
    take = (tail_len <= before) & in_walk  # [R, T]
    # spans walked but not taken go to a spare column (a span is walked at most once per row)
    target = torch.where(take, order.gather(1, tail), torch.full_like(tail, num_spans))
    extra = torch.zeros(rows, num_spans + 1, dtype=torch.bool, device=keys.device).scatter_(1, target, take)
    return selected | extra[:, :num_spans]


def _fill_budget_host(keys: torch.Tensor, lengths: torch.Tensor, budget: int) -> torch.Tensor:
    """:func:`_fill_budget` for host tensors, in NumPy: the same spans, without sorting every span.

    Only ranks up to ``budget // shortest + _TAIL`` can be taken (the prefix that fits holds at most
    ``budget // shortest`` spans), so the candidates are the spans whose key reaches the ``m``-th largest
    (``np.partition``, linear time), ordered by key then span index (the stable order of a full sort).
    """
    rows, num_spans = keys.shape
    selected = np.zeros((rows, num_spans), dtype=bool)
    if num_spans == 0 or budget <= 0:
        return torch.from_numpy(selected)
    k = keys.detach().double().numpy()
    lens = lengths.numpy().astype(np.int64)
    m = min(num_spans, budget // max(int(lens.min()), 1) + _TAIL + 1)
    for row in range(rows):
        key = k[row]
        if m < num_spans:
            threshold = np.partition(key, num_spans - m)[num_spans - m]  # the m-th largest
            cand = np.flatnonzero(key >= threshold)  # increasing span index: ties keep span order below
        else:
            cand = np.arange(num_spans)
        order = cand[np.argsort(-key[cand], kind="stable")]
        ranked = lens[order]
        prefix = int(np.searchsorted(np.cumsum(ranked), budget, side="right"))  # lengths >= 1: increasing sums
        selected[row, order[:prefix]] = True
        left = budget - int(ranked[:prefix].sum())
        for span, length in zip(order[prefix:prefix + _TAIL].tolist(), ranked[prefix:prefix + _TAIL].tolist()):
            if length <= left:
                selected[row, span] = True
                left -= length
    return torch.from_numpy(selected)


def update_recency(recency: torch.Tensor, selected: torch.Tensor, decay: float) -> torch.Tensor:
    """Persistence state after a selection: ``recency * decay + (selected by any row)``.

    Args:
        recency: ``[num_spans]`` float32.
        selected: ``[rows, num_spans]`` bool.
        decay: In ``[0, 1)``.
    """
    return recency * decay + selected.any(dim=0).float().to(recency.device)
