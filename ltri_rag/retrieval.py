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
:func:`select_spans` has two paths that select the same spans:
    host (``scores`` a contiguous float32 CPU tensor): NumPy for the element-wise work and the fill, so that a call
    costs a handful of torch reductions instead of some forty small torch operations (mostly dispatch overhead);
    torch (:func:`_select_spans_torch`, everything else, e.g. CUDA scores): torch operations only, and for device
    keys a fill without a read-back (:func:`_fill_budget_device`).
"""

from __future__ import annotations

import numpy as np
import torch

from ltri_rag.config import LtriConfig
from ltri_rag.kernels.transfer import to_device
from ltri_rag.kernels.triton_select import fill_ranked, rank_keys, update_recency_triton
from ltri_rag.kernels.triton_select import triton_available as _fill_kernel_available
from ltri_rag.kernels.triton_sort_fill import MAX_CANDIDATES, candidates_needed, sort_fill

__all__ = ["query_summary", "scored_queries", "select_spans", "select_spans_pair", "update_recency"]


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
    prior: torch.Tensor | None, prior_weight: float, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[rows, num_spans]`` ranking keys from ``[num_heads, num_spans]`` scores (CUDA scores without votes: two
    Triton launches, :func:`ltri_rag.kernels.triton_select.rank_keys`, equal up to float32 rounding). ``out``: a
    float32 ``[rows, num_spans]`` tensor those launches write into (the torch path ignores it)."""
    num_heads, num_spans = scores.shape
    if FUSED_RANK and not voting and scores.is_cuda and _fill_kernel_available():
        uses_prior = prior is not None and prior_weight > 0
        uses_recency = recency is not None and bonus > 0
        return rank_keys(scores.float(), rows, prior.to(scores.device).float() if uses_prior else None, prior_weight,
                         recency.to(scores.device).float() if uses_recency else None, bonus, out=out)
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
    device_lengths: torch.Tensor | None = None,
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
        device_lengths: ``lengths`` already on ``scores``' device, for device scores (the torch path then copies
            nothing from the host; see :meth:`~ltri_rag.span_memory.SpanTable.geometry_on`).

    Returns:
        ``[rows, num_spans]`` bool, ``rows`` = 1 (shared) or ``num_kv_heads``, on ``scores``' device.

    Contiguous float32 host scores (with float32 ``recency``, if it counts) take the host path
    (:func:`_select_spans_host`); all others the torch path (:func:`_select_spans_torch`). Both select the same
    spans.
    """
    kwargs = dict(num_kv_heads=num_kv_heads, scope=scope, voting=voting, recency=recency, bonus=bonus, prior=prior,
                  prior_weight=prior_weight, pinned=pinned)
    if _host_path(scores, recency, bonus):
        return _select_spans_host(scores, lengths, budget, **kwargs)
    return _select_spans_torch(scores, lengths, budget, device_lengths=device_lengths, **kwargs)


def _host_path(scores: torch.Tensor, recency: torch.Tensor | None, bonus: float) -> bool:
    """Whether :func:`select_spans` takes the host path: contiguous float32 CPU scores (and float32 ``recency``
    where it counts)."""
    uses_recency = recency is not None and bonus > 0
    return (scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.is_contiguous()
            and not (uses_recency and recency.dtype != torch.float32))


def _selection_rows(scope: str, num_kv_heads: int) -> int:
    """Rows of a selection: 1 (``shared``) or ``num_kv_heads`` (``per_kv_head``)."""
    if scope not in ("shared", "per_kv_head"):
        raise ValueError(f"scope must be 'shared' or 'per_kv_head', got {scope!r}")
    return 1 if scope == "shared" else num_kv_heads


def _select_spans_torch(
    scores: torch.Tensor, lengths: torch.Tensor, budget: int, *, num_kv_heads: int, scope: str = "shared",
    voting: bool = False, recency: torch.Tensor | None = None, bonus: float = 0.0, prior: torch.Tensor | None = None,
    prior_weight: float = 0.0, pinned: torch.Tensor | None = None, device_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`select_spans` in torch operations on ``scores``' device (any device and float dtype): the reference
    of the host path. Same arguments and result."""
    rows = _selection_rows(scope, num_kv_heads)
    num_spans = scores.shape[1]
    if num_spans == 0:
        return torch.zeros(rows, 0, dtype=torch.bool, device=scores.device)
    keys = _selection_keys(scores, lengths, budget, rows, voting, recency, bonus, prior, prior_weight, pinned)
    return _fill_budget(keys, lengths, budget, device_lengths)


def _selection_keys(scores: torch.Tensor, lengths: torch.Tensor, budget: int, rows: int, voting: bool,
                    recency: torch.Tensor | None, bonus: float, prior: torch.Tensor | None, prior_weight: float,
                    pinned: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[rows, S]`` ranking keys of :func:`_select_spans_torch`, pinned spans lifted. ``out``: a float32
    ``[rows, S]`` tensor the Triton ranking writes into (then it is returned; other paths return a new tensor)."""
    # read on the host: span tables keep their lengths there (no device sync)
    top_k = max(1, int(budget / max(float(lengths.float().mean()), 1.0)))
    keys = _rank_keys(scores, rows, recency, bonus, voting, top_k, prior, prior_weight,
                      out=out if pinned is None else None)
    if pinned is not None:
        # above every unpinned key (keys are z-scores, or votes + sigmoid), order among the pinned kept
        lift = keys.abs().max() + float(scores.shape[0]) + 1.0
        keys = keys + lift * 2 * pinned.to(keys.device)[None, :].float()
    return keys


PAIRED_SORT = True
"""Whether :func:`select_spans_pair` ranks and fills both selections of a device layer together (one sort of
``2 * rows`` rows, one fill) instead of one after the other (the same spans: rows are ranked independently)."""


def select_spans_pair(
    scores: torch.Tensor, lengths: torch.Tensor, budget: int, *, prior: torch.Tensor | None, prior_weight: float,
    num_kv_heads: int, scope: str = "shared", voting: bool = False, recency: torch.Tensor | None = None,
    bonus: float = 0.0, pinned: torch.Tensor | None = None, device_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's two selections under cross-layer consensus: ``(own, mixed)``, :func:`select_spans` without the
    prior (the layer's votes) and with it (what it loads). Same arguments as :func:`select_spans`.

    Both selections rank the same spans by keys that do not depend on each other, so on the torch path (device
    scores) their keys go into one ``[2 * rows, S]`` tensor that is sorted and filled once: one segmented sort
    instead of two (at 16K spans a sort is ~40 µs on an H200, mostly latency) and half the launches. Each row is
    ranked on its own (stable sort, per-row fill), so both results equal :func:`select_spans`'s, bit for bit. Host
    scores, or no prior (``prior`` None or ``prior_weight <= 0``: then ``mixed`` is ``own``), select as before.
    On an H200 (``bench_small_kernels``, session 23) the pair took 33 / 125 µs against 52 / 161 apart at 128 / 16K
    spans, but 222 against 174 at 64K spans (4M tokens), measured before :func:`_row_sums` scanned two long rows
    flat.
    """
    kwargs = dict(num_kv_heads=num_kv_heads, scope=scope, voting=voting, recency=recency, bonus=bonus,
                  pinned=pinned, device_lengths=device_lengths)
    if prior is None or prior_weight <= 0 or _host_path(scores, recency, bonus) or not PAIRED_SORT:
        own = select_spans(scores, lengths, budget, **kwargs)
        if prior is None or prior_weight <= 0:
            return own, own
        return own, select_spans(scores, lengths, budget, prior=prior, prior_weight=prior_weight, **kwargs)
    rows = _selection_rows(scope, num_kv_heads)
    num_spans = scores.shape[1]
    if num_spans == 0:
        empty = torch.zeros(rows, 0, dtype=torch.bool, device=scores.device)
        return empty, empty.clone()
    keys = torch.empty(2 * rows, num_spans, dtype=torch.float32, device=scores.device)
    halves = keys[:rows], keys[rows:]  # the Triton ranking writes into them; other paths give new tensors
    own = _selection_keys(scores, lengths, budget, rows, voting, recency, bonus, None, 0.0, pinned, out=halves[0])
    mixed = _selection_keys(scores, lengths, budget, rows, voting, recency, bonus, prior, prior_weight, pinned,
                            out=halves[1])
    if own is not halves[0] or mixed is not halves[1]:
        keys = torch.cat([own, mixed])
    both = _fill_budget(keys, lengths, budget, device_lengths)  # [2 * rows, S]
    return both[:rows], both[rows:]


def _select_spans_host(
    scores: torch.Tensor, lengths: torch.Tensor, budget: int, *, num_kv_heads: int, scope: str = "shared",
    voting: bool = False, recency: torch.Tensor | None = None, bonus: float = 0.0, prior: torch.Tensor | None = None,
    prior_weight: float = 0.0, pinned: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`select_spans` for contiguous float32 host ``scores`` (and float32 ``recency`` if ``bonus > 0``): the
    keys of :func:`_rank_keys` bit for bit (:func:`_rank_keys_host`), ranked and filled by :func:`_fill_rows`.
    Same arguments; returns the same ``[rows, num_spans]`` bool host tensor as :func:`_select_spans_torch`."""
    rows = _selection_rows(scope, num_kv_heads)
    num_heads, num_spans = scores.shape
    if num_spans == 0:
        return torch.zeros(rows, 0, dtype=torch.bool)
    top_k = 0
    if voting:  # the same float32 mean as the torch path (a torch sum, in its order)
        top_k = max(1, int(budget / max(float(lengths.float().mean()), 1.0)))
    keys = _rank_keys_host(scores.detach(), rows, recency, bonus, voting, top_k, prior, prior_weight)
    if pinned is not None:  # as in the torch path, in float32: keys + ((max |key| + num_heads + 1) * 2) * pinned
        lift = np.abs(keys).max() + np.float32(num_heads) + np.float32(1.0)
        keys = keys + lift * np.float32(2.0) * pinned.detach().cpu().numpy().astype(np.float32)[None, :]
    lens = lengths.detach().cpu().numpy().astype(np.int64, copy=False)
    return torch.from_numpy(_fill_rows(keys, lens, budget))


def _zscore_host(x: torch.Tensor) -> np.ndarray:
    """:func:`_zscore` of a float32 host tensor, as float32 NumPy, bit for bit: the mean and the std are torch's own
    reductions of ``x`` itself (their summation order is torch's: SIMD lanes, threads; NumPy sums in another
    order, which moves the last bits and with them the order of near-ties); the element-wise rest is NumPy, in the
    same float32 operations."""
    mean = x.mean(dim=-1, keepdim=True).numpy()
    std = x.std(dim=-1, keepdim=True, unbiased=False).numpy()
    return (x.numpy() - mean) / (std + np.float32(1e-6))


def _rank_keys_host(
    scores: torch.Tensor, rows: int, recency: torch.Tensor | None, bonus: float, voting: bool, top_k: int,
    prior: torch.Tensor | None, prior_weight: float,
) -> np.ndarray:
    """:func:`_rank_keys` for contiguous float32 host ``scores``: the same ``[rows, num_spans]`` float32 keys, bit for
    bit, as a NumPy array.

    NumPy does the element-wise float32 arithmetic, in the torch path's order (IEEE operations round alike); what
    depends on torch's internal order stays torch, called on the same tensors (same values, same layout): the
    means over heads and spans, the std, the vote's ``topk`` (which of tied scores it takes) and ``sigmoid``
    (whose vectorised ``exp`` is torch's own).
    """
    num_heads, num_spans = scores.shape
    s = scores.numpy()
    if not (np.isfinite(s.min()) and np.isfinite(s.max())):  # (a NaN makes both NaN)
        # spans without vectors (-inf) rank below every scored span: the floor of _rank_keys
        nonfinite = ~np.isfinite(s)
        big = np.finfo(np.float32).max
        s = s.copy()
        np.copyto(s, big, where=nonfinite)
        low = s.min()  # the lowest finite score, or big
        np.copyto(s, low - np.float32(1.0) if low < big else np.float32(0.0), where=nonfinite)
    grouped = torch.from_numpy(s).view(rows, num_heads // rows, num_spans)  # [R, G, S]
    z = _zscore_host(grouped.mean(dim=1))  # [R, S]
    if prior is not None and prior_weight > 0:
        zp = _zscore_host(prior.detach().to("cpu").float())
        z = np.float32(1.0 - prior_weight) * z + np.float32(prior_weight) * zp[None, :]
    if recency is not None and bonus > 0:
        z = z + np.float32(bonus) * recency.detach().cpu().numpy()[None, :]
    if not voting:
        return z
    k = min(top_k, num_spans)
    top = grouped.topk(k, dim=2).indices.reshape(rows, -1).numpy()  # [R, G * k]
    top = top + (np.arange(rows) * num_spans)[:, None]
    votes = np.bincount(top.ravel(), minlength=rows * num_spans).reshape(rows, num_spans).astype(np.float32)
    return votes + torch.sigmoid(torch.from_numpy(np.ascontiguousarray(z))).numpy()


FILL_TAIL = 64
"""Ranked spans after the prefix that the greedy budget fill still tries."""
_TAIL = FILL_TAIL

FUSED_FILL = True
"""Whether span selection on CUDA runs its budget fill after the sort as one Triton launch
(:func:`ltri_rag.kernels.triton_select.fill_ranked`, the same spans) instead of the torch operations of
:func:`_fill_budget_device`; False keeps the torch path (for comparisons)."""

SORT_FILL = True
"""Whether span selection on CUDA sorts and fills rows of up to ``SORT_FILL_MAX_SPANS`` spans in one Triton launch
(:func:`ltri_rag.kernels.triton_sort_fill.sort_fill`, one program per row; the same spans) instead of torch's segmented
sort, a gather, a scan and :func:`fill_ranked`; False keeps those (for comparisons)."""
SORT_FILL_MAX_SPANS = 1024  # H200, a layer's two selections: 1.35-1.72x at 64-1,024 spans, 1.01x at 2,048
SORT_FILL_ROUNDS = True
"""With ``SORT_FILL``: longer rows too, cut down to their best ranks by rounds of chunk sorts first (when the fill
reads at most ``MAX_CANDIDATES`` ranks); False sorts them with torch."""
_SORT_FILL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # widened to float32 without new ties

FUSED_RANK = True
"""Whether span selection on CUDA computes its ranking keys (without votes) in two Triton launches
(:func:`ltri_rag.kernels.triton_select.rank_keys`, equal up to float32 rounding) instead of the torch operations
of :func:`_rank_keys`; False keeps the torch path (for comparisons)."""


def _fill_budget(keys: torch.Tensor, lengths: torch.Tensor, budget: int,
                 device_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, S]`` bool: walk each row's spans in rank order, taking every span that still fits (the prefix of
    ranked spans that fits, then up to ``_TAIL`` more ranks), on the keys' device (see :func:`_fill_budget_host`
    and :func:`_fill_budget_device`).

    Args:
        keys: ``[rows, S]`` ranking keys (higher first; ties keep span order).
        lengths: ``[S]`` span lengths (>= 1), best kept on the host.
        budget: Token budget per row.
        device_lengths: ``lengths`` on the keys' device, if the caller has them there.
    """
    if keys.device.type == "cpu" and device_lengths is None:
        return _fill_budget_host(keys, lengths.cpu(), budget)
    return _fill_budget_device(keys, lengths, budget, device_lengths)


def _fill_budget_device(keys: torch.Tensor, lengths: torch.Tensor, budget: int,
                        device_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``[rows, S]`` bool: walk each row's spans in rank order, taking every span that still fits.

    Args:
        keys: ``[rows, S]`` ranking keys (higher first; ties keep span order).
        lengths: ``[S]`` span lengths (>= 1), best kept on the host: the longest is read from it.
        budget: Token budget per row.
        device_lengths: ``lengths`` already on the keys' device (nothing is then copied from the host).

    The prefix of ranked spans that fits is taken at once; then the next ``_TAIL`` ranked spans are walked
    greedily, each taken if it fits in what is left. Everything stays on the keys' device, without a read-back:
    once the prefix stops, fewer tokens are left than the next span's length, so the tokens left during the walk
    take one of ``longest`` values, and step ``j`` of the walk is a map ``f_j`` on that small set of states
    (``s -> s - len_j`` if ``len_j <= s``, else ``s``). The state before each step is a prefix composition of
    those maps, computed in ``log2(_TAIL)`` gathers (a Hillis-Steele scan). Equal to the walk on the host.
    """
    rows, num_spans = keys.shape
    host_lengths = lengths
    lengths = to_device(lengths, keys.device) if device_lengths is None else device_lengths
    if SORT_FILL and keys.is_cuda and keys.dtype in _SORT_FILL_DTYPES and _fill_kernel_available():
        if num_spans <= SORT_FILL_MAX_SPANS:
            return sort_fill(keys.float(), lengths.long(), budget, _TAIL)
        if SORT_FILL_ROUNDS and host_lengths.device.type == "cpu":
            needed = candidates_needed(host_lengths, budget, _TAIL, key=device_lengths)  # host, remembered
            if needed <= MAX_CANDIDATES:
                return sort_fill(keys.float(), lengths.long(), budget, _TAIL, candidates=needed)
    order = torch.argsort(keys, dim=1, descending=True, stable=True)  # [R, S]
    ranked = lengths[order]  # [R, S]
    if FUSED_FILL and keys.is_cuda and _fill_kernel_available():
        return fill_ranked(order, ranked.long(), _row_sums(ranked), budget, _TAIL)
    longest = int(host_lengths.max()) if num_spans else 1  # a host read when ``lengths`` lives on the host
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


FLAT_ROW_SUMS = True
"""Whether :func:`_row_sums` of several long rows scans them as one flat array (then subtracts each row's start)
instead of torch's scan along the rows' inner dimension; False keeps the direct scan (for comparisons)."""
_FLAT_FROM = 4096  # spans per row from which several rows are scanned flat


def _row_sums(ranked: torch.Tensor) -> torch.Tensor:
    """``[R, S]`` int64 running sums of ``ranked`` along each row, the same integers as
    ``torch.cumsum(ranked, dim=1)``. Several rows of ``_FLAT_FROM`` or more spans (a paired selection at 1M tokens:
    2 x 16K) are scanned as one flat array, minus the total of the rows before each row: on CUDA torch scans a
    single row with a device-wide scan (~2.5 µs at 16K on an H200) but several rows along their inner dimension
    with a kernel that took 26 µs for 2 x 16K (``profile_decode_graph`` at 1M tokens, session 23)."""
    rows, num_spans = ranked.shape
    if not (FLAT_ROW_SUMS and rows > 1 and num_spans >= _FLAT_FROM):
        return torch.cumsum(ranked, dim=1, dtype=torch.int64)
    flat = torch.cumsum(ranked.reshape(-1), dim=0, dtype=torch.int64).view(rows, num_spans)
    before = torch.nn.functional.pad(flat[:-1, -1], (1, 0))  # [R] the total of the rows before each row
    return flat - before[:, None]


def _fill_budget_host(keys: torch.Tensor, lengths: torch.Tensor, budget: int) -> torch.Tensor:
    """:func:`_fill_budget` for host tensors, in NumPy (:func:`_fill_rows`)."""
    lens = lengths.numpy().astype(np.int64, copy=False)
    return torch.from_numpy(_fill_rows(keys.detach().double().numpy(), lens, budget))  # any float dtype


def _fill_rows(keys: np.ndarray, lengths: np.ndarray, budget: int) -> np.ndarray:
    """``[rows, S]`` bool: :func:`_fill_budget` on NumPy arrays, without sorting every span.

    Args:
        keys: ``[rows, S]`` float ranking keys (higher first; ties keep span order).
        lengths: ``[S]`` int64 span lengths (>= 1).
        budget: Token budget per row.

    Only the first ``prefix + _TAIL`` ranks are read (``prefix``: the ranked spans that fit), and ``prefix`` is at
    most ``budget // shortest``. So each row ranks only candidates: the spans whose key reaches the ``m``-th
    largest (``np.partition``, linear time), ordered by key then span index (the stable order of a full sort).
    ``m`` is first a guess from the mean length (twice the spans of a mean length the budget holds); when the
    ranks needed run past the candidates, the row is ranked again with the bound ``budget // shortest``.
    """
    rows, num_spans = keys.shape
    selected = np.zeros((rows, num_spans), dtype=bool)
    if num_spans == 0 or budget <= 0:
        return selected
    bound = min(num_spans, budget // max(int(lengths.min()), 1) + _TAIL + 1)
    guess = min(bound, 2 * budget * num_spans // max(int(lengths.sum()), 1) + _TAIL + 1)
    for row in range(rows):
        key = keys[row]
        for m in (guess, bound):
            if m < num_spans:
                threshold = np.partition(key, num_spans - m)[num_spans - m]  # the m-th largest
                cand = np.flatnonzero(key >= threshold)  # increasing span index: ties keep span order below
            else:
                cand = np.arange(num_spans)
            order = cand[np.argsort(-key[cand], kind="stable")]
            ranked = lengths[order]
            filled = np.cumsum(ranked)
            prefix = int(np.searchsorted(filled, budget, side="right"))  # lengths >= 1: increasing sums
            if order.size == num_spans or prefix + _TAIL <= order.size:  # every rank the walk reads is ranked
                break
        selected[row, order[:prefix]] = True
        left = budget - (int(filled[prefix - 1]) if prefix else 0)
        tail, tail_len = order[prefix:prefix + _TAIL], ranked[prefix:prefix + _TAIL]
        # walk the next ranks greedily; a span longer than what is left at the start never fits later
        for j in np.flatnonzero(tail_len <= left).tolist():
            length = int(tail_len[j])
            if length <= left:
                selected[row, tail[j]] = True
                left -= length
    return selected


FUSED_RECENCY = True
"""Whether :func:`update_recency` of CUDA tensors runs as one Triton launch
(:func:`ltri_rag.kernels.triton_select.update_recency_triton`, the same bits) instead of four torch operations;
False keeps the torch path (for comparisons)."""


def update_recency(recency: torch.Tensor, selected: torch.Tensor, decay: float) -> torch.Tensor:
    """Persistence state after a selection: ``recency * decay + (selected by any row)``.

    Args:
        recency: ``[num_spans]`` float32.
        selected: ``[rows, num_spans]`` bool.
        decay: In ``[0, 1)``.
    """
    if (FUSED_RECENCY and recency.is_cuda and selected.device == recency.device and recency.dtype == torch.float32
            and _fill_kernel_available()):
        return update_recency_triton(recency, selected, decay)
    return recency * decay + selected.any(dim=0).float().to(recency.device)
