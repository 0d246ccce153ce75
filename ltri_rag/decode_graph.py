"""Decode steps replayed as a CUDA graph.

With ``decode_retrieval_stride`` > 1 most decode steps retrieve nothing: every global layer reuses the memory part
placed by the last retrieving step (:meth:`GlobalLayerState.reuses_memory`). Such a step is pure device work, yet
run eagerly the host launches every kernel of every layer (hundreds of launches, tens of milliseconds on an 8B
model, against a few milliseconds of device time). :class:`DecodeGraph` runs these steps in *graph form*
(``StepPlan.graph``), where nothing the device reads moves or depends on a host value:

* the token id and its position are copied into fixed input tensors;
* each layer's reused memory part is copied (once per retrieval) into buffers of fixed width
  (:meth:`GlobalLayerState.load_graph_memory`; mask False past the part);
* the new token's K / V are written into the window's allocation at a device index, and the decode kernel reads the
  window length from device memory (``win_len=``); the allocations hold a whole eviction cycle
  (:meth:`GlobalLayerState.reserve_window`), so they do not move between evictions;
* the Python side of a step (the staged changes each layer leaves for :meth:`LtriCache.end_step`) is the same for
  every replay and is restored after it; the step's commit (window statistics, evictions) stays eager, and the pool
  slots of the tokens a step evicts are reserved there too, after the forward, so that the page tables a graph
  reads do not change during a step.

The first graph-form step runs eagerly on a side stream (Triton compiles, libraries initialise), the next one is
captured with ``torch.cuda.graph`` and replayed, and later ones replay. A graph is captured again when an address it
holds changes (a window allocation or a memory buffer grew). Without CUDA (``capture=False``) graph-form steps run
eagerly: that is how the CPU tests check that the graph form computes what the eager reuse step computes.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from ltri_rag.cache import LtriCache
from ltri_rag.hook import ltri_attention_enabled
from ltri_rag.kernels.attention import local_attention as torch_local_attention
from ltri_rag.kernels.attention import local_attention_backend
from ltri_rag.layer import GlobalLayerState, StepPlan

__all__ = ["DecodeGraph", "graph_unsupported"]

_MEMORY_ROUND = 256  # memory buffers are at least sinks + budget keys wide, rounded up to this

# Whether a retrieving step that evicts (the last of an eviction cycle, when every decoded token retrieves) replays
# the graph captured for its span set instead of running eagerly. Its forward reads no pool slot it reserves (the
# reservation waits for end_step), so the graph of the cycle's steps computes it; the eviction itself stays eager.
# On since session 34: on the H200 (Llama-3-8B shape) the evicting step fell from 144-184 ms to 32-49 ms, and the
# mean time per token at 8K / 128K from 18.4-18.5 / 18.9-20.0 ms to 14.3-15.9 / 17.3-18.2 ms (two runs);
# benchmarks/results/evict_stride_h200/README.md.
REPLAY_EVICTING_STEPS = True


def graph_unsupported(cache: LtriCache, device: torch.device, capture: bool = True) -> str | None:
    """Why the decode steps of ``cache`` cannot run in graph form (None when they can).

    Args:
        cache: The session's cache.
        device: The model's device.
        capture: Whether the steps are to be captured (CUDA and the Triton backend needed) or run eagerly in graph
            form (any device and backend; for tests).
    """
    cfg = cache.config
    if not cfg.decode_graph:
        return "decode_graph is False"
    if cfg.decode_retrieval_stride < 2 and not (cfg.decode_graph_retrieval and cfg.retrieves):
        return "decode_retrieval_stride is 1 and retrieving steps are not captured: every decode step retrieves"
    if cfg.position_scheme == "fixed":
        return "the 'fixed' position scheme rotates the memory queries by the step's position"
    if len(cache.global_states) != len(cache.states):
        return "the model has sliding-window layers"
    if capture:
        if device.type != "cuda":
            return f"CUDA graphs need a CUDA device, not {device}"
        if local_attention_backend(cfg.attention_backend, device) is torch_local_attention:
            return f"attention_backend {cfg.attention_backend!r} does not run the Triton kernels on {device}"
    return None


class DecodeGraph:
    """Runs one session's reuse decode steps in graph form, captured as a CUDA graph (or eagerly).

    Args:
        model: The Hugging Face causal LM.
        cache: The session's :class:`LtriCache` (batch ``B``).
        cache_kw: The model's keyword argument for its cache (``cache`` or ``past_key_values``).
        capture: Capture and replay (True: needs :func:`graph_unsupported` to return None), or run graph-form steps
            eagerly (False).
    """

    def __init__(self, model: nn.Module, cache: LtriCache, cache_kw: str, capture: bool = True,
                 retrieve: bool = True) -> None:
        device = cache.device
        reason = graph_unsupported(cache, device, capture)
        if reason is not None:
            raise ValueError(f"decode steps cannot run in graph form: {reason}")
        self.model = model
        self.cache = cache
        self.cache_kw = cache_kw
        self.capture = capture
        self.retrieve = retrieve and cache.config.decode_graph_retrieval and cache.pool is not None
        batch = cache.num_sequences
        self.input_ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)  # [B, 1]
        self.position_ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)  # [B, 1]
        self.window = (torch.zeros(1, dtype=torch.int64, device=device),  # where the new token goes
                       torch.ones(1, dtype=torch.int64, device=device),  # the window's length with it
                       self.position_ids[0])  # [1] the step's position (a view of the model's input)
        cfg = cache.config
        # the most a decode step's window holds: fixed segmentation evicts whole blocks, so it may wait longer
        block = cfg.block_size if cfg.segmentation == "fixed" else 0
        self._window_room = cfg.local_window + cfg.evict_stride + block + 1
        self._memory_width = -(-(cfg.num_sink_tokens + cfg.budget) // _MEMORY_ROUND) * _MEMORY_ROUND
        self._mode: str | None = None  # what ready() found the next step to be: "reuse" or "retrieve"
        # reuse steps: one graph, captured again when an address it holds changes
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_key: tuple | None = None
        self._logits: torch.Tensor | None = None  # the graph's output
        self._staged: list[tuple] = []  # per global layer: the ``_pending`` a replay leaves
        self._warmed = False
        # retrieving steps: one graph per set of spans (an eviction changes the spans: a new graph)
        self._retrieve_graph: torch.cuda.CUDAGraph | None = None
        self._retrieve_key: tuple | None = None
        self._retrieve_seen = False  # a step with this key ran eagerly (its kernels are compiled)
        # memory-part widths (per layer and sequence) a retrieving step has run at: the Triton kernels of a step
        # are compiled for them, so a new set of spans of the same widths is captured at once (no eager step);
        # only where span scoring of one decoded token is torch's (the Triton scorer specialises on span counts)
        self._compiled_widths: set[tuple] = set()
        self._direct = cache.config.attention_backend != "triton"
        self._retrieve_logits: torch.Tensor | None = None
        self._retrieve_inputs: list[torch.Tensor] = []  # the state tensors the graph reads, refilled per replay
        self._retrieve_effects: list[tuple] = []  # per global layer: what a replay stages
        self._consensus_effects: tuple | None = None
        self.steps = 0  # steps run in graph form (replayed, captured, warm-up, or eager without capture)
        self.replays = 0  # of which replayed from a captured graph
        self.captures = 0  # graphs captured
        self.retrieving_steps = 0  # graph-form steps that retrieved (replayed or not)
        self.retrieving_replays = 0  # of which replayed
        self.evicting_replays = 0  # of which evicted after the step (REPLAY_EVICTING_STEPS)
        self.direct_capture_failures = 0  # captures at a span set's first step that failed (that step ran eagerly)

    # ------------------------------------------------------------------------------------------------ checks
    def ready(self) -> bool:
        """Whether the next decode step can run in graph form: the sinks are full, and every global layer reuses
        its memory part, or (``retrieve``) every one retrieves and can select on the device (spans in every
        sequence, every pool page readable from the device, see :meth:`GlobalLayerState.graph_retrievable`)."""
        cache = self.cache
        self._mode = None
        if cache.plan is not None or cache.num_sinks < cache.config.num_sink_tokens or cache.window_len < 1:
            return False
        probe = StepPlan(pos0=cache.seen_tokens, q_len=1, num_to_sinks=0, num_evict=0, first_slot=0, decode=True)
        reuses = [state.reuses_memory(probe) for state in cache.global_states]
        if all(reuses):
            self._mode = "reuse"
        elif self.retrieve and not any(reuses) and self._retrievable():
            self._mode = "retrieve"
        return self._mode is not None

    def _retrievable(self) -> bool:
        pool, device = self.cache.pool, self.cache.device
        host_pages = self.cache.config.zero_copy_host_pages
        if not all(pool.readable_on(seq, device, host_pages) for seq in range(self.cache.num_sequences)):
            return False  # a page in host memory the device may not read: selection stays on the host
        return all(state.graph_retrievable(self.cache.device) is None for state in self.cache.global_states)

    # -------------------------------------------------------------------------------------------------- step
    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor, position: int) -> torch.Tensor:
        """Decode one token per sequence in graph form (the caller checked :meth:`ready`).

        Args:
            token_ids: ``[B, 1]`` int64 on the model's device.
            position: The tokens' position (the tokens read so far).

        Returns:
            ``[B, vocab]`` next-token logits (a tensor of its own, not the graph's output buffer).
        """
        cache = self.cache
        states: list[GlobalLayerState] = cache.global_states
        retrieving = self._mode == "retrieve"
        if self._mode is None:
            raise RuntimeError("DecodeGraph.step without a successful ready()")
        self._mode = None
        for state in states:
            state.reserve_window(self._window_room)
            if not retrieving:
                state.load_graph_memory(self._memory_width)
        self.input_ids.copy_(token_ids)
        self.position_ids.fill_(position)
        self.window[0].fill_(cache.window_len)
        self.window[1].fill_(cache.window_len + 1)
        cache.graph_window = self.window
        cache.begin_step(1, decode=True, graph=True)
        try:
            logits = self._retrieving_step(states) if retrieving else self._reuse_step(states)
        except BaseException:
            cache.abort_step()
            raise
        finally:
            cache.graph_window = None
        cache.end_step()
        self.steps += 1
        self.retrieving_steps += retrieving
        return logits[:, -1].clone()

    def _reuse_step(self, states: list[GlobalLayerState]) -> torch.Tensor:
        """A step reusing every layer's memory part: warm-up, capture, then replays of one graph."""
        key = tuple((t.data_ptr(), tuple(t.shape)) for state in states
                    for t in (*state.window_storage(), *state._graph_memory))
        if key != self._graph_key:
            self._graph = None
            self._graph_key = key
        if not self.capture:
            return self._forward()
        if self._graph is not None:
            self._graph.replay()
            for state, staged in zip(states, self._staged):
                state.stage_graph_step(staged, self.cache.plan)
            self.replays += 1
            return self._logits
        if not self._warmed:
            return self._warm_up()
        graph, logits = self._capture_graph()
        # what each layer staged while being captured is what every replay leaves (the same tensors)
        self._staged = [state.staged_step() for state in states]
        self._graph, self._logits = graph, logits
        graph.replay()
        return logits

    def _retrieving_step(self, states: list[GlobalLayerState]) -> torch.Tensor:
        """A step where every layer retrieves, selecting on the device. Per set of spans (they change at each
        eviction): the first such step runs eagerly (Triton compiles for the new shapes), the second is captured,
        later ones replay, with the state they read refilled in place (persistence, the cross-layer prior) and what
        they stage restored. A set of spans whose memory parts have the widths of an earlier one (once the memory
        holds a budget's worth of tokens: every set) is captured at its first step; if that capture fails, the
        step runs eagerly and the next one is captured as usual. The step that evicts runs eagerly and captures
        nothing (its spans are about to change); with :data:`REPLAY_EVICTING_STEPS` it replays its span set's
        graph where one was captured."""
        for state in states:
            state.prepare_graph_retrieval(self._memory_width)
        evicting = bool(self.cache.plan.num_evict)  # the spans change after this step: a graph of it serves it alone
        if evicting and not (REPLAY_EVICTING_STEPS and self._retrieve_graph is not None):
            return self._forward()
        consensus = self.cache.consensus
        if consensus is not None:  # the prior at the size it has after the next commit: one key per span set
            for seq in range(self.cache.num_sequences):
                consensus.pad_prior(seq, self.cache.pool.num_slots[seq])
        inputs = self._graph_inputs(states)
        key = (tuple(state._memory_key(self.cache.plan) for state in states),
               tuple(state.graph_addresses() for state in states),
               tuple(None if t is None else (t.dtype, tuple(t.shape)) for t in inputs))
        if evicting and key != self._retrieve_key:  # no graph of this span set yet: run eagerly, capture nothing
            return self._forward()
        budget = self.cache.config.budget
        widths = tuple((state.sink_k.shape[2], tuple(min(budget, t.num_tokens) for t in state.tables))
                       for state in states)
        direct = False
        if key != self._retrieve_key:
            self._retrieve_graph = None
            self._retrieve_key = key
            direct = self._direct and widths in self._compiled_widths
            self._retrieve_seen = direct
        if not self.capture or not self._retrieve_seen:
            self._retrieve_seen = True
            self._compiled_widths.add(widths)
            return self._forward()
        if self._retrieve_graph is not None:
            for captured, current in zip(self._retrieve_inputs, inputs):
                if current is not None and current is not captured:
                    captured.copy_(current)
            self._retrieve_graph.replay()
            for state, effects in zip(states, self._retrieve_effects):
                state.restore_graph_effects(effects)
            if consensus is not None:
                consensus.restore_effects(self._consensus_effects)
            self.replays += 1
            self.retrieving_replays += 1
            self.evicting_replays += evicting
            return self._retrieve_logits
        if consensus is not None:
            consensus.forget_sums()  # the graph computes the prior's sums from the prior it reads
        try:
            graph, logits = self._capture_graph()
        except Exception:
            if not direct:
                raise
            # nothing ran while capturing: forget what the capture staged and run the step eagerly
            self._compiled_widths.discard(widths)
            for state in self.cache.states:
                state.discard()
            if consensus is not None:
                consensus.discard()
                consensus.forget_sums()
            self.direct_capture_failures += 1
            return self._forward()
        self._retrieve_inputs = inputs
        self._retrieve_effects = [state.graph_effects() for state in states]
        self._consensus_effects = None if consensus is None else consensus.effects()
        self._retrieve_graph, self._retrieve_logits = graph, logits
        graph.replay()
        return logits

    def _graph_inputs(self, states: list[GlobalLayerState]) -> list[torch.Tensor | None]:
        """The state tensors a retrieving step reads that change between its replays: each layer's persistence
        state and each sequence's cross-layer prior."""
        inputs: list[torch.Tensor | None] = [t for state in states for t in state.graph_inputs()]
        consensus = self.cache.consensus
        if consensus is not None and self.cache.config.consensus_weight > 0:
            inputs.extend(consensus.prior)
        return inputs

    def _forward(self) -> torch.Tensor:
        """The model on the fixed inputs: ``[B, 1, vocab]`` logits."""
        kwargs: dict[str, Any] = {self.cache_kw: self.cache, "use_cache": True, "logits_to_keep": 1,
                                  "position_ids": self.position_ids}
        with ltri_attention_enabled(self.model):
            return self.model(input_ids=self.input_ids, ltri_cache=self.cache, **kwargs).logits

    def _warm_up(self) -> torch.Tensor:
        """Run the step eagerly on a side stream (kernels compile, libraries set up their workspaces)."""
        stream = torch.cuda.Stream(device=self.cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(stream):
            logits = self._forward()
        torch.cuda.current_stream(self.cache.device).wait_stream(stream)
        self._warmed = True
        return logits

    def _capture_graph(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the step (nothing runs while capturing): the graph and its logits tensor (filled by a replay).

        Captured on a side stream with ``CUDAGraph.capture_begin`` / ``capture_end`` rather than the
        ``torch.cuda.graph`` context, which first empties PyTorch's device and pinned-host caches: at 512K tokens
        that freed tens of GiB of pinned pages (the span pool's host tier and its staging buffers), and one
        capture took 3.8 s instead of 50-90 ms.
        """
        device = self.cache.device
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device=device)
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            graph.capture_begin()
            try:
                logits = self._forward()
            except BaseException:
                with contextlib.suppress(Exception):  # the capture is broken already; the first error is the one
                    graph.capture_end()
                raise
            graph.capture_end()
        current.wait_stream(stream)
        self.captures += 1
        return graph, logits


def warn_disabled(reason: BaseException) -> None:
    """Say once per failure that graph-form decoding stopped (the steps go on eagerly)."""
    warnings.warn(f"decode_graph: capturing a decode step failed ({type(reason).__name__}: {reason}); decoding "
                  "continues without CUDA graphs", RuntimeWarning, stacklevel=3)
