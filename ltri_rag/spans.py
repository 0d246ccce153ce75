"""Semantic span segmentation on the model's own local attention map (pure functions, no state).

The engine keeps, for every token in the local window, one row of the attention map restricted to a band of
``band_width`` keys before it (``band[i, o]`` = head-mean probability of query ``i`` on key ``i - o``). When tokens
leave the window, spans are cut on the bands of the evicted segment plus the rows after it (never the whole
context):

* triangle score ``S(x, y) = sum_{x <= j <= i <= y} (A[i, j] - theta_i)``, with ``theta_i = alpha * m_i / w_i``
  (``m_i`` the row's mass in its band, ``w_i`` the band's width: alpha times uniform attention over the band);
* cut ``C(x, y) = sum_{i > y} sum_{x <= j <= y} A[i, j]``: attention that later tokens still pay into the span,
  i.e. what cutting the text after ``y`` breaks;
* a candidate's rank is ``(S - C) / (y - x + 1)``; :func:`span_rank_band` (the engine's path) gets both terms from
  sums along the band, :func:`span_rank` (the reference) from 2-D prefix sums of the dense map
  (:func:`band_to_dense`);
* greedy non-maximum suppression keeps high-ranked, non-overlapping spans; gaps are filled with pieces no longer
  than ``max_len``, so the spans partition the segment.

A causal map is zero above the diagonal, so the triangle sum equals the square sum ``A[x:y+1, x:y+1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Spans",
    "band_to_dense",
    "row_thresholds",
    "span_rank",
    "triangle_scores",
    "nms_spans",
    "fill_gaps",
    "segment_triangle",
    "segment_triangle_batch",
    "segment_fixed",
]


@dataclass
class Spans:
    """A partition of a segment into spans.

    Attributes:
        starts: ``[num_spans]`` int64 start offsets (inclusive), relative to the segment start, increasing.
        ends: ``[num_spans]`` int64 end offsets (exclusive); ``starts[k+1] == ends[k]``.
        rank: ``[num_spans]`` float32 length-normalised score ``(S - C) / len`` of each span (0 for fixed blocks).
    """

    starts: torch.Tensor
    ends: torch.Tensor
    rank: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.ends - self.starts

    def __len__(self) -> int:
        return int(self.starts.numel())


def band_to_dense(band: torch.Tensor) -> torch.Tensor:
    """Dense causal map of a run of rows from their bands.

    Args:
        band: ``[num_rows, band_width]``; ``band[i, o]`` = probability of row ``i`` on key ``i - o``.

    Returns:
        ``[num_rows, num_rows]`` map ``A[i, j]``; keys before the first row are dropped.
    """
    num_rows, band_width = band.shape
    rows = torch.arange(num_rows, device=band.device)[:, None]
    cols = rows - torch.arange(band_width, device=band.device)[None, :]  # [num_rows, band_width]
    # fixed shapes, no boolean indexing (which reads a count back from the device): keys before the first row go
    # to a spare last column, dropped (within a row, the kept columns are distinct)
    cols = torch.where(cols >= 0, cols, num_rows)
    dense = torch.zeros(num_rows, num_rows + 1, dtype=band.dtype, device=band.device)
    dense.scatter_(1, cols, band)
    return dense[:, :num_rows]


def row_thresholds(band: torch.Tensor, alpha: float, first_row_pos: int = 0) -> torch.Tensor:
    """``theta_i = alpha * (row mass in band) / (keys in band)`` for each row.

    Args:
        band: ``[..., num_rows, band_width]`` (leading dims: a batch of independent runs of rows).
        alpha: Multiple of uniform attention over the band.
        first_row_pos: Absolute key index of row 0.

    Returns:
        ``[..., num_rows]`` thresholds.
    """
    num_rows, band_width = band.shape[-2:]
    pos = torch.arange(num_rows, device=band.device, dtype=band.dtype) + first_row_pos
    width = torch.clamp(pos + 1, max=band_width)
    return alpha * band.sum(dim=-1) / width


def _prefix2d(dense: torch.Tensor) -> torch.Tensor:
    p = torch.zeros(dense.shape[0] + 1, dense.shape[1] + 1, dtype=torch.float64, device=dense.device)
    p[1:, 1:] = dense.double().cumsum(0).cumsum(1)
    return p


def _rect(p: torch.Tensor, r0: torch.Tensor, r1: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """Sum of ``dense[r0:r1, c0:c1]`` (half-open) from its 2-D prefix sums, elementwise over index tensors."""
    return p[r1, c1] - p[r0, c1] - p[r1, c0] + p[r0, c0]


def _candidates(num_starts: int, min_len: int, max_len: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    x = torch.arange(num_starts, device=device)[:, None]  # [N, 1]
    n = torch.arange(min_len, max_len + 1, device=device)[None, :]  # [1, L']
    y1 = x + n  # exclusive end, [N, L']
    valid = y1 <= num_starts
    return x.expand_as(y1), n.expand_as(y1), y1.clamp(max=num_starts), valid


def triangle_scores(dense: torch.Tensor, theta: torch.Tensor, min_len: int, max_len: int) -> torch.Tensor:
    """Triangle scores ``S(x, x + n - 1)`` of every candidate inside the map.

    Args:
        dense: ``[num_rows, num_rows]`` causal attention map.
        theta: ``[num_rows]`` per-row threshold.
        min_len: Shortest candidate length.
        max_len: Longest candidate length.

    Returns:
        ``[num_rows, max_len - min_len + 1]`` float64; entry ``[x, n - min_len]`` scores ``[x, x + n)``;
        ``-inf`` where the span runs past the map.
    """
    p = _prefix2d(dense)
    x, n, y1, valid = _candidates(dense.shape[0], min_len, max_len, dense.device)
    mass = _rect(p, x, y1, x, y1)
    # sum_{i=x}^{y} theta_i * (i - x + 1) from prefix sums of theta and theta * i
    th = theta.double()
    idx = torch.arange(th.numel(), device=th.device, dtype=torch.float64)
    c0 = torch.zeros(th.numel() + 1, dtype=torch.float64, device=th.device)
    c1 = torch.zeros_like(c0)
    c0[1:] = th.cumsum(0)
    c1[1:] = (th * idx).cumsum(0)
    area = (c1[y1] - c1[x]) - (x.double() - 1.0) * (c0[y1] - c0[x])
    return torch.where(valid, mass - area, torch.full_like(mass, -float("inf")))


def span_rank(dense: torch.Tensor, theta: torch.Tensor, num_rows: int, min_len: int, max_len: int) -> torch.Tensor:
    """Length-normalised rank ``(S - C) / len`` of every candidate span inside the first ``num_rows`` rows.

    Args:
        dense: ``[total_rows, total_rows]`` map of the segment followed by the rows after it (which supply ``C``).
        theta: ``[num_rows]`` thresholds of the segment's rows.
        num_rows: Length of the segment (spans must end inside it).
        min_len: Shortest candidate length.
        max_len: Longest candidate length.

    Returns:
        ``[num_rows, max_len - min_len + 1]`` float64 ranks, ``-inf`` for candidates past the segment.
    """
    s = triangle_scores(dense[:num_rows, :num_rows], theta, min_len, max_len)
    p = _prefix2d(dense)
    x, n, y1, _ = _candidates(num_rows, min_len, max_len, dense.device)
    total = torch.full_like(y1, dense.shape[0])
    cut = _rect(p, y1, total, x, y1)
    return (s - cut) / n.double()



def _key_totals(b: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` column totals of band rows ``b [B, T, W]`` (``b[:, i, d]`` on key ``i - d``, zero where that is
    before key 0): key ``j`` sits at offset ``d`` of row ``j + d``, so its total is a sum along a diagonal. The keys
    whose diagonal stays inside the rows are read as one strided view, the last ``W - 1`` by a small gather: a sum in
    a fixed order on every device (an ``index_add_`` on CUDA adds in an order that varies from run to run, so its
    float rounding, and a near-tie between candidate spans, would too)."""
    batch, total, width = b.shape
    b = b.contiguous()
    bulk = max(total - width + 1, 0)
    column = b.as_strided((batch, bulk, width), (total * width, width, width + 1), b.storage_offset()).sum(2)
    keys = torch.arange(bulk, total, device=b.device)[:, None]  # [T - bulk, 1]
    offsets = torch.arange(width, device=b.device)[None, :]  # [1, W]
    rows = keys + offsets
    tail = torch.where(rows < total, b[:, rows.clamp(max=total - 1), offsets.expand_as(rows)], 0.0).sum(2)
    return torch.cat([column, tail], dim=1)


def span_rank_band(band: torch.Tensor, theta: torch.Tensor, num_rows: int, min_len: int,
                   max_len: int) -> torch.Tensor:
    """:func:`span_rank` computed from the band itself, without the dense map.

    The map is zero outside the band, so every sum the rank needs is a band sum: the triangle mass of ``[x, x + n)``
    is ``sum_t R[x + t, t]`` for ``t < n``, with ``R[i, d]`` the mass of row ``i`` on its keys ``[i - d, i]`` (a
    cumulative sum along the band), and the attention that later rows pay to the span (``C``) is the span's column
    totals minus that triangle. Work and memory are ``O(total_rows x band_width + num_rows x max_len)`` instead of
    the ``O(total_rows^2)`` dense map and its two-dimensional prefix sums (for a 2,048-token eviction, no float64 scan
    over 4M entries). Equal to :func:`span_rank` up to float64 rounding
    (``tests/unit/test_spans.py``).

    Args:
        band: ``[..., total_rows, band_width]``; ``band[i, o]`` = probability of row ``i`` on key ``i - o`` (keys
            before row 0 are ignored), rows of the segment followed by the rows after it. Leading dims are a batch
            of independent maps (e.g. every layer's, ranked at once).
        theta: ``[..., num_rows]`` thresholds of the segment's rows.
        num_rows: Length of the segment (spans must end inside it).
        min_len: Shortest candidate length (>= 1).
        max_len: Longest candidate length (>= ``min_len``).

    Returns:
        ``[..., num_rows, max_len - min_len + 1]`` float64 ranks, ``-inf`` for candidates past the segment.
    """
    lead = band.shape[:-2]
    total, width = band.shape[-2:]
    band = band.reshape(-1, total, width)  # [B, T, W]
    theta = theta.reshape(-1, theta.shape[-1])  # [B, N]
    batch = band.shape[0]
    dev = band.device
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    key = torch.arange(total, device=dev)[:, None] - torch.arange(width, device=dev)[None, :]  # [T, W]
    b = torch.where(key >= 0, band.double(), zero)  # [B, T, W]
    row_mass = b.cumsum(2)  # R[i, d], mass of row i on keys [i - d, i]
    x = torch.arange(num_rows, device=dev)[:, None]  # [N, 1]
    t = torch.arange(max_len, device=dev)[None, :]  # [1, L]
    rows = x + t  # [N, L]
    steps = row_mass[:, rows.clamp(max=total - 1), t.clamp(max=width - 1).expand_as(rows)]  # [B, N, L]
    steps = torch.where(rows < num_rows, steps, zero)
    mass = steps.cumsum(2)[:, :, min_len - 1:max_len]  # [B, N, L']: triangle mass of [x, x + n)
    column = _key_totals(b)  # [B, T] column totals
    zeros = torch.zeros(batch, 1, dtype=torch.float64, device=dev)
    col_prefix = torch.cat([zeros, column.cumsum(1)], dim=1)
    n = torch.arange(min_len, max_len + 1, device=dev)[None, :]  # [1, L']
    y1 = x + n
    valid = y1 <= num_rows
    y1 = y1.clamp(max=num_rows)
    # sum_{i=x}^{y} theta_i * (i - x + 1) from prefix sums of theta and theta * i (as in triangle_scores)
    th = theta.double()
    c0 = torch.cat([zeros, th.cumsum(1)], dim=1)
    c1 = torch.cat([zeros, (th * torch.arange(th.shape[1], device=dev, dtype=torch.float64)).cumsum(1)], dim=1)
    area = (c1[:, y1] - c1[:, x]) - (x.double() - 1.0) * (c0[:, y1] - c0[:, x])
    cut = (col_prefix[:, y1] - col_prefix[:, x]) - mass
    rank = (mass - area - cut) / n.double()
    rank = torch.where(valid, rank, torch.full_like(rank, -float("inf")))
    return rank.reshape(*lead, num_rows, -1)


def nms_spans(rank: torch.Tensor, min_len: int, min_score: float) -> list[tuple[int, int]]:
    """Greedy non-maximum suppression: best non-overlapping spans, best rank first.

    Each start keeps only its best length; candidates are then accepted in decreasing rank if they overlap no
    accepted span and rank above ``min_score``.

    Args:
        rank: ``[num_rows, num_lengths]`` from :func:`span_rank` (length = column + ``min_len``).
        min_len: Length of column 0.
        min_score: Acceptance threshold on the rank.

    Returns:
        Accepted ``(start, end_exclusive)`` pairs, sorted by start.
    """
    best, arg = rank.max(dim=1)
    host = torch.stack([best, arg.to(best.dtype)]).cpu().numpy()  # one read-back
    return _nms_host(host[0], host[1].astype(np.int64), min_len, min_score)


def _nms_host(best_np: np.ndarray, arg_np: np.ndarray, min_len: int, min_score: float) -> list[tuple[int, int]]:
    """:func:`nms_spans` from each start's best rank ``best_np [num_rows]`` and its column ``arg_np [num_rows]``
    (host arrays)."""
    len_np = arg_np + min_len
    order = np.argsort(-best_np, kind="stable")
    taken = np.zeros(best_np.shape[0], dtype=bool)
    accepted: list[tuple[int, int]] = []
    for x in order:
        if not best_np[x] > min_score:
            break
        y1 = int(x + len_np[x])
        if not taken[x:y1].any():
            taken[x:y1] = True
            accepted.append((int(x), y1))
    accepted.sort()
    return accepted


def fill_gaps(spans: list[tuple[int, int]], num_rows: int, max_len: int) -> list[tuple[int, int]]:
    """Complete sorted, non-overlapping spans to a partition of ``[0, num_rows)``.

    Each gap is cut into the fewest near-equal pieces no longer than ``max_len``.
    """
    out: list[tuple[int, int]] = []
    cursor = 0
    for start, end in [*spans, (num_rows, num_rows)]:
        gap = start - cursor
        if gap > 0:
            pieces = -(-gap // max_len)
            bounds = [cursor + (gap * k) // pieces for k in range(pieces + 1)]
            out.extend(zip(bounds[:-1], bounds[1:]))
        if end > start:
            out.append((start, end))
        cursor = end
    return out


def segment_triangle(
    band: torch.Tensor,
    num_rows: int,
    *,
    alpha: float,
    min_len: int,
    max_len: int,
    min_score: float,
    first_row_pos: int = 0,
) -> Spans:
    """Cut the first ``num_rows`` rows of a band into semantic spans.

    Args:
        band: ``[total_rows, band_width]`` bands of the segment's rows followed by any later rows.
        num_rows: Length of the segment to partition.
        alpha: Threshold multiple (see module docstring).
        min_len: Shortest NMS candidate.
        max_len: Longest span.
        min_score: NMS acceptance threshold on the rank.
        first_row_pos: Absolute key index of row 0.

    Returns:
        :class:`Spans` partitioning ``[0, num_rows)``.
    """
    return segment_triangle_batch(band[None], num_rows, alpha=alpha, min_len=min_len, max_len=max_len,
                                  min_score=min_score, first_row_pos=first_row_pos)[0]


PINNED_READ_BACK = True
"""Whether the segmentation's read-back from a GPU goes through page-locked buffers (False: ``.cpu()`` into pageable
memory, as before session 30; kept for comparisons)."""


def _read_back(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` on the host after one synchronisation. From a GPU they are copied into page-locked buffers
    (torch's cached pinned blocks): a copy into pageable memory goes through the driver's staging at a fraction of
    the rate (a 1M-token profile on the H200 timed this read-back's ~31 MB at 19.5 ms per prompt chunk)."""
    if not tensors[0].is_cuda or not PINNED_READ_BACK:
        return [t.cpu() for t in tensors]
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for dst, src in zip(host, tensors):
        dst.copy_(src, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def segment_triangle_batch(
    band: torch.Tensor,
    num_rows: int,
    *,
    alpha: float,
    min_len: int,
    max_len: int,
    min_score: float,
    first_row_pos: int = 0,
) -> list[Spans]:
    """:func:`segment_triangle` of several independent bands at once (e.g. every layer's, when they evict the same
    tokens): the ranking runs as one batch and its result comes back to the host in one copy; only the greedy
    NMS runs per band.

    Args:
        band: ``[batch, total_rows, band_width]``.
        num_rows: Length of the segment to partition (the same in every band).
        alpha, min_len, max_len, min_score, first_row_pos: As in :func:`segment_triangle`.

    Returns:
        One :class:`Spans` per band, each partitioning ``[0, num_rows)``.
    """
    if band.dim() != 3:
        raise ValueError(f"band must be [batch, total_rows, band_width], got shape {tuple(band.shape)}")
    if not 0 < num_rows <= band.shape[1]:
        raise ValueError(f"num_rows must be in [1, {band.shape[1]}], got {num_rows}")
    theta = row_thresholds(band[:, :num_rows].float(), alpha, first_row_pos)  # [B, N]
    lo = min(min_len, num_rows)
    hi = min(max_len, num_rows)
    rank = span_rank_band(band.float(), theta, num_rows, lo, hi)  # [B, N, L']
    # the only read-back of the segmentation: each start's best rank and its column (for the NMS), and the ranks
    # (each final span's, below; float32 on a GPU: that rank is used as float32, so the values are the same)
    best, arg = rank.max(dim=2)
    host_rank, host_best, host_arg = _read_back(rank.float() if rank.is_cuda else rank, best, arg)
    out = []
    for rank_b, best_b, arg_b in zip(host_rank, host_best, host_arg):
        pairs = fill_gaps(_nms_host(best_b.numpy(), arg_b.numpy(), lo, min_score), num_rows, max_len)
        bounds = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
        starts, ends = bounds[:, 0].contiguous(), bounds[:, 1].contiguous()
        # rank of each final span (gap pieces included), for dynamic index vectors
        lengths = ends - starts
        col = (lengths - lo).clamp(0, rank_b.shape[1] - 1)
        in_range = (lengths >= lo) & (lengths <= hi)
        r = rank_b[starts, col].float()
        out.append(Spans(starts=starts, ends=ends, rank=torch.where(in_range, r, torch.zeros_like(r))))
    return out


def segment_fixed(num_rows: int, block_size: int) -> Spans:
    """Fixed blocks of ``block_size`` (the last one shorter) partitioning ``[0, num_rows)``."""
    starts = torch.arange(0, num_rows, block_size, dtype=torch.int64)
    ends = torch.clamp(starts + block_size, max=num_rows)
    return Spans(starts=starts, ends=ends, rank=torch.zeros(starts.numel()))
