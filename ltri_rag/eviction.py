"""What evicted window tokens become: spans and their index vectors, for every global layer at once.

All global layers evict the same tokens at the same step, so their segmentations are computed as one batch: one
ranking of every layer's attention band (one read-back for all layers), one ranking of every layer's key mass, one
gather and one rotation of the chosen keys. Only the greedy NMS and the span bookkeeping run per layer. The result
equals the layer-by-layer computation (``tests/unit/test_eviction.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.profiler import record_function

from ltri_rag.config import LtriConfig
from ltri_rag.index_vectors import dynamic_counts, select_index_tokens_batch, static_counts
from ltri_rag.kernels.transfer import to_device
from ltri_rag.rope import rotate

if TYPE_CHECKING:
    from ltri_rag.layer import GlobalLayerState, StepPlan
from ltri_rag.spans import Spans, segment_fixed, segment_triangle_batch

__all__ = ["SegmentCut", "cut_segments", "evict_layers"]


@dataclass(frozen=True)
class SegmentCut:
    """One layer's evicted segment, cut into spans.

    Attributes:
        starts: ``[S]`` int64 span starts, offsets in the segment (host).
        ends: ``[S]`` int64 span ends (exclusive, host).
        vectors: ``[N, Hkv, D]`` position-free index vectors (the keys' device and dtype).
        owner: ``[N]`` int64 span of each vector (host).
    """

    starts: torch.Tensor
    ends: torch.Tensor
    vectors: torch.Tensor
    owner: torch.Tensor


def _segment(config: LtriConfig, band: torch.Tensor | None, num_tokens: int, num_layers: int,
             first_pos: int) -> list[Spans]:
    if config.segmentation != "triangle":
        return [segment_fixed(num_tokens, config.block_size)] * num_layers
    if band is None:
        raise ValueError("triangle segmentation needs the layers' attention bands")
    with record_function("ltri.segment_triangle"):
        return segment_triangle_batch(band, num_tokens, alpha=config.triangle_alpha, min_len=config.span_min_len,
                                      max_len=config.span_max_len, min_score=config.nms_min_score,
                                      first_row_pos=first_pos)


def _counts(config: LtriConfig, spans: Spans) -> torch.Tensor:
    if config.index_vectors == "dynamic":
        return dynamic_counts(spans.lengths, spans.rank, base=config.num_index_vectors,
                              minimum=config.min_index_vectors, maximum=config.max_index_vectors)
    return static_counts(spans.lengths, config.num_index_vectors)


def cut_segments(config: LtriConfig, keys: torch.Tensor, band: torch.Tensor | None, key_mass: torch.Tensor,
                 first_pos: int, inv_freqs: list[torch.Tensor]) -> list[SegmentCut]:
    """Cut the same evicted tokens of several layers into spans and pick their index vectors.

    Args:
        config: Engine configuration (segmentation, span lengths, index-vector counts).
        keys: ``[L, Hkv, n, D]`` the segment's keys per layer (RoPE at their positions).
        band: ``[L, rows, band_width]`` attention bands of the segment's rows and any rows after them
            (``triangle`` segmentation), or None.
        key_mass: ``[L, Hkv, n]`` attention each token received while in the window.
        first_pos: Position of the segment's first token.
        inv_freqs: Per layer, ``[rot_dim / 2]`` rotary inverse frequencies (layers sharing one tensor object are
            rotated together).

    Returns:
        One :class:`SegmentCut` per layer.
    """
    num_layers, num_kv_heads, num_tokens, _ = keys.shape
    if key_mass.shape != (num_layers, num_kv_heads, num_tokens) or len(inv_freqs) != num_layers:
        raise ValueError(f"key_mass {tuple(key_mass.shape)} / {len(inv_freqs)} inv_freqs do not match keys "
                         f"{tuple(keys.shape)}")
    spans = _segment(config, band, num_tokens, num_layers, first_pos)
    counts = [_counts(config, s) for s in spans]
    token_idx, owners = select_index_tokens_batch(key_mass, [(s.starts, s.ends, c) for s, c in zip(spans, counts)])
    sizes = [int(o.numel()) for o in owners]
    layer_of = torch.from_numpy(np.repeat(np.arange(num_layers), sizes))  # NumPy: see span_bookkeeping
    heads = torch.arange(num_kv_heads, device=keys.device)[None, :]
    vectors = keys[to_device(layer_of, keys.device)[:, None], heads, token_idx]  # [N, Hkv, D]
    shift = -(token_idx + first_pos)  # [N, Hkv]: back to position 0 (position-free)
    if all(f is inv_freqs[0] for f in inv_freqs):
        vectors = rotate(vectors, shift, inv_freqs[0])
        per_layer = vectors.split(sizes)
    else:
        per_layer = [rotate(v, d, f) for v, d, f in zip(vectors.split(sizes), shift.split(sizes), inv_freqs)]
    return [SegmentCut(s.starts, s.ends, v, o) for s, v, o in zip(spans, per_layer, owners)]


def evict_layers(states: list[GlobalLayerState], plan: StepPlan) -> None:
    """Evict the oldest ``plan.num_evict`` window tokens of every layer in ``states`` at once: in retrieving modes
    write them to the pool and cut them into spans (one batch over the layers, see :mod:`ltri_rag.eviction`), then
    drop them from the windows. The layers share one pool and one window layout (they absorb the same tokens)."""
    n = plan.num_evict
    if not n or not states:
        return
    first = states[0]
    if first.pool is not None:
        with record_function("ltri.evict_segment_store"):
            for state in states:
                state._ensure_tables(state.win_k)
            for seq in range(first.batch_size):
                _store_segments(states, seq, n, plan.first_slot)
    for state in states:
        state._drop_oldest(n)


def _store_segments(states: list[GlobalLayerState], seq: int, n: int, first_slot: int) -> None:
    """Write sequence ``seq``'s ``n`` oldest window tokens of every layer to the pool at ``first_slot`` on, and add
    their spans to the layers' tables."""
    first = states[0]
    keys = torch.stack([s.win_k[seq, :, :n] for s in states])  # [L, Hkv, n, D]
    values = torch.stack([s.win_v[seq, :, :n] for s in states])
    first.pool.write_layers([s.layer_idx for s in states], seq, first_slot, keys.transpose(1, 2),
                            values.transpose(1, 2))
    band = None
    if first.cfg.segmentation == "triangle":
        rows = min(first.win_band.shape[1], n + first.band_width - 1)
        band = torch.stack([s.win_band[seq, :rows] for s in states])  # [L, rows, band_width]
    mass = torch.stack([s.win_mass[seq, :, :n] for s in states])  # [L, Hkv, n]
    cuts = cut_segments(first.cfg, keys, band, mass, first.win_start, [s.inv_freq for s in states])
    for state, cut in zip(states, cuts):
        state.tables[seq].append(cut.starts + first_slot, cut.ends + first_slot, cut.vectors, cut.owner)
