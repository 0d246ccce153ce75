"""The floors the measured times are set against: FLOPs / ``--peak-tflops`` for a prefill (or one prefill chunk),
weight and K/V bytes / ``--hbm-tbps`` for a decode step."""

from __future__ import annotations

from benchmarks.e2e.models import ModelInfo
from benchmarks.e2e.modes import RETRIEVING
from ltri_rag import LtriConfig


def _held_keys(mode: str, engine: LtriConfig) -> int:
    """Keys an engine-mode token sees besides its own chunk: sinks + window (+ budget in the retrieving modes)."""
    return engine.num_sink_tokens + engine.local_window + (engine.budget if mode in RETRIEVING else 0)


def _flop_seconds(info: ModelInfo, tokens: float, pairs: float, peak_tflops: float) -> float:
    """Seconds at peak of ``tokens`` through the linear layers plus ``pairs`` query-key pairs of attention."""
    linear = 2.0 * info.layer_params * tokens
    per_key = 4.0 * info.num_layers * info.num_heads * info.head_dim
    return (linear + per_key * pairs) / (peak_tflops * 1e12)


def prefill_floor_seconds(info: ModelInfo, length: int, mode: str, engine: LtriConfig, peak_tflops: float) -> float:
    """FLOPs of a prefill of ``length`` tokens / peak: linear layers plus the attention each mode computes.

    ``full``: causal over everything. Engine modes: each token sees at most sinks + budget (retrieving modes) +
    window + half a chunk keys.
    """
    if mode == "full":
        keys = length * (length + 1) / 2
    else:
        cap = _held_keys(mode, engine) + engine.chunk_size / 2
        head = min(length, int(cap))
        keys = head * (head + 1) / 2 + (length - head) * cap
    return _flop_seconds(info, length, keys, peak_tflops)


def chunk_floor_ms(info: ModelInfo, mode: str, config: LtriConfig, peak_tflops: float) -> float:
    """FLOPs of one ``chunk_size`` pass over a full working set / peak, in ms."""
    chunk = config.chunk_size
    keys = _held_keys(mode, config) + chunk / 2
    return _flop_seconds(info, chunk, chunk * keys, peak_tflops) * 1e3


def decode_floor_ms(info: ModelInfo, context: int, mode: str, engine: LtriConfig, hbm_tbps: float
                    ) -> tuple[float, float]:
    """``(weights only, weights + the K/V one step reads)`` bytes / HBM bandwidth, in ms."""
    keys = context if mode == "full" else min(context, _held_keys(mode, engine))
    weights = info.weight_bytes / (hbm_tbps * 1e12) * 1e3
    return weights, weights + keys * info.kv_bytes_per_token / (hbm_tbps * 1e12) * 1e3
