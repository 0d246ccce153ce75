"""End-to-end speed of the engine against Hugging Face full attention: prefill, decode, memory, time split.

    python -m benchmarks.bench_e2e --model llama3-8b-random --lengths 32768 131072 \\
        --decode-lengths 8192 32768 131072 --modes ltri full --backend auto --time-limit 520 \\
        --out benchmarks/results/e2e_h200

What it measures, for every model, context length and mode, side by side in one run on the same random token ids:

* **Prefill**: one timed prefill (``torch.cuda.synchronize()`` on both sides, after one short warm-up per mode) of a
  fresh :class:`~ltri_rag.LtriSession`: seconds, tokens/s, peak GPU memory (``max_memory_allocated`` after
  ``reset_peak_memory_stats``, weights included) and the host process's resident memory (the span memory of
  ``infllm`` / ``ltri`` lives in pinned host memory). ``full`` is the engine's ``full`` mode, which is the plain
  Hugging Face forward (``attn_implementation="sdpa"``, ``DynamicCache``, the whole prompt in one pass, logits of
  the last token only); ``--sdpa-backend`` pins SDPA to flash / cuDNN / efficient (default: torch's own choice).
  ``streaming`` / ``infllm`` / ``ltri`` run through the engine with the default :class:`~ltri_rag.LtriConfig` sizes
  (``--window`` / ``--budget`` / ``--chunk`` / ``--sinks`` change them) and ``attention_backend=--backend``.
* **Decode**: after the prefill at each ``--decode-lengths`` length, ``--decode-tokens`` greedy single-token
  ``session.step`` calls, each timed alone (synchronised); median (and mean, min, max) ms/token and the peak GPU
  memory while decoding. The ``full`` row is Hugging Face eager decoding with a ``DynamicCache`` (the weak
  baseline; the strong one, ``StaticCache`` + CUDA graph, is not run here: its numbers from
  ``../shared/performance.md`` are printed as a reference).
* **Time split** (``--no-profile`` skips it): at each decode length, one decode step and one prefill chunk (a full
  ``chunk_size`` pass over that context, ``infllm`` / ``ltri`` / ``streaming`` only) under ``torch.profiler``. The
  profiler is stepped from a forward pre-hook on the model, so exactly one model pass (with the engine's
  ``commit`` that follows it) is recorded. Device time (CUDA) or CPU time is split into: attention, retrieval
  (score + select, gather from the pool, assembling the memory part), memory upkeep (absorb, evict, segment,
  store), weights (the linear layers), copies, other, by the engine's ``record_function`` labels
  (:data:`benchmarks.profile_engine.STAGES`) and operator names. Each is set against the floors: weight bytes (+ the
  K/V the step must read) / ``--hbm-tbps`` for a decode step, FLOPs / ``--peak-tflops`` for prefill.

Budget: ``--time-limit`` bounds the whole run. Lengths run in increasing order, each length for every mode (in
``--modes`` order) before the next, so every system gets the short lengths. A (model, mode) skips a length when its
time at the last smaller length, scaled by the growth measured so far (default exponent 2 for ``full``, 1.15 for
the engine), exceeds the time left; after an OOM or an error at a smaller length; or when the span memory would not
fit in host memory (``--host-mem-gib``; torch's pinned-memory cache keeps the buffers the pool grew out of, so the
estimate is twice the pool). A pass still running at the time limit is stopped between layers (status ``stopped``).
Every skip records why. ``torch.OutOfMemoryError`` records ``OOM``, frees memory and carries on.

Random weights make what retrieval finds meaningless (there is no needle to find, attention maps are near
uniform), which is fine for speed: every mode does the same work per token as on a real model, except that the
number and length of ``ltri``'s semantic spans depend on the attention maps. Built-in models (random bf16 weights
drawn on the device by a seeded generator, no float32 copy on the host): ``llama3-8b-random`` (Llama-3-8B shape:
32 layers, hidden 4096, 32 / 8 heads, MLP 14336, vocab 128256, rope theta 500000) and ``qwen2.5-0.5b-random``
(Qwen2.5-0.5B / Coder-0.5B shape). ``--model NAME=PATH`` runs a real model (``ltri_rag.load_model``: Hub id,
directory or ``.gguf``); ``--model`` may be repeated (models run one after the other, sharing ``--time-limit``).

Writes ``bench.json`` (rows and metadata; rewritten after every row, so a killed run keeps what it measured),
``bench.md`` (the Markdown tables, also printed) and ``bench.png`` (prefill seconds vs length, ms/token vs context,
peak GPU memory vs length) under ``--out``. ``--small`` runs a tiny random Llama on CPU: a check that the script
works, not a speed result.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import itertools
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, schedule

import ltri_rag
from benchmarks.profile_engine import STAGES, _self_device_time
from ltri_rag import LtriConfig, LtriSession
from ltri_rag.loading import resolve_device, resolve_dtype

MODES = ("full", "streaming", "infllm", "ltri")
RETRIEVING = ("infllm", "ltri")
GIB = 1024 ** 3

# Random-weight models: family and config fields, the shapes of the public checkpoints.
BUILTIN_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-8b-random": ("llama", {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": False}),
    "qwen2.5-0.5b-random": ("qwen2", {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": True}),
    "tiny-llama-random": ("llama", {
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0, "tie_word_embeddings": False}),
}

# Engine sizes of --small (tiny, so that 256-512 tokens evict, segment and retrieve).
SMALL_ENGINE = {"local_window": 64, "chunk_size": 32, "budget": 64, "num_sink_tokens": 4}

# Reference numbers measured on this H200 with Llama-3-8B shape (../shared/performance.md), not by this script.
REFERENCE = ("Reference (../shared/performance.md, same H200, Llama-3-8B shape, not this run): HF full-attention "
             "prefill 32K 1.45 s, 64K 3.75 s, 128K 11.8 s (peak 22.6 / 30.3 / 45.6 GiB); HF generate with "
             "DynamicCache eager ~61-67 ms/token at any length; StaticCache + CUDA graph 10 ms/token at 4K, 29 ms "
             "at 32K, 104 ms at 128K.")

STAGE_CATEGORY = {
    "ltri.retrieve.score_select": "retrieval: score+select",
    "ltri.retrieve.gather": "retrieval: gather",
    "ltri.retrieve": "retrieval: assemble",
    "ltri.attend_memory": "attention",
    "ltri.attend_local": "attention",
    "ltri.attend_decode": "attention",
    "ltri.absorb": "memory upkeep",
    "ltri.evict_segment_store": "memory upkeep",
    "ltri.segment_triangle": "memory upkeep",
}
CATEGORIES = ("weights", "attention", "retrieval: score+select", "retrieval: gather", "retrieval: assemble",
              "memory upkeep", "copies", "other")
WEIGHT_OPS = {"aten::linear", "aten::addmm", "aten::mm", "aten::matmul"}
COPY_OPS = {"aten::copy_", "aten::cat", "aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::_to_copy",
            "aten::to", "aten::clone", "aten::contiguous", "aten::index_select", "aten::gather", "aten::scatter_",
            "aten::fill_", "aten::zero_", "aten::zeros", "aten::index_copy_", "aten::slice_scatter"}


class BudgetExceeded(RuntimeError):
    """Raised between layers once the run's time limit is reached."""


# --------------------------------------------------------------------------------------------------- models
@dataclass
class ModelInfo:
    """A model under test and the numbers its floors need."""

    name: str
    model: nn.Module
    source: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layer_params: int  # parameters of the decoder layers (the per-token matmul work)
    weight_bytes: int  # bytes a decode step reads: every parameter but the input embedding (unless tied)
    build_seconds: float

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        elem = next(self.model.parameters()).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def describe(self) -> dict[str, Any]:
        """JSON-able shape summary."""
        return {"name": self.name, "source": self.source, "layers": self.num_layers, "heads": self.num_heads,
                "kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "vocab": self.vocab_size,
                "layer_params": self.layer_params, "weight_bytes": self.weight_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token, "build_seconds": round(self.build_seconds, 2),
                "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}


def _config_for(family: str, fields: dict[str, Any], max_positions: int) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    fields = dict(fields)
    theta = fields.pop("rope_theta")
    if "rope_parameters" in inspect.signature(cls.__init__).parameters:
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        fields["rope_theta"] = theta
    return cls(**fields, max_position_embeddings=max_positions, attn_implementation="sdpa")


def build_random_model(name: str, device: torch.device, dtype: torch.dtype, seed: int, max_positions: int
                       ) -> nn.Module:
    """A built-in random-weight model, allocated directly on ``device`` in ``dtype`` (no float32 host copy).

    Weights are drawn from ``N(0, initializer_range)`` by a generator seeded with ``seed`` on the device; norm
    weights are 1, biases 0.

    Raises:
        ValueError: for a name not in :data:`BUILTIN_MODELS`.
    """
    from transformers import AutoModelForCausalLM

    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; use one of {sorted(BUILTIN_MODELS)} or NAME=PATH")
    family, fields = BUILTIN_MODELS[name]
    config = _config_for(family, fields, max_positions)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02))
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in pname else 0.0)
            else:
                param.normal_(0.0, std, generator=gen)
    return model.eval()


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def describe_model(name: str, model: nn.Module, source: str, build_seconds: float) -> ModelInfo:
    """Shape numbers of ``model`` (heads, layers, parameter counts, bytes a decode step reads)."""
    config = _text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    embed = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed_bytes = embed.weight.numel() * embed.weight.element_size()
    weight_bytes = total if tied else total - embed_bytes
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    layer_params = sum(p.numel() for p in layers.parameters()) if layers is not None else \
        sum(p.numel() for p in model.parameters()) - embed.weight.numel()
    return ModelInfo(name=name, model=model, source=source, num_layers=config.num_hidden_layers, num_heads=heads,
                     num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                     vocab_size=embed.weight.shape[0], layer_params=layer_params, weight_bytes=weight_bytes,
                     build_seconds=build_seconds)


def load_model_info(spec: str, device: torch.device, dtype: torch.dtype, seed: int, max_positions: int
                    ) -> ModelInfo:
    """Build (a built-in random model) or load (``NAME=PATH``) one ``--model`` on ``device``."""
    began = time.perf_counter()
    name, sep, path = spec.partition("=")
    if sep:
        model, _ = ltri_rag.load_model(path, dtype=dtype, device=device)
        source = path
    else:
        model = build_random_model(spec, device, dtype, seed, max_positions)
        source = "random weights"
    _sync(device)
    return describe_model(name, model, source, time.perf_counter() - began)


def check_model_spec(spec: str) -> str | None:
    """Why ``spec`` is not a usable ``--model`` value, or None."""
    name, sep, path = spec.partition("=")
    if sep:
        return None if name and path else f"--model {spec!r}: NAME=PATH needs both a name and a path"
    if spec not in BUILTIN_MODELS:
        return f"unknown model {spec!r}: use one of {sorted(BUILTIN_MODELS)} or NAME=PATH (a real model)"
    return None


# ---------------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _rss_gib() -> float | None:
    """Resident memory of this process (GiB), pinned host memory included."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / GIB
    except ImportError:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
        except (OSError, ValueError, IndexError):
            return None


def _host_total_gib() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().total / GIB
    except ImportError:
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemTotal:"):
                        return int(line.split()[1]) / 1024 ** 2
        except (OSError, ValueError):
            pass
    return None


def _pinned_stats() -> dict[str, float]:
    """GiB figures of torch's pinned host allocator (empty where torch keeps none)."""
    try:
        stats = torch.cuda.host_memory_stats() if torch.cuda.is_available() else {}
    except Exception:  # noqa: BLE001 - older or CPU-only builds
        return {}
    return {k: v / GIB for k, v in stats.items() if "bytes" in k and isinstance(v, (int, float))}


def _empty_host_cache() -> None:
    """Give cached pinned host memory back (the pool's buffers outlive their session in torch's cache)."""
    for fn in (getattr(torch.accelerator, "empty_host_cache", None), getattr(torch._C, "_host_emptyCache", None)):
        if fn is not None:
            with suppress(Exception):  # no accelerator / nothing cached
                fn()
            return


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached device (and pinned host) memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        _empty_host_cache()


def is_oom(err: BaseException) -> bool:
    """``torch.OutOfMemoryError``, or an allocator error that says out of memory."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                       and "out of memory" in str(err).lower())


def random_ids(vocab_size: int, length: int, seed: int) -> torch.Tensor:
    """``[1, length]`` seeded random token ids (the same for every mode at a length)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return torch.randint(0, vocab_size, (1, length), generator=gen)


def engine_config(mode: str, engine: dict[str, Any], backend: str) -> LtriConfig:
    """The engine configuration of ``mode``: LtriConfig defaults, ``engine`` overrides, the attention backend."""
    if mode == "full":
        return LtriConfig(mode="full")
    return LtriConfig(mode=mode, attention_backend=backend, **engine)


@contextmanager
def sdpa_context(mode: str, sdpa_backend: str) -> Iterator[None]:
    """Pin PyTorch's SDPA backend for the ``full`` mode (``auto``: torch's own choice)."""
    if mode != "full" or sdpa_backend == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[sdpa_backend]
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                   SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH) if b != first]
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        ctx = sdpa_kernel(order, set_priority=True)  # the chosen one first, the others as fall-backs
    else:
        ctx = sdpa_kernel([first])
    with ctx:
        yield


@contextmanager
def deadline_guard(model: nn.Module, deadline: float) -> Iterator[None]:
    """Raise :class:`BudgetExceeded` at the next decoder layer once ``time.perf_counter()`` passes ``deadline``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = list(getattr(decoder, "layers", [])) or [model]

    def check(*_: Any) -> None:
        if time.perf_counter() > deadline:
            raise BudgetExceeded("the run's time limit was reached")

    handles = [layer.register_forward_pre_hook(check) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------- measurements
def run_prefill(session: LtriSession, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds of one prefill of ``ids`` (``[1, length]``) on ``session``, synchronised; and the last logits."""
    device = session.device
    _sync(device)
    began = time.perf_counter()
    logits = session.feed(ids)
    _sync(device)
    return time.perf_counter() - began, logits


def run_decode(session: LtriSession, logits: torch.Tensor, num_tokens: int) -> list[float]:
    """Milliseconds of each of ``num_tokens`` greedy single-token steps (each synchronised)."""
    device = session.device
    times = []
    token = logits.argmax(-1)
    for _ in range(num_tokens):
        _sync(device)
        began = time.perf_counter()
        logits = session.step(token)
        token = logits.argmax(-1)
        _sync(device)
        times.append((time.perf_counter() - began) * 1e3)
    return times


def _category(event: Any) -> str:
    """Which part of the work a profiled operator belongs to (by its innermost engine stage, else its name)."""
    names = []
    node = event
    while node is not None:
        names.append(node.name)
        node = node.cpu_parent
    for name in names:
        if name in STAGE_CATEGORY:
            return STAGE_CATEGORY[name]
    if any(name in WEIGHT_OPS for name in names):
        return "weights"
    if any("attention" in name.lower() for name in names):
        return "attention"
    if event.name in COPY_OPS or event.name.startswith("Memcpy"):
        return "copies"
    return "other"


def split_time(events: Any, cuda: bool) -> dict[str, Any]:
    """Milliseconds per category (device time on CUDA, CPU self time elsewhere), plus the stage totals."""
    from torch.autograd import DeviceType

    cats: dict[str, float] = defaultdict(float)
    kernels = 0.0
    stage_ms: dict[str, float] = defaultdict(float)
    for event in events:
        on_cpu = event.device_type == DeviceType.CPU
        if not on_cpu:  # a kernel or copy on the device timeline (device-side annotations skipped)
            annotation = getattr(event, "is_user_annotation", False) or event.name.startswith(
                ("ltri.", "ProfilerStep"))
            if not annotation:
                kernels += _self_device_time(event) / 1e3
            continue
        own = (_self_device_time(event) if cuda else float(event.self_cpu_time_total)) / 1e3
        if own > 0:
            cats[_category(event)] += own
        if event.name in STAGES:  # stage totals, children included (device time on CUDA)
            stage_ms[event.name] += (_device_total(event) if cuda else float(event.cpu_time_total)) / 1e3
    busy = sum(cats.values())
    return {"categories_ms": {c: cats.get(c, 0.0) for c in CATEGORIES}, "busy_ms": busy,
            "kernels_ms": kernels if cuda else None, "unattributed_ms": max(0.0, kernels - busy) if cuda else 0.0,
            "stages_ms": dict(stage_ms)}


def _device_total(event: Any) -> float:
    for name in ("device_time_total", "cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_pass(model: nn.Module, device: torch.device, run: Callable[[], Any], active_pass: int
                 ) -> dict[str, Any]:
    """Profile model pass number ``active_pass`` (0-based) of ``run()``: wall ms and the split of its time.

    A forward pre-hook on the model synchronises, time-stamps and steps the profiler before every pass, so the
    recorded window holds exactly one pass and whatever the engine does after it (``commit``) until the next.
    """
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=active_pass, warmup=1, active=1, repeat=1))
    stamps: list[float] = []

    def step(*_: Any) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        prof.step()

    handle = model.register_forward_pre_hook(step)
    try:
        with prof:
            run()
            _sync(device)
            stamps.append(time.perf_counter())
    finally:
        handle.remove()
    if len(stamps) < active_pass + 2:
        raise RuntimeError(f"only {len(stamps) - 1} model passes ran; cannot profile pass {active_pass}")
    wall_ms = (stamps[active_pass + 1] - stamps[active_pass]) * 1e3
    return {"wall_ms": wall_ms, "passes": len(stamps) - 1, **split_time(prof.events(), cuda)}


def prefill_floor_seconds(info: ModelInfo, length: int, mode: str, engine: LtriConfig, peak_tflops: float) -> float:
    """FLOPs of a prefill of ``length`` tokens / peak: linear layers plus the attention each mode computes.

    ``full``: causal over everything. Engine modes: each token sees at most sinks + budget (retrieving modes) +
    window + half a chunk keys.
    """
    linear = 2.0 * info.layer_params * length
    per_key = 4.0 * info.num_layers * info.num_heads * info.head_dim
    if mode == "full":
        keys = length * (length + 1) / 2
    else:
        cap = engine.num_sink_tokens + engine.local_window + engine.chunk_size / 2 + (
            engine.budget if mode in RETRIEVING else 0)
        head = min(length, int(cap))
        keys = head * (head + 1) / 2 + (length - head) * cap
    return (linear + per_key * keys) / (peak_tflops * 1e12)


def decode_floor_ms(info: ModelInfo, context: int, mode: str, engine: LtriConfig, hbm_tbps: float
                    ) -> tuple[float, float]:
    """``(weights only, weights + the K/V one step reads)`` bytes / HBM bandwidth, in ms."""
    if mode == "full":
        keys = context
    else:
        keys = min(context, engine.num_sink_tokens + engine.local_window + (
            engine.budget if mode in RETRIEVING else 0))
    weights = info.weight_bytes / (hbm_tbps * 1e12) * 1e3
    return weights, weights + keys * info.kv_bytes_per_token / (hbm_tbps * 1e12) * 1e3


def pool_host_bytes(info: ModelInfo, length: int, engine: LtriConfig) -> int:
    """Pinned host memory the span pool of a retrieving mode may hold after ``length`` tokens.

    The pool grows by doubling (pages); torch's pinned-memory cache keeps the buffers it grew out of, about as
    much again, so this is twice the final capacity.
    """
    if not engine.kv_offload:
        return 0
    evicted = max(0, length - engine.local_window - engine.num_sink_tokens)
    pages = -(-evicted // engine.page_size)
    capacity = 16
    while capacity < pages:
        capacity *= 2
    return 2 * capacity * engine.page_size * info.kv_bytes_per_token


# --------------------------------------------------------------------------------------------------- runner
@dataclass
class Track:
    """What one (model, mode) has done so far: the basis of the skip decisions."""

    last_length: int | None = None
    last_prefill_s: float = 0.0
    last_extra_s: float = 0.0  # decode + profiling at that length
    history: list[tuple[int, float]] = field(default_factory=list)
    failed: str | None = None  # "OOM at 524288" etc.

    def exponent(self, mode: str) -> float:
        """Growth exponent of prefill time: measured over the last two lengths, else a default."""
        if len(self.history) >= 2:
            (l0, t0), (l1, t1) = self.history[-2:]
            if t0 > 0 and t1 > 0 and l1 > l0:
                return min(2.2, max(1.0, math.log(t1 / t0) / math.log(l1 / l0)))
        return 2.0 if mode == "full" else 1.15

    def predict(self, mode: str, length: int, with_decode: bool) -> float | None:
        """Seconds the next length should take, or None before any length ran."""
        if self.last_length is None:
            return None
        ratio = length / self.last_length
        extra = self.last_extra_s * (ratio if mode == "full" else 1.2) if with_decode else 0.0
        return self.last_prefill_s * ratio ** self.exponent(mode) + extra


class Bench:
    """Runs the grid of one invocation and keeps its rows; :meth:`save` writes them."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                 engine: dict[str, Any], meta: dict[str, Any]) -> None:
        self.args = args
        self.device = device
        self.dtype = dtype
        self.engine = engine
        self.meta = meta
        self.prefill: list[dict[str, Any]] = []
        self.decode: list[dict[str, Any]] = []
        self.profiles: list[dict[str, Any]] = []
        self.models: list[dict[str, Any]] = []
        self.began = time.perf_counter()
        self.deadline = self.began + args.time_limit

    def remaining(self) -> float:
        """Seconds left of ``--time-limit``."""
        return self.deadline - time.perf_counter()

    # ------------------------------------------------------------------------------------------------- run
    def run_model(self, info: ModelInfo) -> None:
        """Every length x mode of one model, shortest lengths first."""
        args = self.args
        self.models.append(info.describe())
        warm = {}
        for mode in args.modes:
            warm[mode] = self._warm_up(info, mode)
        self.meta.setdefault("warm_up_seconds", {})[info.name] = warm
        tracks = {mode: Track() for mode in args.modes}
        decode_set = set(args.decode_lengths)
        prefill_set = set(args.lengths)
        for length in sorted(prefill_set | decode_set):
            ids = random_ids(info.vocab_size, length, args.seed)
            for mode in args.modes:
                reason = self._skip_reason(info, mode, length, tracks[mode], length in decode_set)
                if reason is not None:
                    self._skipped(info, mode, length, length in decode_set, reason)
                else:
                    self._measure(info, mode, length, ids, length in decode_set, tracks[mode])
                free_memory(self.device)
                self.save()

    def _warm_up(self, info: ModelInfo, mode: str) -> float | str:
        """One short prefill and two decode steps (kernels compiled, caches warm); seconds, or the error."""
        config = engine_config(mode, self.engine, self.args.backend)
        if mode == "full":
            length = min(2048, min(self.args.lengths + self.args.decode_lengths))
        else:
            length = config.num_sink_tokens + config.local_window + 2 * config.chunk_size + config.final_chunk_size
        ids = random_ids(info.vocab_size, length, self.args.seed + 1)
        began = time.perf_counter()
        try:
            with sdpa_context(mode, self.args.sdpa_backend):
                session = LtriSession(info.model, config)
                _, logits = run_prefill(session, ids)
                run_decode(session, logits, 2)
            del session, logits
        except Exception as err:  # noqa: BLE001 - recorded; the timed runs will show the same error
            return f"error: {type(err).__name__}: {err}"
        finally:
            free_memory(self.device)
        return round(time.perf_counter() - began, 2)

    def _skip_reason(self, info: ModelInfo, mode: str, length: int, track: Track, with_decode: bool) -> str | None:
        if track.failed is not None:
            return f"{track.failed} (a smaller length)"
        left = self.remaining()
        predicted = track.predict(mode, length, with_decode)
        if predicted is not None and predicted > left:
            return (f"time: {predicted:.0f} s predicted from {track.last_prefill_s:.1f} s at {track.last_length} "
                    f"(growth exponent {track.exponent(mode):.2f}), {left:.0f} s left")
        if left <= 0:
            return "time: the run's time limit was reached"
        config = engine_config(mode, self.engine, self.args.backend)
        if mode in RETRIEVING and self.args.host_mem_gib:
            need = pool_host_bytes(info, length, config) / GIB
            free = 0.9 * self.args.host_mem_gib - (_rss_gib() or 0.0)
            if need > free:
                return (f"host memory: the pinned span pool may need {need:.0f} GiB (twice its capacity), "
                        f"{free:.0f} GiB usable of --host-mem-gib {self.args.host_mem_gib:.0f}")
        return None

    def _skipped(self, info: ModelInfo, mode: str, length: int, with_decode: bool, reason: str) -> None:
        base = {"model": info.name, "mode": mode, "length": length, "status": "skipped", "reason": reason}
        self.prefill.append(dict(base, phase="prefill"))
        if with_decode:
            self.decode.append(dict(base, phase="decode"))
        print(f"[{info.name} {mode} {length}] skipped: {reason}", flush=True)

    def _measure(self, info: ModelInfo, mode: str, length: int, ids: torch.Tensor, with_decode: bool,
                 track: Track) -> None:
        """Prefill (and decode, profile) one (model, mode, length); every failure becomes a row."""
        args = self.args
        config = engine_config(mode, self.engine, args.backend)
        tag = f"[{info.name} {mode} {length}]"
        base = {"model": info.name, "mode": mode, "length": length,
                "backend": config.attention_backend if mode != "full" else f"sdpa:{args.sdpa_backend}"}
        row = dict(base, phase="prefill")
        drow = dict(base, phase="decode") if with_decode else None
        extra_s = 0.0
        session = logits = None
        with sdpa_context(mode, args.sdpa_backend), deadline_guard(info.model, self.deadline):
            try:
                session = LtriSession(info.model, config)
                _reset_peak(self.device)
                seconds, logits = run_prefill(session, ids)
                row.update(status="ok", seconds=seconds, tokens_per_s=length / seconds,
                           peak_gib=_peak_gib(self.device), host_rss_gib=_rss_gib(),
                           floor_s=prefill_floor_seconds(info, length, mode, config, args.peak_tflops),
                           pinned=_pinned_stats() or None)
                row["x_floor"] = seconds / row["floor_s"]
                print(f"{tag} prefill {seconds:.2f} s ({length / seconds:,.0f} tok/s), peak "
                      f"{_fmt(row['peak_gib'], '.2f')} GiB", flush=True)
            except Exception as err:  # noqa: BLE001 - recorded as a row; the grid goes on
                self._failure(row, err, tag + " prefill")
            self.prefill.append(row)
            if drow is not None:
                if row["status"] != "ok":
                    drow.update(status=row["status"], reason=f"the prefill before it: {row['status']}")
                else:
                    began = time.perf_counter()
                    self._decode(info, mode, length, config, session, logits, drow, tag)
                    if drow["status"] == "ok" and not args.no_profile:
                        self._profile(info, mode, length, config, session, tag)
                    extra_s = time.perf_counter() - began
                self.decode.append(drow)
        session = logits = None
        if row["status"] == "ok":
            track.last_length = length
            track.last_prefill_s = row["seconds"]
            track.last_extra_s = extra_s
            track.history.append((length, row["seconds"]))
        failed = [r["status"] for r in (row, drow) if r is not None and r["status"] != "ok"]
        if failed:
            track.failed = ("the time limit was reached" if failed[0] == "stopped"
                            else f"{failed[0]} at {length}")

    def _decode(self, info: ModelInfo, mode: str, length: int, config: LtriConfig, session: LtriSession,
                logits: torch.Tensor, row: dict[str, Any], tag: str) -> None:
        args = self.args
        try:
            _reset_peak(self.device)
            times = run_decode(session, logits, args.decode_tokens)
            weights_ms, kv_ms = decode_floor_ms(info, length, mode, config, args.hbm_tbps)
            median = statistics.median(times)
            row.update(status="ok", tokens=len(times), median_ms=median, mean_ms=statistics.fmean(times),
                       min_ms=min(times), max_ms=max(times), times_ms=[round(t, 3) for t in times],
                       peak_gib=_peak_gib(self.device), floor_weights_ms=weights_ms, floor_weights_kv_ms=kv_ms,
                       x_floor=median / kv_ms,
                       baseline=("Hugging Face eager, DynamicCache (engine mode full)" if mode == "full"
                                 else "ltri_rag engine, eager"))
            print(f"{tag} decode {median:.1f} ms/token (median of {len(times)}; floor {kv_ms:.2f} ms)", flush=True)
        except Exception as err:  # noqa: BLE001
            self._failure(row, err, tag + " decode")

    def _profile(self, info: ModelInfo, mode: str, length: int, config: LtriConfig, session: LtriSession,
                 tag: str) -> None:
        """One decode step, then one full prefill chunk (engine modes) over this context, under the profiler."""
        args = self.args
        token = torch.zeros(1, dtype=torch.int64)
        jobs: list[tuple[str, Callable[[], Any], int, int]] = [
            ("decode step", lambda: [session.step(token) for _ in range(3)], 2, 1)]
        if mode != "full":
            piece = random_ids(info.vocab_size, 2 * config.chunk_size + config.final_chunk_size, args.seed + 2)
            jobs.append(("prefill chunk", lambda: session.feed(piece), 1, config.chunk_size))
        for kind, run, active, tokens in jobs:
            row = {"model": info.name, "mode": mode, "length": length, "phase": f"profile {kind}", "kind": kind,
                   "tokens": tokens}
            try:
                res = profile_pass(info.model, self.device, run, active)
                if kind == "decode step":
                    weights_ms, kv_ms = decode_floor_ms(info, length, mode, config, args.hbm_tbps)
                    res.update(floor_ms=kv_ms, floor_weights_ms=weights_ms)
                else:
                    res["floor_ms"] = self._chunk_floor_ms(info, mode, config)
                row.update(status="ok", **res)
                print(f"{tag} profiled {kind}: {res['wall_ms']:.1f} ms wall, "
                      + ", ".join(f"{c} {ms:.1f}" for c, ms in res["categories_ms"].items() if ms > 0), flush=True)
            except Exception as err:  # noqa: BLE001
                self._failure(row, err, f"{tag} profile {kind}")
            self.profiles.append(row)

    def _chunk_floor_ms(self, info: ModelInfo, mode: str, config: LtriConfig) -> float:
        """FLOPs of one ``chunk_size`` pass over a full working set / peak, in ms."""
        chunk = config.chunk_size
        keys = config.num_sink_tokens + config.local_window + chunk / 2 + (
            config.budget if mode in RETRIEVING else 0)
        flops = 2.0 * info.layer_params * chunk + 4.0 * info.num_layers * info.num_heads * info.head_dim * chunk * keys
        return flops / (self.args.peak_tflops * 1e12) * 1e3

    def _failure(self, row: dict[str, Any], err: BaseException, what: str) -> str:
        """Record an exception in ``row``; return the status (``OOM``, ``stopped`` or ``error``)."""
        if is_oom(err):
            status, reason = "OOM", str(err).splitlines()[0][:300] if str(err) else "out of memory"
        elif isinstance(err, BudgetExceeded):
            status, reason = "stopped", f"time limit reached after {time.perf_counter() - self.began:.0f} s"
        else:
            status, reason = "error", f"{type(err).__name__}: {err}"[:500]
            row["traceback"] = traceback.format_exc()[-3000:]
        row.update(status=status, reason=reason)
        print(f"{what}: {status}: {reason}", flush=True)
        return status

    # ---------------------------------------------------------------------------------------------- output
    def result(self) -> dict[str, Any]:
        """Everything measured, as one JSON-able dict."""
        self.meta["elapsed_seconds"] = round(time.perf_counter() - self.began, 1)
        return {"meta": self.meta, "models": self.models, "prefill": self.prefill, "decode": self.decode,
                "profile": self.profiles, "summary": summarize(self.prefill, self.decode)}

    def save(self, plot: bool = False) -> str:
        """Write ``bench.json`` and ``bench.md`` (and ``bench.png`` with ``plot``); return the Markdown."""
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        result = self.result()
        tmp = out / "bench.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(out / "bench.json")
        text = render(result)
        (out / "bench.md").write_text(text, encoding="utf-8")
        if plot:
            note = plot_results(result, out / "bench.png")
            if note:
                print(note, flush=True)
        return text


# ------------------------------------------------------------------------------------------ summary + report
def _ok(rows: list[dict[str, Any]], model: str, mode: str) -> dict[int, dict[str, Any]]:
    return {r["length"]: r for r in rows if r["model"] == model and r["mode"] == mode and r.get("status") == "ok"}


def summarize(prefill: list[dict[str, Any]], decode: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets per model and engine mode: prefill speed-up vs full, growth, decode and memory flatness."""
    out: dict[str, Any] = {}
    models = sorted({r["model"] for r in prefill + decode})
    for model in models:
        modes = sorted({r["mode"] for r in prefill + decode if r["model"] == model})
        full = _ok(prefill, model, "full")
        per_model: dict[str, Any] = {}
        for mode in modes:
            pre = _ok(prefill, model, mode)
            dec = _ok(decode, model, mode)
            entry: dict[str, Any] = {}
            if mode != "full":
                entry["speedup_vs_full"] = {length: full[length]["seconds"] / pre[length]["seconds"]
                                            for length in sorted(pre) if length in full}
            lengths = sorted(pre)
            entry["growth_exponent"] = {f"{a}->{b}": math.log(pre[b]["seconds"] / pre[a]["seconds"]) / math.log(b / a)
                                        for a, b in itertools.pairwise(lengths)}
            if len(dec) >= 2:
                medians = [dec[length]["median_ms"] for length in sorted(dec)]
                entry["decode_max_over_min"] = max(medians) / min(medians)
                entry["decode_range"] = [min(dec), max(dec)]
            peaks = [(length, pre[length]["peak_gib"]) for length in lengths if pre[length].get("peak_gib")]
            if len(peaks) >= 2:
                entry["prefill_peak_gib"] = {"first": peaks[0], "last": peaks[-1],
                                             "ratio": peaks[-1][1] / peaks[0][1]}
            per_model[mode] = entry
        out[model] = per_model
    return out


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(row: dict[str, Any] | None, key: str, spec: str) -> str:
    if row is None:
        return ""
    if row.get("status") != "ok":
        return {"OOM": "OOM", "skipped": "skip", "stopped": "stopped"}.get(row.get("status"), "error")
    return _fmt(row.get(key), spec)


def _pivot(rows: list[dict[str, Any]], model: str, modes: list[str], key: str, spec: str,
           ratio_to_full: bool = False) -> list[str]:
    lengths = sorted({r["length"] for r in rows if r["model"] == model})
    by = {(r["mode"], r["length"]): r for r in rows if r["model"] == model}
    engine = [m for m in modes if m != "full"]
    head = ["length"] + modes + ([f"{m}: x faster than full" for m in engine]
                                  if ratio_to_full and "full" in modes else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for length in lengths:
        cells = [f"{length:,}"] + [_cell(by.get((m, length)), key, spec) for m in modes]
        if ratio_to_full and "full" in modes:
            full = by.get(("full", length))
            for m in engine:
                mine = by.get((m, length))
                ok = full and mine and full.get("status") == "ok" and mine.get("status") == "ok"
                cells.append(f"{full[key] / mine[key]:.2f}x" if ok else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(result: dict[str, Any]) -> str:
    """Markdown: prefill / decode / memory tables per model, the time split, the targets, skips and errors."""
    meta = result["meta"]
    lines = [(f"# End-to-end speed: {meta['device']} ({meta['dtype']}, torch {meta['torch']}, transformers "
             f"{meta['transformers']}, triton {meta['triton']})"), "",
             f"Command: `{meta['command']}`", "",
             (f"Engine: {meta['engine']}; attention backend `{meta['backend']}`; full attention: the engine's `full` "
             f"mode (plain HF forward, SDPA `{meta['sdpa_backend']}`, DynamicCache). Floors: "
             f"{meta['hbm_tbps']} TB/s HBM, {meta['peak_tflops']} TFLOP/s bf16. Random token ids (seed "
             f"{meta['seed']}); {meta['elapsed_seconds']} s in all."), ""]
    for model in result["models"]:
        name = model["name"]
        modes = [m for m in meta["modes"]]
        lines += [(f"## {name} ({model['source']}; {model['layers']} layers, {model['heads']}/{model['kv_heads']} "
                  f"heads x {model['head_dim']}, {model['weight_bytes'] / 1e9:.1f} GB of weights read per token)"), ""]
        lines += ["Prefill seconds (one timed prefill; `skip` / `OOM`: see below):", ""]
        lines += _pivot(result["prefill"], name, modes, "seconds", ".2f", ratio_to_full=True) + [""]
        lines += ["Time per output token, ms (median):", ""]
        lines += _pivot(result["decode"], name, modes, "median_ms", ".1f", ratio_to_full=True) + [""]
        lines += ["Peak GPU memory during prefill, GiB (weights included):", ""]
        lines += _pivot(result["prefill"], name, modes, "peak_gib", ".2f") + [""]
        lines += ["Peak GPU memory while decoding, GiB:", ""]
        lines += _pivot(result["decode"], name, modes, "peak_gib", ".2f") + [""]
        lines += ["Prefill detail:", "", "| mode | length | s | tok/s | x FLOP floor | peak GiB | host RSS GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["prefill"]:
            if r["model"] == name and r.get("status") == "ok":
                lines.append(f"| {r['mode']} | {r['length']:,} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
                             f"{r['x_floor']:.3g} | {_fmt(r.get('peak_gib'), '.2f')} | "
                             f"{_fmt(r.get('host_rss_gib'), '.1f')} |")
        lines += ["", "Decode detail (ms/token; floor = weights + the K/V one step must read, at HBM speed):", "",
                  "| mode | context | median | mean | min | max | floor | x floor | baseline |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in result["decode"]:
            if r["model"] == name and r.get("status") == "ok":
                lines.append(f"| {r['mode']} | {r['length']:,} | {r['median_ms']:.2f} | {r['mean_ms']:.2f} | "
                             f"{r['min_ms']:.2f} | {r['max_ms']:.2f} | {r['floor_weights_kv_ms']:.3g} | "
                             f"{r['x_floor']:.3g} | {r['baseline']} |")
        profs = [p for p in result["profile"] if p["model"] == name and p.get("status") == "ok"]
        if profs:
            unit = "device ms" if meta["device"] != "cpu" else "CPU ms"
            lines += ["", (f"Where the time goes ({unit} of one profiled pass, by category). Wall: the pass under the "
                          "profiler, synchronised (wall - busy = the device waiting on the host: Python, launches, "
                          "syncs); busy: the categories' sum; unattributed: device time the profiler tied to no "
                          "operator; floor as above (FLOPs for a prefill chunk):"), "",
                      "| mode | context | pass | wall ms | busy | " + " | ".join(CATEGORIES)
                      + " | unattributed | floor ms |",
                      "|---|---:|---|---:|---:|" + "---:|" * (len(CATEGORIES) + 2)]
            for p in profs:
                cats = " | ".join(f"{p['categories_ms'][c]:.2f}" for c in CATEGORIES)
                lines.append(f"| {p['mode']} | {p['length']:,} | {p['kind']} ({p['tokens']} tok) | "
                             f"{p['wall_ms']:.1f} | {p['busy_ms']:.1f} | {cats} | {p['unattributed_ms']:.2f} | "
                             f"{p['floor_ms']:.3g} |")
        lines.append("")
    lines += ["## Targets", ""]
    for model, per_mode in result["summary"].items():
        for mode, entry in per_mode.items():
            parts = []
            for length, speed in entry.get("speedup_vs_full", {}).items():
                parts.append(f"{speed:.2f}x full's prefill speed at {int(length):,}")
            for span, exp in entry.get("growth_exponent", {}).items():
                parts.append(f"prefill growth {span}: exponent {exp:.2f}")
            if "decode_max_over_min" in entry:
                lo, hi = entry["decode_range"]
                parts.append(f"ms/token max/min {entry['decode_max_over_min']:.2f} over {lo:,}-{hi:,} "
                             f"(target <= 1.15)")
            if "prefill_peak_gib" in entry:
                p = entry["prefill_peak_gib"]
                parts.append(f"prefill peak {p['first'][1]:.2f} GiB at {p['first'][0]:,} -> {p['last'][1]:.2f} "
                             f"at {p['last'][0]:,}")
            if parts:
                lines.append(f"- {model} / {mode}: " + "; ".join(parts))
    lines += ["", ("Targets of the issue: ltri >= 3x faster than full at 128K and linear beyond (exponent ~1); "
                  "ms/token flat within 15% from 8K to 1M; peak GPU memory flat."), "", REFERENCE, ""]
    notes = [r for r in result["prefill"] + result["decode"] + result["profile"] if r.get("status") not in ("ok",)]
    if notes:
        lines += ["## Skipped, stopped, OOM and errors", ""]
        for r in notes:
            lines.append(f"- {r['model']} / {r['mode']} / {r['length']:,} ({r.get('phase')}): {r.get('status')}: "
                         f"{r.get('reason', '')}")
        lines.append("")
    return "\n".join(lines)


def plot_results(result: dict[str, Any], path: Path) -> str | None:
    """Prefill seconds (log-log), ms/token and peak GPU memory vs length per mode; a note if it cannot plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    models = [m["name"] for m in result["models"]]
    if not models:
        return None
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.6 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        ax_pre, ax_dec, ax_mem = axes[row]
        for mode in result["meta"]["modes"]:
            pre = _ok(result["prefill"], model, mode)
            dec = _ok(result["decode"], model, mode)
            if pre:
                xs = sorted(pre)
                ax_pre.plot(xs, [pre[x]["seconds"] for x in xs], "o-", label=mode)
                if any(pre[x].get("peak_gib") for x in xs):
                    ax_mem.plot(xs, [pre[x].get("peak_gib") or float("nan") for x in xs], "o-", label=f"{mode} prefill")
            if dec:
                xs = sorted(dec)
                ax_dec.plot(xs, [dec[x]["median_ms"] for x in xs], "o-", label=mode)
                if any(dec[x].get("peak_gib") for x in xs):
                    ax_mem.plot(xs, [dec[x].get("peak_gib") or float("nan") for x in xs], "s--",
                                label=f"{mode} decode")
            for r in result["prefill"]:
                if r["model"] == model and r["mode"] == mode and r.get("status") == "OOM":
                    ax_pre.axvline(r["length"], color="grey", lw=0.6, ls=":")
        ax_pre.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="prefill seconds",
                   title=f"{model}: prefill")
        ax_dec.set(xscale="log", xlabel="context tokens", ylabel="ms / output token (median)",
                   title=f"{model}: decode")
        ax_mem.set(xscale="log", xlabel="tokens", ylabel="peak GPU GiB (weights included)",
                   title=f"{model}: peak GPU memory")
        if not ax_mem.get_lines():
            ax_mem.text(0.5, 0.5, "no GPU memory measured (CPU run)", ha="center", va="center",
                        transform=ax_mem.transAxes)
        ax_dec.set_ylim(bottom=0)
        for ax in (ax_pre, ax_dec, ax_mem):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"{result['meta']['device']}, {result['meta']['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------------- main
def _versions() -> dict[str, str | None]:
    import transformers

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line (bad values are named in the error)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", metavar="NAME|NAME=PATH",
                        help=f"built-in random model ({', '.join(BUILTIN_MODELS)}) or NAME=PATH of a real one; "
                             "repeat for several (default llama3-8b-random; --small: tiny-llama-random)")
    parser.add_argument("--lengths", type=int, nargs="+", help="prefill lengths (default 32K 128K 512K 1M)")
    parser.add_argument("--decode-lengths", type=int, nargs="*",
                        help="contexts to decode at (default 8K 32K 128K 512K 1M); each is also a prefill row")
    parser.add_argument("--decode-tokens", type=int, help="timed decode steps per context (default 32)")
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help="modes, run in this order at each length (default ltri full streaming infllm)")
    parser.add_argument("--backend", default="auto", choices=("torch", "triton", "auto"),
                        help="LtriConfig.attention_backend of the engine modes")
    parser.add_argument("--sdpa-backend", default="auto", choices=("auto", "flash", "cudnn", "efficient"),
                        help="SDPA kernel of the full mode (auto: torch's choice; others: that one first)")
    parser.add_argument("--window", type=int, help="LtriConfig.local_window (default: LtriConfig's)")
    parser.add_argument("--budget", type=int, help="LtriConfig.budget")
    parser.add_argument("--chunk", type=int, help="LtriConfig.chunk_size")
    parser.add_argument("--sinks", type=int, help="LtriConfig.num_sink_tokens")
    parser.add_argument("--time-limit", type=float, default=540.0,
                        help="seconds for the whole run; lengths predicted not to fit are skipped (default 540)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled decode step / prefill chunk")
    parser.add_argument("--hbm-tbps", type=float, default=4.3, help="HBM bandwidth of the decode floor (TB/s)")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matmul peak of the prefill floor")
    parser.add_argument("--host-mem-gib", type=float, default=None,
                        help="host memory for the pinned span pool (default: the machine's total; 0: no check)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    parser.add_argument("--device", default=None, help="auto / cuda / cpu (default auto; --small: cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny random Llama on CPU: a check of the script")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    small = args.small
    defaults = {"model": ["tiny-llama-random"] if small else ["llama3-8b-random"],
                "lengths": [256, 512] if small else [32768, 131072, 524288, 1048576],
                "decode_lengths": [256, 512] if small else [8192, 32768, 131072, 524288, 1048576],
                "decode_tokens": 4 if small else 32,
                "modes": ["full", "ltri", "streaming"] if small else ["ltri", "full", "streaming", "infllm"],
                "device": "cpu" if small else "auto"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for spec in args.model:
        problem = check_model_spec(spec)
        if problem:
            parser.error(problem)
    names = [spec.partition("=")[0] for spec in args.model]
    if len(set(names)) != len(names):
        parser.error(f"--model names must differ, got {names}")
    for key in ("lengths", "decode_lengths"):
        bad = [n for n in getattr(args, key) if n < 1]
        if bad:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {bad}")
    if not args.lengths and not args.decode_lengths:
        parser.error("nothing to run: --lengths and --decode-lengths are both empty")
    if args.decode_tokens < 1:
        parser.error(f"--decode-tokens must be >= 1, got {args.decode_tokens}")
    if len(set(args.modes)) != len(args.modes):
        parser.error(f"--modes lists a mode twice: {args.modes}")
    for key in ("time_limit", "hbm_tbps", "peak_tflops"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    if args.host_mem_gib is None:
        args.host_mem_gib = _host_total_gib()
    return args


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """LtriConfig fields set by the command line (``--small``: tiny sizes unless given)."""
    engine: dict[str, Any] = dict(SMALL_ENGINE) if args.small else {}
    for flag, key in (("window", "local_window"), ("budget", "budget"), ("chunk", "chunk_size"),
                      ("sinks", "num_sink_tokens")):
        if getattr(args, flag) is not None:
            engine[key] = getattr(args, flag)
    return engine


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result dict (also written under ``--out``)."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    engine = engine_overrides(args)
    try:
        for mode in args.modes:
            engine_config(mode, engine, args.backend)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"bad engine setting: {err}") from err
    shown = LtriConfig(**engine)
    words = sys.argv[1:] if argv is None else list(argv)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype":
            str(dtype).removeprefix("torch."), **_versions(), "host": platform.node(), "cpus": os.cpu_count(),
            "host_mem_gib": args.host_mem_gib, "command": shlex.join(["python", "-m", "benchmarks.bench_e2e",
                                                                        *words]),
            "modes": args.modes, "lengths": args.lengths, "decode_lengths": args.decode_lengths,
            "decode_tokens": args.decode_tokens, "backend": args.backend, "sdpa_backend": args.sdpa_backend,
            "engine": {k: getattr(shown, k) for k in ("num_sink_tokens", "local_window", "chunk_size",
                                                      "final_chunk_size", "budget", "kv_offload", "page_size")},
            "time_limit": args.time_limit, "hbm_tbps": args.hbm_tbps, "peak_tflops": args.peak_tflops,
            "seed": args.seed, "profile": not args.no_profile,
            "full_baseline": "engine mode full = HF forward, SDPA, DynamicCache (eager decode)"}
    if device.type == "cuda":
        meta["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / GIB
    bench = Bench(args, device, dtype, engine, meta)
    longest = max(args.lengths + args.decode_lengths)
    max_positions = max(1 << 21, longest + args.decode_tokens + 8 * (engine.get("chunk_size") or 512) + 1024)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        for spec in args.model:
            info = None
            try:
                info = load_model_info(spec, device, dtype, args.seed, max_positions)
                print(f"{info.name}: built in {info.build_seconds:.1f} s, "
                      f"{info.weight_bytes / 1e9:.2f} GB of weights", flush=True)
                if device.type == "cuda":
                    meta.setdefault("weights_gib", {})[info.name] = torch.cuda.memory_allocated(device) / GIB
                with torch.inference_mode():
                    bench.run_model(info)
            except Exception as err:
                if len(args.model) == 1 and info is None:
                    raise  # nothing else to run: the load error itself is the answer
                meta.setdefault("model_errors", {})[spec] = f"{type(err).__name__}: {err}"[:500]
                print(f"{spec}: {type(err).__name__}: {err}", flush=True)
            finally:
                info = None
                free_memory(device)
    except KeyboardInterrupt as err:
        meta["interrupted"] = str(err) or "KeyboardInterrupt"
        print(f"interrupted ({meta['interrupted']}): writing what was measured", flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        text = bench.save(plot=True)
    print(text)
    return bench.result()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    main()
