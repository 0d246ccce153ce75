"""Per-layer state and the attention step of the streaming engine.

A global-attention layer's working set for a chunk of queries is

    memory part: [ sink tokens | spans retrieved from the paged pool ]      (positions per the scheme)
    local part:  [ local window | the chunk itself, causal ]                 (true relative positions)

Both parts are attended separately, each returning ``(out, lse)``, and merged exactly. The local pass also yields
the statistics span detection needs (per-key attention mass, a diagonal band of the attention map), so the tokens
leaving the window can be cut into spans without recomputing anything. Sliding-window layers (Gemma 3) keep their
own window and are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from ltri_rag.assembly import build_memory, plan_memory, position_shifts
from ltri_rag.config import LtriConfig
from ltri_rag.consensus import LayerConsensus
from ltri_rag.kernels.attention import local_attention_backend
from ltri_rag.kernels.attention_decode import decode_attention_backend
from ltri_rag.kernels.scoring import span_probabilities
from ltri_rag.layer_assembly import DeviceAssembly
from ltri_rag.layer_graph import GraphFormSteps
from ltri_rag.layer_spans import SpanExchange
from ltri_rag.pass_rows import scored_rows
from ltri_rag.pool import PagedKVPool
from ltri_rag.retrieval import query_summary, select_spans, select_spans_pair, update_recency
from ltri_rag.rope import _triton_rotates, rotate
from ltri_rag.span_memory import SpanTable
from ltri_rag.window import WindowBuffer

__all__ = ["GlobalLayerState", "StepPlan"]


@dataclass(frozen=True)
class StepPlan:
    """What one forward pass does, identical for every global layer.

    Attributes:
        pos0: Position of the first token of the pass.
        q_len: Tokens in the pass.
        num_to_sinks: Leading tokens of the pass that become sink tokens.
        num_evict: Oldest window tokens evicted after the pass.
        first_slot: Pool slot of the first evicted token (a graph-form step reserves the slots at
            :meth:`~ltri_rag.cache.LtriCache.end_step`, after its forward).
        dry: A look-ahead pass: attend and gather cross-layer evidence, change no state.
        decode: The pass reads a generated token (not prompt text).
        graph: A decode step in the form a CUDA graph replays (:mod:`ltri_rag.decode_graph`): every layer reuses
            its memory part from fixed buffers and writes the new token into its window at a device index.
        shared: Scratch the layers of this pass share: values that depend on the pass alone (e.g. the scored
            queries' indices and positions on the device), made by the first layer that needs them.
    """

    pos0: int
    q_len: int
    num_to_sinks: int
    num_evict: int
    first_slot: int
    dry: bool = False
    decode: bool = False
    graph: bool = False
    shared: dict = field(default_factory=dict, compare=False, repr=False)


def _cat(a: torch.Tensor | None, b: torch.Tensor, dim: int) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=dim)


class GlobalLayerState(GraphFormSteps, SpanExchange, DeviceAssembly):
    """Sinks, local window, and (retrieving modes) span memory of one global-attention layer.

    Args:
        layer_idx: Index of the layer in the model.
        config: Engine configuration.
        pool: Shared paged pool for evicted K/V (None for modes that drop evicted tokens).
        inv_freq: ``[rot_dim / 2]`` rotary inverse frequencies of this layer.
        batch_size: Sequences in the batch.
        consensus: Shared cross-layer evidence (None: layers select alone).
    """

    def __init__(self, layer_idx: int, config: LtriConfig, pool: PagedKVPool | None, inv_freq: torch.Tensor,
                 batch_size: int, consensus: LayerConsensus | None = None) -> None:
        self.layer_idx = layer_idx
        self.cfg = config
        self.pool = pool
        self.inv_freq = inv_freq
        self.batch_size = batch_size
        self.consensus = consensus
        self.sink_k: torch.Tensor | None = None  # [B, Hkv, s, D]
        self.sink_v: torch.Tensor | None = None
        # the window's tensors are views of buffers that grow in place (ltri_rag.window): same address between passes
        self._win_buffers = (WindowBuffer(2), WindowBuffer(2), WindowBuffer(2), WindowBuffer(1))
        self.win_k: torch.Tensor | None = None  # [B, Hkv, w, D]
        self.win_v: torch.Tensor | None = None
        self.win_start = 0  # position of the window's first token
        self.win_mass: torch.Tensor | None = None  # [B, Hkv, w] attention received (retrieving modes)
        self.win_band: torch.Tensor | None = None  # [B, w, band] attention-map band (triangle segmentation)
        self.tables: list[SpanTable] = []
        self.band_width = config.span_max_len if config.segmentation == "triangle" and config.retrieves else 0
        self._last_slots: list[torch.Tensor] = []  # for reporting: the slot lists of the last retrieval
        # What the pass being run will change, applied by commit() once every layer has attended:
        self._pending: tuple[torch.Tensor, ...] | None = None  # (k, v, key_mass, band) of the chunk
        self._pending_recency: dict[int, torch.Tensor] = {}  # sequence -> persistence state after this pass
        self.prompt_selection: dict[int, torch.Tensor] = {}  # sequence -> [S] spans chosen for the prompt's end
        self._pending_prompt_selection: dict[int, torch.Tensor] = {}
        # decode_retrieval_stride > 1: the placed memory part of the last retrieving decode step, reused while its
        # key (the memory's position anchor, span counts, sinks) holds: (key, uses, mem_k, mem_v, mask)
        self._decode_memory: tuple | None = None
        self._pending_decode_memory: tuple | None = None
        # the torch path's placed memory part of the last decode step, reused while it would be built the same
        # (ltri_rag.layer_memory.REUSE_PLACED_MEMORY)
        self._placed_reuse: tuple | None = None
        self.placed_reuses = 0
        # graph-form decode steps: the reused memory part copied into buffers that keep their address
        # ([B, Hkv, M, D] K and V, [B, Hkv, M] mask) and the memory part they hold (the tensors last copied)
        self._graph_memory: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._graph_memory_source: torch.Tensor | None = None

    @property
    def last_selected_tokens(self) -> int:
        """Tokens retrieved at the last retrieval (the most of any sequence and KV head); reads the device when the
        selection ran there."""
        return max((int((slots >= 0).sum(dim=1).max()) for slots in self._last_slots if slots.numel()), default=0)

    # ----------------------------------------------------------------------------------------------- memory part
    def _own_scores(self, table: SpanTable, q_free: torch.Tensor, scaling: float) -> torch.Tensor:
        """``[H, S]`` per-query-head span scores of this layer."""
        if self.cfg.span_scoring == "softmax":
            return span_probabilities(q_free, None, None, len(table), scaling,
                                      backend=self.cfg.attention_backend, layout=table.layout())
        return table.scores(query_summary(q_free))

    def _pinned(self, seq: int, plan: StepPlan, num_spans: int) -> torch.Tensor | None:
        """``[S]`` spans a decode step must keep (``pin_prompt_spans``): those chosen for the prompt's last pass."""
        chosen = self.prompt_selection.get(seq)
        if not (self.cfg.pin_prompt_spans and plan.decode) or chosen is None:
            return None
        pinned = torch.zeros(num_spans, dtype=torch.bool, device=chosen.device)
        pinned[: chosen.numel()] = chosen  # spans stored since then are not pinned
        return pinned

    def _select(self, seq: int, table: SpanTable, q_free: torch.Tensor, scaling: float,
                plan: StepPlan, on_device: bool) -> torch.Tensor:
        """``[rows, S]`` bool selection of one sequence's spans for this step, on the host, or on the compute
        device when ``on_device`` (see :meth:`_selects_on_device`)."""
        cfg = self.cfg
        dry = plan.dry
        scores = self._own_scores(table, q_free, scaling).float()
        if not on_device:
            if not cfg.voting:
                # without votes the ranking reads only each row's mean over its query heads: taken where the
                # scores are, so that the read-back and the host's work scale with rows, not heads (at 1M tokens
                # of an 8B model a layer's scores are 32 x ~64K floats)
                rows = 1 if cfg.retrieval_scope == "shared" else table.num_kv_heads
                scores = scores.reshape(rows, -1, scores.shape[-1]).mean(dim=1)
            # the retrieval's one read-back: ranking, budget fill and persistence are a few dozen small
            # operations, cheaper on the host than as device launches when the host must wait anyway
            scores = scores.cpu()
        recency = table.recency_on(scores.device) if cfg.persistence else None
        pinned = self._pinned(seq, plan, len(table))
        extra = pinned if cfg.pin_extra_budget else None  # pinned on top of the budget, not within it
        # selecting on a GPU: the span geometry is kept there, so the step copies nothing from the host
        geometry = table.geometry_on(scores.device) if scores.device.type != "cpu" else None
        kwargs = dict(num_kv_heads=table.num_kv_heads, scope=cfg.retrieval_scope, voting=cfg.voting,
                      recency=recency, bonus=cfg.persistence_bonus, pinned=None if extra is not None else pinned,
                      device_lengths=None if geometry is None else geometry[0])
        if self.consensus is not None and cfg.consensus_weight > 0:
            # the prior (the previous step's votes) does not depend on this layer's votes: the selection that votes
            # and the one that loads are made together (one sort), then the first one votes
            prior = self.consensus.read(seq, table.lengths, scores.device, geometry)
            own, selected = select_spans_pair(scores, table.lengths, cfg.budget, prior=prior,
                                              prior_weight=cfg.consensus_weight, **kwargs)
            self.consensus.vote(seq, table.lengths, own, geometry)
        else:
            selected = select_spans(scores, table.lengths, cfg.budget, **kwargs)
        if extra is not None:
            selected = selected | extra.to(selected.device)[None, :]
        if cfg.persistence and not dry:
            self._pending_recency[seq] = update_recency(recency, selected, cfg.persistence_decay)
        if not dry and not plan.decode:  # the latest prompt pass: what a decode step pins
            self._pending_prompt_selection[seq] = selected.any(dim=0)
        return selected

    def _selects_on_device(self, q: torch.Tensor) -> bool:
        """Whether this pass selects spans on the compute device (``LtriConfig.selection_on_device``; ``"auto"``:
        where the attention runs in Triton, i.e. on CUDA): the whole retrieval then runs there without a
        read-back. Needs every page of the batch readable from the device (in the pool's device tier, or with
        ``zero_copy_host_pages`` in its pinned host tier) and no ``pin_extra_budget`` (whose selection may outgrow
        the fixed slot list)."""
        choice = self.cfg.selection_on_device
        if choice == "auto":
            choice = q.device.type == "cuda" and _triton_rotates(self.cfg.attention_backend, q.device)
        if not choice or self.pool is None or self.cfg.pin_extra_budget:
            return False
        host_pages = self.cfg.zero_copy_host_pages
        return all(self.pool.readable_on(seq, q.device, host_pages) for seq in range(len(self.tables)))

    def _selections(self, q: torch.Tensor, plan: StepPlan, scaling: float, on_device: bool,
                    position: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Per sequence the ``[rows, S]`` bool selection of its spans for this step (on the host, or on the compute
        device when ``on_device``), or None for a sequence without spans. ``position``: ``[1]`` int64 on ``q``'s
        device holding ``plan.pos0`` (a graph-form step: the queries' positions are then read from the device)."""
        out: list[torch.Tensor | None] = []
        picks, back = scored_rows(q.device, plan, self.cfg, position)
        for seq, table in enumerate(self.tables):
            if len(table) == 0 or self.pool is None:
                out.append(None)
                continue
            q_seq = q[seq] if picks is None else q[seq].index_select(1, picks)
            q_free = rotate(q_seq, back, self.inv_freq, self.cfg.attention_backend)  # [H, c, D] position-free
            with record_function("ltri.retrieve.score_select"):
                out.append(self._select(seq, table, q_free, scaling, plan, on_device))
        return out

    def _assembles_in_one_launch(self, q: torch.Tensor) -> bool:
        """Whether the memory part is planned on the host and built in one Triton launch (:mod:`ltri_rag.assembly`):
        the Triton backend runs on ``q``'s device, spans are selected on the host, and the pool's first tier is on
        that device (not ``kv_offload``)."""
        if not _triton_rotates(self.cfg.attention_backend, q.device) or self._selects_on_device(q):
            return False
        return self.pool is None or self.pool.device == q.device or (
            self.pool.device.type == q.device.type and self.pool.device.index in (None, q.device.index))

    def _assembled_memory(self, q: torch.Tensor, plan: StepPlan,
                          scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """:meth:`_placed_memory`'s ``(q_mem, mem_k, mem_v, mask)`` built by :mod:`ltri_rag.assembly` (one plan copy,
        one launch), or None when the memory is empty."""
        if self.sink_k is None and not any(len(t) for t in self.tables):
            return None
        batch = q.shape[0]
        selections = self._selections(q, plan, scaling, on_device=False) if self.tables else [None] * batch
        num_kv_heads, head_dim, dtype = self._kv_shape(q)
        num_sinks = 0 if self.sink_k is None else self.sink_k.shape[2]
        host = [None if s is None else s.numpy() for s in selections]
        starts = [t.starts.numpy() for t in self.tables] or [None] * batch
        ends = [t.ends.numpy() for t in self.tables] or [None] * batch
        memory_plan = plan_memory(self.pool, host, starts, ends, num_sinks, num_kv_heads, head_dim)
        if memory_plan is None:
            return None
        win_len = 0 if self.win_k is None else self.win_k.shape[2]
        shifts = position_shifts(memory_plan, self.cfg.position_scheme, plan.pos0 - win_len)
        with record_function("ltri.retrieve.gather"):
            mem_k, mem_v, mask = build_memory(memory_plan, shifts, self.pool, self.layer_idx, self.sink_k,
                                              self.sink_v, self.inv_freq, q.device, dtype)
        self._last_slots = [torch.from_numpy(s) for s in memory_plan.slots if s is not None]
        return self._memory_queries(q, plan), mem_k, mem_v, mask

    def _placed_memory(self, q: torch.Tensor, plan: StepPlan,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The memory part of this pass, positioned: ``(q_mem, mem_k, mem_v, mask)`` or None.

        With ``decode_retrieval_stride`` > 1, a decode step reuses the memory part of the last retrieving decode step
        while it is still valid (staged like every change: kept by :meth:`commit`).
        """
        stride = self.cfg.decode_retrieval_stride
        reusable = plan.decode and not plan.dry and stride > 1
        key = None
        if reusable:
            key = self._memory_key(plan)
            if self.reuses_memory(plan):
                self._stage_reuse(plan)
                _, _, mem_k, mem_v, mask = self._decode_memory
                return self._memory_queries(q, plan), mem_k, mem_v, mask
        if self._assembles_in_one_launch(q) or self._assembles_on_device(q):
            fused = self._assembled_memory if self._assembles_in_one_launch(q) else self._device_assembled_memory
            placed = fused(q, plan, scaling)
            if placed is None:
                return None
            q_mem, mem_k, mem_v, mask = placed
        else:
            placed = self._host_placed(q, plan, scaling)
            if placed is None:
                return None
            q_mem, mem_k, mem_v, mask = placed
        if reusable:
            self._pending_decode_memory = (key, 1, mem_k, mem_v, mask)
        return q_mem, mem_k, mem_v, mask

    # ------------------------------------------------------------------------------------------------------ step
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: StepPlan, *, scaling: float,
               softcap: float | None, graph_window: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """One forward pass of this layer.

        Args:
            q: ``[B, H, C, D]`` queries with RoPE at positions ``pos0 .. pos0 + C - 1``.
            k: ``[B, Hkv, C, D]`` keys of the chunk (RoPE applied).
            v: ``[B, Hkv, C, D]``.
            plan: The step's plan.
            scaling: Score multiplier.
            softcap: Optional score soft-capping.
            graph_window: For a graph-form step (``plan.graph``): one-element int64 device tensors holding the
                window's length before the step (where the new token goes), after it, and the step's position
                (see :meth:`_attend_graph`).

        Returns:
            ``[B, H, C, D]`` float32 attention output.
        """
        self._pending_decode_memory = None
        if plan.graph:
            if graph_window is None:
                raise ValueError("a graph-form step needs graph_window")
            return self._attend_graph(q, k, v, plan, scaling, softcap, graph_window)
        with record_function("ltri.retrieve"):
            memory = self._placed_memory(q, plan, scaling)
        fused = decode_attention_backend(self.cfg.attention_backend, q.device) if q.shape[2] == 1 else None
        if fused is not None:  # one decoded token: memory, window and merge in the fused split-K kernel
            with record_function("ltri.attend_decode"):
                q_mem, mem_k, mem_v, mask = memory if memory is not None else (None,) * 4
                win_k, win_v = self._staged_window(k, v)
                local = fused(q, mem_k, mem_v, mask, win_k, win_v, scaling=scaling,
                              band_width=self.band_width, want_key_mass=self.cfg.retrieves, softcap=softcap,
                              q_mem=q_mem)
            if not plan.dry:
                self._pending = (k, v, local.key_mass, local.band)
            return local.out
        # memory part, local part and their merge in one call (one kernel on the Triton backend)
        with record_function("ltri.attend_local"):
            win_len = 0 if self.win_k is None else self.win_k.shape[2]
            local_fn = local_attention_backend(self.cfg.attention_backend, q.device)
            win_k, win_v = self._staged_window(k, v)
            local = local_fn(q, win_k, win_v, scaling=scaling,
                             causal_offset=win_len, band_width=self.band_width, want_key_mass=self.cfg.retrieves,
                             softcap=softcap, memory=memory, mass_step=self.cfg.mass_step(q.shape[2]))
            out = local.out
        if not plan.dry:
            self._pending = (k, v, local.key_mass, local.band)
        return out

    def commit(self, plan: StepPlan) -> None:
        """Apply the pass just attended: absorb the chunk, update persistence. The evicted tokens are cut into spans
        afterwards, for every layer at once (:func:`ltri_rag.eviction.evict_layers`, called by the cache).

        Called by the cache once every layer has attended, so that a forward pass that fails part-way changes no
        layer (see :meth:`discard`).
        """
        for seq, recency in self._pending_recency.items():
            self.tables[seq].recency = recency
        self._pending_recency = {}
        self.prompt_selection.update(self._pending_prompt_selection)
        self._pending_prompt_selection = {}
        if not plan.dry:  # a prompt pass (or a decode step that retrieved nothing) ends any reuse
            self._decode_memory = self._pending_decode_memory
        self._pending_decode_memory = None
        if self._pending is None:
            return
        k, v, key_mass, band = self._pending
        self._pending = None
        with record_function("ltri.absorb"):
            self._absorb(k, v, key_mass, band, plan)

    def discard(self) -> None:
        """Forget the pass just attended (the forward failed)."""
        self._pending = None
        self._pending_recency = {}
        self._pending_prompt_selection = {}
        self._pending_decode_memory = None

    def _staged_window(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[window | chunk]`` keys and values for attention: the chunk written after the window in its buffers,
        not yet part of it (:meth:`_absorb` takes it in)."""
        wk, wv = self._win_buffers[:2]
        win_k, win_v = wk.stage(k), wv.stage(v)
        if self.win_k is not None:  # the same entries (a grown buffer holds them at a new address)
            self.win_k, self.win_v = wk.view, wv.view
        return win_k, win_v

    def _absorb(self, k: torch.Tensor, v: torch.Tensor, key_mass: torch.Tensor | None, band: torch.Tensor | None,
                plan: StepPlan) -> None:
        """Move the chunk into sinks / window and accumulate the window statistics."""
        wk, wv, wmass, wband = self._win_buffers
        win_len = wk.length
        if key_mass is not None:  # a graph-form step's key mass spans the whole allocation
            key_mass = key_mass[:, :, :win_len + plan.q_len]
        if key_mass is not None and self.win_mass is not None and win_len:
            self.win_mass.add_(key_mass[:, :, :win_len])  # in place, in the buffer
        n_s = plan.num_to_sinks
        if n_s:
            self.sink_k = _cat(self.sink_k, k[:, :, :n_s], 2)
            self.sink_v = _cat(self.sink_v, v[:, :, :n_s], 2)
        self.win_k = wk.append(k[:, :, n_s:])
        self.win_v = wv.append(v[:, :, n_s:])
        self.win_start = plan.pos0 + plan.q_len - wk.length  # the window holds the latest tokens
        if key_mass is not None:
            self.win_mass = wmass.append(key_mass[:, :, win_len + n_s:])
        if band is not None:
            self.win_band = wband.append(band[:, n_s:])

    def _drop_oldest(self, n: int) -> None:
        """Drop the ``n`` oldest window tokens (stored already, or discarded by a mode without a span memory)."""
        wk, wv, wmass, wband = self._win_buffers
        self.win_k, self.win_v = wk.drop_front(n), wv.drop_front(n)
        if self.win_mass is not None:
            self.win_mass = wmass.drop_front(n)
        if self.win_band is not None:
            self.win_band = wband.drop_front(n)
        self.win_start += n
