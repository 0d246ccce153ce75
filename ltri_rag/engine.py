"""Driving a model through a long stream: chunked prefill and token-by-token decode.

:class:`LtriSession` is the low-level object: feed it token ids of any length (it splits them into chunks), then
step it one token at a time. Mode ``full`` runs the unmodified model with transformers' own ``DynamicCache``;
the other modes run through :class:`~ltri_rag.cache.LtriCache` and the ``ltri`` attention function.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from ltri_rag import retrieval
from ltri_rag.cache import LtriCache, MemoryExport
from ltri_rag.config import LtriConfig
from ltri_rag.decode_graph import DecodeGraph, graph_unsupported, warn_disabled
from ltri_rag.hook import cache_kwarg_name, ltri_attention_enabled
from ltri_rag.kernels.attention import local_attention, local_attention_backend
from ltri_rag.kernels.precompile import start_in_background
from ltri_rag.kernels.transfer import to_device

__all__ = ["LtriSession", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """The one device holding ``model``'s parameters.

    Raises:
        ValueError: the parameters are spread over several devices (a ``device_map`` placement or an offload:
            the engine keeps each layer's window, sinks and span pool beside one device's computation) or not
            loaded (``meta``), naming the devices; or the model has no parameters.
    """
    devices = {p.device for p in model.parameters()}
    if not devices:
        raise ValueError(f"{type(model).__name__} has no parameters: not a loaded causal LM")
    if len(devices) > 1 or next(iter(devices)).type == "meta":
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"the model's parameters are on {names}: ltri_rag runs a model on one device (load it "
                         "without a device_map that spreads or offloads it, e.g. model.to('cuda'))")
    return next(iter(devices))


class LtriSession:
    """Streaming state of one batch of sequences on one model.

    Args:
        model: A Hugging Face causal LM.
        config: Engine configuration.
        batch_size: Sequences fed together (all of equal length).
        progress: Show a progress bar while prefilling many chunks.

    Attributes:
        decode_graph: Runs the decode steps that reuse their memory part as a CUDA graph
            (:mod:`ltri_rag.decode_graph`; ``config.decode_graph``), or None where they cannot (see
            :func:`~ltri_rag.decode_graph.graph_unsupported`). If capturing fails, decoding goes on eagerly, with a
            warning.

    Example:
        >>> session = LtriSession(model, LtriConfig(mode="ltri"))
        >>> logits = session.feed(input_ids)          # [1, vocab] for the last token
        >>> logits = session.step(logits.argmax(-1))  # one decoded token
    """

    def __init__(self, model: nn.Module, config: LtriConfig, batch_size: int = 1, progress: bool = False) -> None:
        if not isinstance(config, LtriConfig):
            raise TypeError(f"config must be an LtriConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.batch_size = batch_size
        self.progress = progress
        self.device = model_device(model)
        self._cache_kw = cache_kwarg_name(model)
        if config.mode == "full":
            self.cache: LtriCache | DynamicCache = DynamicCache(config=model.config)
        else:
            self.cache = LtriCache(model, config, batch_size=batch_size, device=self.device)
        self.num_tokens = 0
        self.decode_graph: DecodeGraph | None = None
        if isinstance(self.cache, LtriCache) and graph_unsupported(self.cache, self.device) is None:
            self.decode_graph = DecodeGraph(model, self.cache, self._cache_kw)
        if config.retrieves and retrieval.SORT_FILL and self.device.type == "cuda" and \
                local_attention_backend(config.attention_backend, self.device) is not local_attention:
            # the selection sorts' compile variants, in child processes, before the prompt reaches them (CUDA only;
            # LTRI_PRECOMPILE=0 turns it off)
            start_in_background(self.device, retrieval.FILL_TAIL)

    @property
    def cache_kwarg(self) -> str:
        """The model's keyword argument for its cache (``cache`` or ``past_key_values``)."""
        return self._cache_kw

    def _forward(self, input_ids: torch.Tensor, keep_all: bool, dry: bool = False, decode: bool = False
                 ) -> torch.Tensor:
        length = input_ids.shape[1]
        position_ids = torch.arange(self.num_tokens, self.num_tokens + length, device=self.device)
        kwargs = {self._cache_kw: self.cache, "use_cache": True, "logits_to_keep": 0 if keep_all else 1,
                  "position_ids": position_ids.unsqueeze(0).expand(input_ids.shape[0], -1)}
        if isinstance(self.cache, LtriCache):
            self.cache.begin_step(length, dry=dry, decode=decode)
            try:
                with ltri_attention_enabled(self.model):
                    out = self.model(input_ids=input_ids, ltri_cache=self.cache, **kwargs)
            except BaseException:
                self.cache.abort_step()
                raise
            self.cache.end_step()
            if dry:
                return out.logits
        else:
            saved = _cache_snapshot(self.cache)
            try:
                out = self.model(input_ids=input_ids, **kwargs)
            except BaseException:  # the layers that ran appended the chunk's K/V: take them back
                _cache_restore(self.cache, saved)
                raise
        self.num_tokens += length
        return out.logits

    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {type(input_ids).__name__} "
                            f"{getattr(input_ids, 'dtype', '')}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids must be [batch={self.batch_size}, seq_len], got {tuple(input_ids.shape)}")
        return to_device(input_ids, self.device, torch.int64)  # a host tensor goes over without a device sync

    @torch.inference_mode()
    def feed(self, input_ids: torch.Tensor, return_all_logits: bool = False) -> torch.Tensor:
        """Read ``input_ids: [batch, seq_len]`` (or ``[seq_len]``) in chunks of ``config.chunk_size``.

        Mode ``full`` reads them in one pass, as the unmodified model would (in pieces of
        ``config.full_chunk_size`` through transformers' own cache when that is set). With ``config.lookahead`` the last
        chunk is first read once without keeping state, so that every layer's retrieval for it (and for the
        tokens generated next) can use all layers' evidence.

        If a pass fails (any exception, KeyboardInterrupt included), the chunks before it stay read (``num_tokens``
        says how many tokens are) and the failed chunk leaves no trace, so feeding the rest from there is exact. The
        exception: a failure while a finished pass commits its changes (the eviction into the span memory), which
        leaves some layers updated; the session then refuses further work with an error that says so.

        Returns:
            ``[batch, vocab]`` logits of the last token, or ``[batch, seq_len, vocab]`` with ``return_all_logits``.
        """
        input_ids = self._check_ids(input_ids)
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty")
        bounds = self._chunk_bounds(input_ids.shape[1])
        if isinstance(self.cache, LtriCache):
            self.cache.expect_tokens(input_ids.shape[1])  # the span pool sized once for the whole prompt
        pieces = []
        bar = tqdm(bounds, desc=f"prefill ({self.config.mode})", unit="chunk", disable=not self.progress or
                   len(bounds) < 2, leave=False)
        for start, end in bar:
            if end == input_ids.shape[1] and self._lookahead_useful():
                consensus = self.cache.consensus
                prior = list(consensus.prior)  # the look-ahead replaces it; put it back if the real pass fails
                self._forward(input_ids[:, start:end], keep_all=False, dry=True)
                try:
                    logits = self._forward(input_ids[:, start:end], keep_all=return_all_logits)
                except BaseException:
                    consensus.prior = prior
                    raise
            else:
                logits = self._forward(input_ids[:, start:end], keep_all=return_all_logits)
            if return_all_logits or end == input_ids.shape[1]:
                pieces.append(logits)
        return torch.cat(pieces, dim=1) if return_all_logits else pieces[-1][:, -1]

    def _chunk_bounds(self, length: int) -> list[tuple[int, int]]:
        """``(start, end)`` of each chunk: ``chunk_size`` pieces, the last ``final_chunk_size`` tokens apart."""
        if self.config.mode == "full":
            step = self.config.full_chunk_size or length
            return [(s, min(s + step, length)) for s in range(0, length, step)]
        tail = min(self.config.final_chunk_size, length)
        body = length - tail
        bounds = [(s, min(s + self.config.chunk_size, body)) for s in range(0, body, self.config.chunk_size)]
        return bounds + [(body, length)]

    def _lookahead_useful(self) -> bool:
        """A look-ahead pass helps only when enabled and there are spans to vote on."""
        return (isinstance(self.cache, LtriCache) and bool(self.config.lookahead)
                and self.config.consensus_weight > 0 and self.cache.memory_tokens() > 0)

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Decode one token per sequence: ``token_ids: [batch]`` -> next-token logits ``[batch, vocab]``."""
        token_ids = self._check_ids(token_ids.reshape(-1, 1))
        graph = self.decode_graph
        if graph is not None and graph.ready():
            try:
                logits = graph.step(token_ids, self.num_tokens)
            except Exception as exc:  # the step left no trace: run it eagerly, and the next ones too
                if not graph.capture:
                    raise
                warn_disabled(exc)
                self.decode_graph = None
            else:
                self.num_tokens += 1
                return logits
        return self._forward(token_ids, keep_all=False, decode=True)[:, -1]

    def usage(self) -> dict[str, int]:
        """Token accounting: tokens read, tokens held in the span memory, tokens retrieved at the last step."""
        if isinstance(self.cache, LtriCache):
            return {"tokens": self.num_tokens, "memory_tokens": self.cache.memory_tokens(),
                    "retrieved_tokens": self.cache.retrieved_tokens()}
        return {"tokens": self.num_tokens, "memory_tokens": 0, "retrieved_tokens": 0}

    # ------------------------------------------------------------------------------------------- memory
    def _memory_cache(self) -> LtriCache:
        if not isinstance(self.cache, LtriCache):
            raise ValueError("mode 'full' keeps no span memory")
        return self.cache

    @torch.inference_mode()
    def flush(self) -> int:
        """End a piece of text: every global layer's window goes into the span memory (see
        :meth:`LtriCache.flush`). Returns the number of tokens moved."""
        return self._memory_cache().flush()

    def export_memory(self, first_slot: int = 0) -> MemoryExport:
        """The span memory from slot ``first_slot`` on, with positions (batch of 1; see
        :meth:`LtriCache.export_memory`)."""
        return self._memory_cache().export_memory(first_slot)

    @torch.inference_mode()
    def import_memory(self, memory: MemoryExport, advance: int | None = None) -> int:
        """Append exported spans to the span memory; the next token's position moves on by ``advance`` (default: the
        tokens imported). Returns the first slot (see :meth:`LtriCache.import_memory`)."""
        cache = self._memory_cache()
        before = cache.seen_tokens
        first = cache.import_memory(memory, advance)
        self.num_tokens += cache.seen_tokens - before
        return first


def _cache_snapshot(cache: Any) -> tuple[dict[str, Any], list[Any], list[dict[str, Any]]]:
    """What a failed full-mode pass must put back in a transformers cache: its attributes and each layer's (a
    ``DynamicCache`` layer replaces its ``keys`` / ``values`` tensors when it appends, so shallow copies suffice)."""
    layers = list(getattr(cache, "layers", None) or [])
    return dict(vars(cache)), layers, [dict(vars(layer)) for layer in layers]


def _cache_restore(cache: Any, saved: tuple[dict[str, Any], list[Any], list[dict[str, Any]]]) -> None:
    attrs, layers, layer_attrs = saved
    vars(cache).clear()
    vars(cache).update(attrs)
    if "layers" in attrs:
        cache.layers = list(layers)
    for layer, state in zip(layers, layer_attrs):
        vars(layer).clear()
        vars(layer).update(state)
