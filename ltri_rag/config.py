"""One frozen configuration object for every mode of the engine.

Modes:
    ``full``       the unmodified Hugging Face model (the accuracy reference).
    ``streaming``  StreamingLLM: sink tokens + a local window; evicted tokens are dropped.
    ``infllm``     InfLLM: fixed blocks, a few representative keys each, top blocks per layer.
    ``ltri``       Ltri-LLM: semantic spans cut on the model's own attention map (triangle score + NMS),
                   dynamic index vectors, collaborative (voting) and persistent retrieval.

Fields left at ``None`` take the mode's default when the config is built (see ``_MODE_DEFAULTS``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

Mode = Literal["full", "streaming", "infllm", "ltri"]
PositionScheme = Literal["fixed", "contiguous", "absolute"]
Segmentation = Literal["triangle", "fixed"]
IndexVectors = Literal["static", "dynamic"]
RetrievalScope = Literal["shared", "per_kv_head"]
SpanScoring = Literal["dot", "softmax"]
Backend = Literal["torch", "triton", "auto"]
IndexPrecision = Literal["model", "int8"]

_MODES = ("full", "streaming", "infllm", "ltri")
_POSITION_SCHEMES = ("fixed", "contiguous", "absolute")
_SEGMENTATIONS = ("triangle", "fixed")
_INDEX_VECTORS = ("static", "dynamic")
_SCOPES = ("shared", "per_kv_head")
_SCORINGS = ("dot", "softmax")
_BACKENDS = ("torch", "triton", "auto")
_INDEX_PRECISIONS = ("model", "int8")

#: The opt-in speed preset (:meth:`LtriConfig.fast`): retrieve for one decoded token in 8. Off by default: its
#: quality did not pass the rule for a default change (a mean >= 0), though it passed the preset's rule.
FAST_PRESET: Mapping[str, Any] = MappingProxyType({"decode_retrieval_stride": 8})  # read-only

# Per-mode defaults for the fields declared ``None`` below.
_MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": dict(position_scheme="absolute", segmentation="fixed", index_vectors="static",
                 voting=False, persistence=False, span_scoring="dot", consensus_weight=0.0, lookahead=False),
    "streaming": dict(position_scheme="contiguous", segmentation="fixed", index_vectors="static",
                      voting=False, persistence=False, span_scoring="dot", consensus_weight=0.0, lookahead=False),
    "infllm": dict(position_scheme="fixed", segmentation="fixed", index_vectors="static",
                   voting=False, persistence=False, span_scoring="dot", consensus_weight=0.0, lookahead=False),
    "ltri": dict(position_scheme="contiguous", segmentation="triangle", index_vectors="dynamic",
                 voting=False, persistence=True, span_scoring="softmax", consensus_weight=0.5, lookahead=True),
}


@dataclass(frozen=True, kw_only=True)
class LtriConfig:
    """Configuration of the streaming long-context engine.

    Attributes:
        mode: Which attention scheme runs: ``full``, ``streaming``, ``infllm`` or ``ltri``.
        num_sink_tokens: Tokens at the start of the stream that every query always sees (InfLLM: 128).
        local_window: Most recent tokens each query sees with their true relative positions (InfLLM: 4096).
        chunk_size: Tokens fed to the model per forward pass during prefill (InfLLM: 512). The default, 2048, is
            the size every quality result was measured at (the dev-split tuning and the test grid); each pass costs
            the engine a fixed amount of host work per layer, so 512-token passes read a long prompt about 3x
            slower on a GPU (``benchmarks/results/e2e_llama8b_h200``).
        final_chunk_size: The last tokens of each prompt are read as a chunk of their own (at most this long), so
            that retrieval for the answer is driven by them (typically the question), not by a chunk of context.
        full_chunk_size: Mode ``full`` only: read prompts in pieces of this many tokens through transformers' own
            cache (the same attention, exact up to float rounding), which bounds the memory of transformers'
            attention masks on very long prompts (Gemma 3's sliding-window mask is ``seq_len^2`` bytes); None
            reads a prompt in one pass.
        budget: Tokens of retrieved spans each layer may load per chunk / decoded token (InfLLM: 16 x 128).
        evict_stride: Window overflow (tokens) that triggers an eviction; the window is cut back to
            ``local_window``. Keeps decode from cutting one-token spans. A prompt pass evicts whatever is over, so
            this acts on decoded tokens only. 256 since session 34 (was 64): each decode-time eviction costs its host
            work and a CUDA-graph capture (0.16-0.35 s on an H200, Llama-3-8B shape), now spread over 4x more
            tokens; quality on 192-token answers level (``benchmarks/results/evict_stride_h200``). On ~430-token
            answers, which cross an eviction at 256, 12 CPU pairs at 8K gave +3.7 points [-1.0, +8.9] for 256
            against 64 (session 35; ``benchmarks/results/longvalue48_h200_qwen``); not measured on the GPU yet.
        page_size: Tokens per page of the paged K/V pool that holds evicted tokens.
        kv_offload: Where the paged K/V pool of evicted tokens lives. ``"auto"`` (the default): on the model's
            device up to ``kv_device_gib``, pages beyond that in pinned host memory (a retrieval gathers device
            pages at HBM speed and copies host pages over PCIe); ``True``: all in (pinned) host memory; ``False``:
            all on the model's device, unbounded. On a CPU model the pool is host memory in every case.
        kv_device_gib: With ``kv_offload="auto"`` on a GPU: GiB of device memory the pool may take (every layer's
            K and V). None: 80% of the device memory free when the cache is built. A prompt's pool is sized
            once when it is fed (``LtriCache.expect_tokens``); otherwise the tier grows by doubling, one layer at a
            time (the freed smaller blocks stay in PyTorch's cache, which it empties before it would fail).
            Each cache takes its share of what is free when it is built, so several long sessions alive at once on
            one GPU can together ask for more than there is: give each its ``kv_device_gib`` then.
        segmentation: ``triangle`` (semantic spans, Ltri) or ``fixed`` (blocks of ``block_size``, InfLLM).
        block_size: Length of a fixed block (InfLLM: 128).
        span_min_len: Shortest semantic span a candidate may have.
        span_max_len: Longest span; gaps between accepted spans are filled with pieces no longer than this.
        triangle_alpha: Threshold of the triangle score relative to uniform attention:
            theta_i = triangle_alpha / (number of keys query i sees).
        nms_min_score: A candidate span is kept by NMS only if its length-normalised score exceeds this.
        index_vectors: ``static`` (``num_index_vectors`` per span) or ``dynamic`` (more for low-confidence spans).
        num_index_vectors: Index vectors per span (static), or the base count r0 (dynamic). InfLLM: 4.
        min_index_vectors: Lower clip of the dynamic count.
        max_index_vectors: Upper clip of the dynamic count.
        index_precision: How the span memory keeps index vectors for scoring: ``model`` (the model's dtype) or
            ``int8`` (int8 codes with one float32 scale per vector and KV head, each coordinate within half a step
            of its vector's grid): half the bytes every decoded token's scoring reads (at 1M tokens of an 8B model
            that is all ~8 GiB of vectors per token) and half their memory, at the cost of small score changes
            that can move spans at the budget's edge.
        retrieval_scope: ``shared`` (one selection per layer for all heads) or ``per_kv_head``.
        span_scoring: ``dot`` (InfLLM: mean query . best index vector) or ``softmax`` (each query's softmax over
            spans of its best-vector scores, averaged: sharp retrieval heads outweigh diffuse ones).
        score_queries: With ``span_scoring="softmax"``: at most this many of a chunk's queries are scored against the
            span memory (evenly spaced over the chunk, its last query always among them); None scores every query.
            A chunk's span distribution is the mean of its queries' softmaxes, so a subsample estimates the same mean,
            while scoring every query against every index vector makes a prefill's scoring work quadratic in its
            length (the engine's largest device cost beyond 128K tokens on an H200). Chunks and decoded tokens of at
            most this many queries (the prompt's final chunk, by default 16 tokens) are scored whole.
        mass_queries: At most this many of a prompt chunk's queries feed the attention mass each window token
            accumulates (which picks a span's dynamic index vectors): every ``ceil(q_len / mass_queries)``-th query
            counted back from the chunk's last, each weighted by that spacing; None: every query. The mass needs a
            second pass over the chunk's scores after the forward (it is normalised by each row's final LSE), which
            costs about half the forward; sampling cuts that pass by the spacing. Output, band and triangle scores
            are unchanged. 256 on an H200 (session 31): a 128K prompt chunk of an 8B model 101.4 -> 92.7 ms of
            device time; on the quality grid (Qwen-0.5B, 80 pairs per split) -1.0 points on the dev split, +5.0 on
            the test split, which misses the rule for a default (``benchmarks/results/key_mass_sampling_h200_qwen``).
        consensus_weight: Weight in [0, 1] of the cross-layer evidence (all layers' span distributions, spread
            over tokens) against the layer's own span distribution when ranking spans.
        lookahead: Read the last chunk of each prompt twice: a first pass only gathers every layer's evidence,
            so that the real pass ranks spans with all layers' votes (one extra chunk of compute per prompt).
        voting: Each query head votes for its own top spans; spans are ranked by votes, then score.
        persistence: Spans recalled recently keep a decaying bonus in later selections.
        persistence_bonus: Size of that bonus, in units of the score's standard deviation.
        persistence_decay: Factor by which the bonus decays at each retrieval step.
        pin_prompt_spans: While generating, every layer keeps the spans it retrieved for the prompt's last pass
            (typically the question) and fills the rest of the budget by each token's own retrieval. Guards
            against a needle dropping out of a layer half-way through copying it.
        pin_extra_budget: With ``pin_prompt_spans``: the pinned spans come on top of the budget (each decoded
            token still fills the whole budget by its own retrieval, so the working set grows by up to the
            prompt's selection while decoding) instead of within it.
        decode_retrieval_stride: While generating, retrieve spans for one decoded token in this many and reuse
            that memory part (the same spans' K/V, already placed) for the tokens in between. 1 (the default, as in
            the method) retrieves for every token; larger values trade recall for speed, since a decode step's
            retrieval (scoring, selection, gathering, re-rotation) costs several times its attention. A reused
            memory part is exact for the spans it holds: the window only grows between evictions, so the memory's
            positions do not move; an eviction (every ``evict_stride`` tokens) or a prompt pass ends the reuse.
            Quality grid (Qwen-0.5B, 80 pairs per split): -1.25 points at 4, -0.75 at 8 on the dev split (session
            31), -0.75 [-4.75, +3.75] at 8 on the test split (session 32), all in the longest answers
            (``benchmarks/results/decode_stride_h200_qwen``, ``fast_preset_h200``). 8 is :meth:`fast`'s setting.
        selection_on_device: Where a layer chooses its spans. ``"auto"`` (the default): on the model's device when
            the attention runs there in Triton (CUDA), on the host otherwise. False: on the host, after one
            read-back of the layer's span scores (ranking a few thousand spans is a few dozen NumPy operations, the
            cheaper way on a CPU). True: on the model's device whenever every page of the pool is readable from
            there, with fixed-width slot lists and nothing read back (the shape a captured CUDA graph needs). Both
            select the same spans, up to float rounding of the ranking keys. Before the selection kernels
            (:mod:`ltri_rag.kernels.triton_select`) and the one-launch memory assembly the host path was faster;
            with them, on an H200 (Llama-3-8B shape), the device path read a 128K-token prompt in 10.0 s against
            12.7 s in one run and 15.0 against 15.5 s in another (prompt reading is host-bound and its time moves
            by 20% between runs), and leaves the host free (``benchmarks/results/e2e_llama8b_h200/session18``).
        position_scheme: Positions of retrieved tokens: ``fixed`` (InfLLM: all at distance ``local_window``),
            ``contiguous`` (laid in order right before the local window), or ``absolute`` (their true positions,
            exact inside the trained window).
        attention_backend: Kernels of the local attention pass (the engine's largest) and of span scoring
            (``span_scoring="softmax"``, :func:`~ltri_rag.kernels.scoring.span_probabilities`, the largest cost at
            long context): ``torch`` (the plain-torch paths, everywhere), ``triton`` (CUDA tensors, or CPU under
            ``TRITON_INTERPRET=1``) or ``auto`` (the default: Triton on a CUDA device of compute capability 8.0 or
            later when triton imports, torch elsewhere, older GPUs included; every compiled-kernel test passed on an
            H200 and an H100, and the Triton local attention is 4-5x the torch path).
        decode_graph: On CUDA with the Triton backend, run decode steps as captured CUDA graphs: one replay
            instead of the host launching every layer's kernels (:mod:`ltri_rag.decode_graph`). With
            ``decode_retrieval_stride`` > 1 the steps that reuse the memory part; with ``decode_graph_retrieval`` the
            retrieving steps too. Not with the ``fixed`` position scheme or sliding-window layers, which stay eager.
            True by default.
        decode_graph_retrieval: With ``decode_graph``: retrieving decode steps select their spans on the device
            and are captured once per set of spans (an eviction changes the spans) and replayed until the next
            eviction, when every pool page is readable from the device: in its device tier, or, with
            ``zero_copy_host_pages``, in the pinned host tier of ``kv_offload="auto"`` (``kv_offload=True`` keeps
            them eager). True by default.
        zero_copy_host_pages: Let the GPU read and write the span pool's pinned host pages in place (Triton
            kernels over mapped host memory, :mod:`ltri_rag.kernels.triton_gather`) where they exist
            (``kv_offload=True``, or ``"auto"`` past the device tier, e.g. a 1M-token prompt of an 8B model on one
            GPU): evicted tokens are written by the device, with no synchronising device-to-host copy and no host
            scatter; selected rows are read by the device, with no host gather and staging copy; and device-side
            selection and retrieving graph-form decode steps keep running with pages in host memory. The results
            are bit for bit those of the staged copies. True by default: on an H200, a 128K prompt of an 8B model
            with a 4 GiB device tier read in 24.7 against 30.3 s (a prefill chunk's device time 119 against 353 ms)
            and decoded at 46 against 139 ms per token (``benchmarks/results/e2e_llama8b_h200/session16``). No
            effect without CUDA.
        host_cache_tokens: With pool pages in pinned host memory read in place (``zero_copy_host_pages``, CUDA):
            tokens per global layer of a device cache of host-tier rows that retrievals read (direct-mapped, all
            KV heads; :mod:`ltri_rag.kernels.triton_assemble`). A decode step retrieves mostly what the step
            before it did (Qwen2.5-0.5B, 16K tokens: 94% of its rows), so these come from HBM instead of over
            PCIe. Its memory (``2 * tokens * Hkv * head_dim`` elements per layer; 4 GiB for an 8B model at the
            default 32,768) is taken from the pool's device budget (at most a quarter of it), and allocated only
            once a layer has pages in host memory. 0: no cache. Results are the same with or without it.
    """

    mode: Mode = "ltri"
    num_sink_tokens: int = 128
    local_window: int = 4096
    chunk_size: int = 2048
    final_chunk_size: int = 16
    full_chunk_size: int | None = None
    budget: int = 2048
    evict_stride: int = 256
    page_size: int = 64
    kv_offload: bool | Literal["auto"] = "auto"
    kv_device_gib: float | None = None
    segmentation: Segmentation | None = None
    block_size: int = 128
    span_min_len: int = 8
    span_max_len: int = 64
    triangle_alpha: float = 1.0
    nms_min_score: float = 0.0
    index_vectors: IndexVectors | None = None
    num_index_vectors: int = 4
    min_index_vectors: int = 4
    max_index_vectors: int = 8
    index_precision: IndexPrecision = "model"
    retrieval_scope: RetrievalScope = "shared"
    span_scoring: SpanScoring | None = None
    score_queries: int | None = 256
    mass_queries: int | None = None
    consensus_weight: float | None = None
    lookahead: bool | None = None
    voting: bool | None = None
    persistence: bool | None = None
    persistence_bonus: float = 0.5
    persistence_decay: float = 0.5
    pin_prompt_spans: bool = False
    pin_extra_budget: bool = False
    decode_retrieval_stride: int = 1
    selection_on_device: bool | Literal["auto"] = "auto"
    position_scheme: PositionScheme | None = None
    attention_backend: Backend = "auto"
    decode_graph: bool = True
    decode_graph_retrieval: bool = True
    zero_copy_host_pages: bool = True
    host_cache_tokens: int = 32768

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        for name, value in _MODE_DEFAULTS[self.mode].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        self._check_choice("position_scheme", _POSITION_SCHEMES)
        self._check_choice("segmentation", _SEGMENTATIONS)
        self._check_choice("index_vectors", _INDEX_VECTORS)
        self._check_choice("retrieval_scope", _SCOPES)
        self._check_choice("span_scoring", _SCORINGS)
        self._check_choice("attention_backend", _BACKENDS)
        self._check_choice("index_precision", _INDEX_PRECISIONS)
        for name in ("num_sink_tokens", "budget"):
            self._check_int(name, minimum=0)
        for name in ("local_window", "chunk_size", "final_chunk_size", "evict_stride", "page_size", "block_size",
                     "span_min_len", "decode_retrieval_stride", "num_index_vectors", "min_index_vectors"):
            self._check_int(name, minimum=1)
        self._check_int("span_max_len", minimum=self.span_min_len)
        for name in ("full_chunk_size", "score_queries", "mass_queries"):
            if getattr(self, name) is not None:
                self._check_int(name, minimum=1)
        self._check_int("max_index_vectors", minimum=self.min_index_vectors)
        self._check_int("host_cache_tokens", minimum=0)
        if self.kv_offload != "auto" and not isinstance(self.kv_offload, bool):
            raise TypeError(f"kv_offload must be a bool or 'auto', got {self.kv_offload!r}")
        if self.kv_device_gib is not None:
            value = self.kv_device_gib
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise TypeError(f"kv_device_gib must be a finite number or None, got {value!r}")
            if value < 0:
                raise ValueError(f"kv_device_gib must be >= 0, got {value!r}")
        if self.selection_on_device != "auto" and not isinstance(self.selection_on_device, bool):
            raise TypeError(f"selection_on_device must be a bool or 'auto', got {self.selection_on_device!r}")
        for name in ("voting", "persistence", "lookahead", "pin_prompt_spans", "pin_extra_budget", "decode_graph",
                     "decode_graph_retrieval", "zero_copy_host_pages"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("triangle_alpha", "persistence_bonus", "nms_min_score", "persistence_decay",
                     "consensus_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
        for name in ("triangle_alpha", "persistence_bonus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.consensus_weight <= 1.0:
            raise ValueError(f"consensus_weight must be in [0, 1], got {self.consensus_weight!r}")
        if not 0.0 <= self.persistence_decay < 1.0:
            raise ValueError(f"persistence_decay must be in [0, 1), got {self.persistence_decay!r}")
        if self.mode == "infllm" and self.segmentation != "fixed":
            raise ValueError(f"mode 'infllm' uses fixed blocks; segmentation={self.segmentation!r} is not allowed")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    def _check_int(self, name: str, *, minimum: int) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")

    @property
    def max_unit_len(self) -> int:
        """Longest unit (span or block) the segmentation can produce."""
        return self.block_size if self.segmentation == "fixed" else self.span_max_len

    def mass_step(self, q_len: int) -> int:
        """Spacing of the queries of a ``q_len``-query pass whose attention feeds the key mass (``mass_queries``):
        1 (every query) without a limit or when the pass has at most that many queries."""
        limit = self.mass_queries
        if limit is None or q_len <= limit:
            return 1
        return -(-q_len // limit)

    @classmethod
    def fast(cls, **overrides: Any) -> LtriConfig:
        """The opt-in speed preset: :data:`FAST_PRESET` on top of the defaults, then ``overrides``.

        A decoded token in 8 retrieves (``decode_retrieval_stride=8``); the 7 after it reuse its memory part, so
        what grows with the context in a decode step (scoring every index vector, the selection sorts, reading
        host-tier pages) is paid once in 8 tokens. Prompts are read exactly as by the defaults.

        Measured in session 32 (``benchmarks/results/fast_preset_h200``), with a rule fixed before the run:

        - Time per token on one H200, Llama-3-8B shape: 10.6 / 10.8 / 11.6 ms at 8K / 128K / 1M tokens against
          14.7 / 14.6 / 21.6 ms for the defaults, same call: 1.09x from 8K to 1M, against 1.47x.
        - Quality (Qwen2.5-0.5B, ``niah_multikey`` and ``vt`` at 16K / 32K, 80 pairs per split): -0.75 points
          [-3.00, +1.25] on the dev split and -0.75 [-4.75, +3.75] on the test split, all in the longest answers.
          Those answers are at most 40 tokens.
        - **Long answers lose quality at 32K** (session 34, ``benchmarks/results/longvalue_h200_qwen``):
          ``niah_longvalue`` (192-token answers over decode-time evictions, 16K / 32K, 40 pairs per split) gave
          +0.2 points [-4.7, +5.3] on the dev split but -5.5 [-10.5, 0.0] on the test split, -9.4 [-17.5, -1.3] at
          32K on test, with decoding 1.6x faster. For long generations over long contexts, prefer the defaults.

        Any field can still be set, e.g. ``LtriConfig.fast(budget=4096)``; unknown fields raise ``TypeError`` as
        in the constructor.
        """
        return cls(**{**FAST_PRESET, **overrides})

    @property
    def retrieves(self) -> bool:
        """Whether evicted tokens are kept and retrieved (``infllm``, ``ltri``)."""
        return self.mode in ("infllm", "ltri")

    def replace(self, **changes: Any) -> LtriConfig:
        """Return a copy with some fields changed (validated again).

        When ``mode`` changes, fields still at the old mode's default take the new mode's default.
        """
        new_mode = changes.get("mode", self.mode)
        if new_mode != self.mode and new_mode in _MODE_DEFAULTS:
            for name, value in _MODE_DEFAULTS[self.mode].items():
                if name not in changes and getattr(self, name) == value:
                    changes[name] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LtriConfig:
        """Build a config from ``to_dict`` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LtriConfig fields: {unknown}")
        return cls(**data)
