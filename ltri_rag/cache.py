"""``LtriCache``: the transformers ``Cache`` that holds sinks, local windows and span memory per layer.

The model's attention modules call ``cache.update(k, v, layer_idx)`` (both the transformers 5.17 and 5.24 call
shapes are accepted); it returns the chunk's own K/V untouched. The real work happens in the attention function
registered by :mod:`ltri_rag.hook`, which receives this cache through the ``ltri_cache`` keyword argument and calls
:meth:`LtriCache.attend`. The engine brackets every forward pass with :meth:`begin_step` / :meth:`end_step`, so all
layers follow one :class:`~ltri_rag.layer.StepPlan` (same sinks, same evictions, same pool slots).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Cache

from ltri_rag.config import LtriConfig
from ltri_rag.consensus import LayerConsensus
from ltri_rag.eviction import evict_layers
from ltri_rag.layer import GlobalLayerState, StepPlan
from ltri_rag.pool import PagedKVPool
from ltri_rag.rope import find_inv_freq
from ltri_rag.sliding import SlidingLayerState

__all__ = ["LtriCache", "MemoryExport", "layer_sliding_windows"]


@dataclass(frozen=True)
class MemoryExport:
    """Part of a span memory, portable between caches of the same model and config.

    Attributes:
        positions: ``[T]`` int64 position each token was read at.
        layers: Per global layer index: ``starts, ends [S]`` (slots relative to the first exported one),
            ``vectors [N, Hkv, D]``, ``owner [N]`` (span of each vector), ``keys, values [T, Hkv, D]``.
    """

    positions: torch.Tensor
    layers: dict[int, dict[str, torch.Tensor]]


def layer_sliding_windows(model: nn.Module) -> list[int | None]:
    """Per decoder layer: its sliding window (tokens), or None for a global-attention layer."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types[:num_layers]]
    if window is not None and getattr(config, "use_sliding_window", True):
        return [window] * num_layers
    return [None] * num_layers


# kv_offload="auto", kv_device_gib None: share of the free device memory for the pool. 0.6 held a 512K-token prompt's
# pool of a Llama-3-8B-shaped model (64 GiB) on an H200 beside the weights (peak 92 GiB; session 15). 0.8 keeps more of
# a 1M prompt's 128 GiB on the device: decode 18.6 against 20.3 ms per token in one run, peak 124 against 99 GiB, the
# prompt 136 against 134 s (benchmarks/results/e2e_llama8b_h200/session24). The other fifth holds what grows beside
# the pool (the index vectors, 8 GiB at 1M), a prompt pass's activations and the decode graphs.
DEVICE_POOL_SHARE = 0.8


def _make_pool(model: nn.Module, config: LtriConfig, batch_size: int, device: torch.device) -> PagedKVPool:
    """The span pool placed as ``config.kv_offload`` / ``kv_device_gib`` say (see :class:`LtriConfig`)."""
    pin = torch.cuda.is_available() and device.type == "cuda"
    if config.kv_offload is True or device.type == "cpu":
        return PagedKVPool(batch_size, config.page_size, torch.device("cpu"), pin_memory=pin,
                           zero_copy=config.zero_copy_host_pages)
    if config.kv_offload is False:
        return PagedKVPool(batch_size, config.page_size, device)
    # auto: the first pages on the device, up to a byte budget over every global layer's K and V
    if config.kv_device_gib is not None:
        budget = config.kv_device_gib * 2**30
    elif device.type == "cuda":
        budget = DEVICE_POOL_SHARE * torch.cuda.mem_get_info(device)[0]
    else:  # another accelerator: no portable way to ask what is free, so the pool stays unbounded there
        return PagedKVPool(batch_size, config.page_size, device)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    dtype = next(model.parameters()).dtype
    num_global = sum(window is None for window in layer_sliding_windows(model))
    token_bytes = 2 * num_global * num_kv_heads * head_dim * dtype.itemsize  # every global layer's K and V
    # the device cache of host-tier rows (read in place by the GPU) comes out of the same budget, at most a quarter
    cache_tokens = 0
    if config.zero_copy_host_pages and pin:
        cache_tokens = min(config.host_cache_tokens, int(budget / 4 // max(token_bytes, 1)))
    device_pages = int((budget - cache_tokens * token_bytes) // max(config.page_size * token_bytes, 1))
    return PagedKVPool(batch_size, config.page_size, device, pin_memory=pin, device_pages=device_pages,
                       zero_copy=config.zero_copy_host_pages, host_cache_tokens=cache_tokens)


class _LayerSlot:
    """What transformers' ``Cache`` helpers inspect on a layer."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, state: GlobalLayerState | SlidingLayerState) -> None:
        self.state = state
        self.is_sliding = isinstance(state, SlidingLayerState)


class LtriCache(Cache):
    """Streaming K/V state of one batch of sequences.

    Args:
        model: The Hugging Face causal LM (used for its layer layout and rotary frequencies).
        config: Engine configuration (mode ``streaming``, ``infllm`` or ``ltri``).
        batch_size: Number of sequences fed together.
        device: Device of the model's activations (defaults to the model's).
    """

    def __init__(self, model: nn.Module, config: LtriConfig, batch_size: int = 1,
                 device: torch.device | None = None) -> None:
        if config.mode == "full":
            raise ValueError("mode 'full' runs the unmodified model and needs no LtriCache")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.config = config
        self.num_sequences = batch_size
        device = device or next(model.parameters()).device
        self.device = device
        self.pool = _make_pool(model, config, batch_size, device) if config.retrieves else None
        self.consensus = LayerConsensus(batch_size) if config.retrieves else None
        windows = layer_sliding_windows(model)
        states: list[GlobalLayerState | SlidingLayerState] = []
        freqs: dict[tuple[float, ...], torch.Tensor] = {}  # layers with equal frequencies share one tensor
        for idx, window in enumerate(windows):
            if window is not None:
                states.append(SlidingLayerState(window))
            else:
                inv_freq = find_inv_freq(model, idx)
                key = tuple(inv_freq.cpu().tolist())
                if key not in freqs:
                    freqs[key] = inv_freq.to(device)
                states.append(GlobalLayerState(idx, config, self.pool, freqs[key], batch_size, self.consensus))
        super().__init__(layers=[_LayerSlot(s) for s in states])
        self.states = states
        self.global_states = [s for s in states if isinstance(s, GlobalLayerState)]
        self.seen_tokens = 0
        self.num_sinks = 0
        self.window_len = 0
        self.plan: StepPlan | None = None
        self.broken: str | None = None  # why a commit failed part-way (the state can no longer be trusted)
        # graph-form decode steps (ltri_rag.decode_graph): one-element int64 device tensors, the window length
        # before the step (where each layer writes the new token), after it, and the step's position
        self.graph_window: tuple[torch.Tensor, ...] | None = None

    # --------------------------------------------------------------------------------------- transformers API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the chunk's K/V unchanged; :meth:`attend` consumes them."""
        return key_states, value_states

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens processed so far (the position of the next token)."""
        return self.seen_tokens

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        """Only the chunk itself is ever masked by transformers (the engine builds its own masks)."""
        query = args[0] if args else kwargs.get("query_length", kwargs.get("cache_position"))
        length = query if isinstance(query, int) else int(query.shape[0])
        return length, 0

    # ------------------------------------------------------------------------------------------- stepping
    def expect_tokens(self, num_tokens: int) -> None:
        """Size the span pool for ``num_tokens`` more tokens about to be read (a prompt of known length): the
        tokens that will leave the window, plus some room for decoding (a sixteenth, at least four evictions), in
        one allocation per tier instead of doubling while reading (which copies the pool and, in pinned host
        memory, leaves the smaller buffers in torch's pinned cache). A pool already that large is kept."""
        if self.pool is None or num_tokens <= 0:
            return
        cfg = self.config
        evicted = self.seen_tokens + num_tokens - cfg.local_window - cfg.num_sink_tokens
        if evicted <= 0:
            return
        self.pool.reserve_capacity(evicted + max(4 * cfg.evict_stride, evicted // 16))

    def begin_step(self, num_tokens: int, dry: bool = False, decode: bool = False, graph: bool = False) -> StepPlan:
        """Plan the next forward pass of ``num_tokens`` tokens (identical for every layer).

        A ``dry`` pass (look-ahead) attends and gathers cross-layer evidence but changes no state; ``decode``
        marks a generated token (as opposed to prompt text); ``graph`` a decode step in the form a CUDA graph
        replays (:mod:`ltri_rag.decode_graph`; it needs :attr:`graph_window` set).
        """
        self._check_whole()
        if self.plan is not None:
            raise RuntimeError("begin_step called twice without end_step")
        if dry:
            self.plan = StepPlan(pos0=self.seen_tokens, q_len=num_tokens, num_to_sinks=0, num_evict=0,
                                 first_slot=0, dry=True)
            return self.plan
        cfg = self.config
        to_sinks = min(num_tokens, cfg.num_sink_tokens - self.num_sinks)
        window = self.window_len + num_tokens - to_sinks
        over = window - cfg.local_window
        evict = 0
        if over >= cfg.evict_stride or (over > 0 and num_tokens > 1):
            evict = over if cfg.segmentation == "triangle" else (over // cfg.block_size) * cfg.block_size
        if graph and (not decode or num_tokens != 1 or to_sinks):
            raise ValueError(f"a graph-form step decodes one token once the sinks are full, got {num_tokens} "
                             f"token(s), decode={decode}, {to_sinks} going to the sinks")
        # a graph-form step reserves its evicted tokens' pool slots at end_step, after its forward (which reads no
        # reserved slot): the page tables and slot positions a captured graph reads then stay as they were, so an
        # evicting step can replay the graph of its span set (decode_graph.REPLAY_EVICTING_STEPS)
        first_slot = self._next_slot() if graph else self._reserve_stream(evict, to_sinks)
        self.plan = StepPlan(pos0=self.seen_tokens, q_len=num_tokens, num_to_sinks=to_sinks, num_evict=evict,
                             first_slot=first_slot, decode=decode, graph=graph)
        return self.plan

    def _next_slot(self) -> int:
        """The pool slot the next reservation starts at (0 without a pool)."""
        return 0 if self.pool is None else self.pool.num_slots[0]

    def _reserve_stream(self, num_evict: int, to_sinks: int = 0) -> int:
        """Pool slots for the ``num_evict`` oldest window tokens of a step whose first ``to_sinks`` tokens become
        sinks, with their positions recorded; returns the first slot. (The window is contiguous: it holds earlier
        tokens only once the sinks are full.)"""
        if self.pool is None:
            return 0
        if not num_evict:
            return self.pool.num_slots[0]
        first = self.pool.reserve(num_evict)
        positions = self.seen_tokens + to_sinks - self.window_len + torch.arange(num_evict)
        for seq in range(self.num_sequences):
            self.pool.set_positions(seq, first, positions)
        return first

    # ------------------------------------------------------------------------------------------- memory
    def flush(self) -> int:
        """Move every global layer's local window into the span memory, as if it had been evicted.

        Ends a piece of text (a document being ingested): afterwards everything read so far is in sinks or in
        the span memory, and the next text starts with empty windows, no cross-layer prior and no persistence
        bonus. Sliding-window layers keep their windows. Returns the number of tokens moved.

        Raises:
            ValueError: the mode keeps no span memory (``streaming``).
            RuntimeError: called inside a step.
        """
        self._check_whole()
        if self.plan is not None:
            raise RuntimeError("flush inside a step")
        if self.pool is None:
            raise ValueError(f"flush needs a mode with a span memory (infllm, ltri), not {self.config.mode!r}")
        num = self.window_len
        plan = StepPlan(pos0=self.seen_tokens, q_len=0, num_to_sinks=0, num_evict=num,
                        first_slot=self._reserve_stream(num))
        evict_layers(self.global_states, plan)
        for state in self.global_states:
            state.reset_recency()
        self.window_len = 0
        if self.consensus is not None:
            self.consensus.prior = [None] * self.num_sequences
        return num

    def export_memory(self, first_slot: int = 0) -> MemoryExport:
        """The span memory of sequence 0 from slot ``first_slot`` on (e.g. one document's, read after the others),
        with its tokens' positions: what :meth:`import_memory` puts into another cache."""
        if self.pool is None:
            raise ValueError(f"mode {self.config.mode!r} keeps no span memory")
        if self.num_sequences != 1:
            raise ValueError(f"export_memory needs a batch of 1, got {self.num_sequences}")
        total = self.pool.num_slots[0]
        if not 0 <= first_slot <= total:
            raise ValueError(f"first_slot {first_slot} outside the memory's {total} slots")
        layers = {state.layer_idx: state.export_spans(0, first_slot) for state in self.states
                  if isinstance(state, GlobalLayerState) and state.tables}
        positions = self.pool.positions(0, torch.arange(first_slot, total))
        return MemoryExport(positions=positions, layers=layers)

    def import_memory(self, memory: MemoryExport, advance: int | None = None) -> int:
        """Append spans exported by :meth:`export_memory` (from a cache of the same model and config) to the span
        memory of sequence 0, keeping their tokens' positions, and move the position of the next token on by
        ``advance`` (default: the tokens imported), so text read next comes after them. Returns the first slot."""
        if self.plan is not None:
            raise RuntimeError("import_memory inside a step")
        if self.pool is None:
            raise ValueError(f"mode {self.config.mode!r} keeps no span memory")
        if self.num_sequences != 1:
            raise ValueError(f"import_memory needs a batch of 1, got {self.num_sequences}")
        if self.window_len:
            raise ValueError(f"import_memory needs empty local windows (flush first); {self.window_len} tokens there")
        if self.num_sinks < self.config.num_sink_tokens:  # later tokens would become sinks past position 0..n-1
            raise ValueError(f"import_memory needs the {self.config.num_sink_tokens} sink tokens read first, "
                             f"{self.num_sinks} are")
        num = int(memory.positions.numel())
        globals_ = {s.layer_idx for s in self.states if isinstance(s, GlobalLayerState)}
        if num and set(memory.layers) != globals_:
            raise ValueError(f"the memory has layers {sorted(memory.layers)}, this model's global layers are "
                             f"{sorted(globals_)}")
        first = self.pool.reserve(num)
        self.pool.set_positions(0, first, memory.positions)
        for state in self.states:
            if isinstance(state, GlobalLayerState) and num:
                state.import_spans(0, first, **memory.layers[state.layer_idx])
        self.seen_tokens += num if advance is None else advance
        return first

    def abort_step(self) -> None:
        """Forget the planned pass after a failed forward: it leaves no trace.

        Layers only stage their changes while attending (applied by :meth:`end_step`), so dropping the staged
        changes, the cross-layer evidence of the pass and its reserved pool slots restores the state before it.
        """
        plan = self.plan
        for state in self.states:
            state.discard()
        if self.consensus is not None:
            self.consensus.discard()
        if plan is not None and not plan.dry and plan.num_evict and self.pool is not None:
            self.pool.unreserve(plan.first_slot)
        self.plan = None

    def end_step(self) -> None:
        """Commit the planned pass: every layer applies what it staged while attending."""
        plan = self.plan
        if plan is None:
            raise RuntimeError("end_step called without begin_step")
        if plan.graph and plan.num_evict and self.pool is not None:  # reserved now (see begin_step), first
            try:
                first = self._reserve_stream(plan.num_evict)
                if first != plan.first_slot:
                    raise RuntimeError(f"the pool's slots moved during a step: planned slot {plan.first_slot}, "
                                       f"reserved {first}")
            except BaseException:
                self.abort_step()  # nothing of the step is kept yet: the state is the one before it
                raise
        if self.consensus is not None:
            self.consensus.commit()
        if plan.dry:
            self.plan = None
            return
        try:
            for state in self.states:
                state.commit(plan)
            evict_layers(self.global_states, plan)  # every global layer's evicted tokens in one batch
        except BaseException as exc:  # some layers committed, others not: say so from now on, not "twice"
            self.broken = f"{type(exc).__name__}: {exc}"[:300]
            self.plan = None
            raise
        self.seen_tokens += plan.q_len
        self.num_sinks += plan.num_to_sinks
        self.window_len += plan.q_len - plan.num_to_sinks - plan.num_evict
        self.plan = None

    def _check_whole(self) -> None:
        if self.broken is not None:
            raise RuntimeError(f"this session's state was left part-committed by an error while committing a pass "
                               f"({self.broken}); its memory cannot be trusted: start a new session")

    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               scaling: float, softcap: float | None = None) -> torch.Tensor:
        """Attention of one layer for the planned pass.

        Args:
            layer_idx: Decoder layer index.
            query: ``[B, H, C, D]``.
            key: ``[B, Hkv, C, D]``.
            value: ``[B, Hkv, C, D]``.
            scaling: Score multiplier.
            softcap: Optional score soft-capping.

        Returns:
            ``[B, C, H, D]`` in the query's dtype (the layout transformers' attention functions return).
        """
        if self.plan is None:
            raise RuntimeError("LtriCache.attend outside a step: drive the model through ltri_rag's engine")
        if query.shape[0] != self.num_sequences or query.shape[2] != self.plan.q_len:
            raise ValueError(f"query {tuple(query.shape)} does not match batch {self.num_sequences} / "
                             f"step of {self.plan.q_len} tokens")
        state = self.states[layer_idx]
        if isinstance(state, SlidingLayerState):
            out = state.attend(query, key, value, scaling=scaling, softcap=softcap, dry=self.plan.dry)
        else:
            out = state.attend(query, key, value, self.plan, scaling=scaling, softcap=softcap,
                               graph_window=self.graph_window if self.plan.graph else None)
        return out.transpose(1, 2).to(query.dtype).contiguous()

    # ------------------------------------------------------------------------------------------- reporting
    def memory_tokens(self) -> int:
        """Evicted tokens held in the pool per sequence."""
        return self.pool.num_slots[0] if self.pool is not None else 0

    def retrieved_tokens(self) -> int:
        """Largest number of tokens any global layer retrieved at the last step."""
        return max((s.last_selected_tokens for s in self.states if isinstance(s, GlobalLayerState)), default=0)
