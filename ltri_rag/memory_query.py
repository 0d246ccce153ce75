"""The query side of :class:`~ltri_rag.memory.KVMemory`: the question's per-layer query vectors, the ranking of
stored spans across layers, and the decode loop over a session holding imported documents.

**Query vectors.** The question is read after the sink prefix by a session whose cache records, for every global
layer, the question tokens' queries with their rotary positions removed (the same position-free form the index
vectors are stored in); their mean over tokens, averaged over each KV head's group of query heads, is the layer's
query ``[num_kv_heads, head_dim]``. The store scores a span by the best of its index vectors, summing the inner
product over the KV heads.

**Across layers.** Each layer's hits (its top ``max(4 k, 16)`` spans) are turned into probabilities by a softmax at
attention temperature (``scaling / num_kv_heads``: the mean over KV heads of the scaled inner product). Hits are then
taken in order of probability: a hit that overlaps (in tokens) an already formed region of the same document adds its
probability to that region (the one it overlaps most) and widens it, otherwise it starts a region. A region's score
is its probability mass summed over layers divided by the number of layers searched, in ``[0, 1]``: the share of the
layers' retrieval that points at it. Regions are ranked by score (ties by collection, document, offset), which is
deterministic; the returned :class:`~ltri_rag.store.SpanHit` carries the region's offsets and text and the layer and
span index of the hit that started it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ltri_rag.cache import LtriCache
from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession
from ltri_rag.generation import _check_args, _pick, eos_token_ids
from ltri_rag.layer import GlobalLayerState
from ltri_rag.rope import rotate
from ltri_rag.store import SpanHit

__all__ = ["MemoryAnswer", "aggregate_hits", "decode", "query_vectors", "stream_pieces"]


@dataclass(frozen=True)
class MemoryAnswer:
    """What :meth:`KVMemory.generate` returns.

    Attributes:
        text: The generated answer (stop strings cut off).
        token_ids: Generated token ids (stop tokens excluded).
        spans: The spans recalled for the question (:meth:`KVMemory.retrieve`'s hits), best first, for citations.
        documents: ``(collection, doc_id)`` of the documents whose span memory the answer was generated over.
        prompt_tokens: Tokens read before decoding (sink prefix + question).
        memory_tokens: Tokens imported from the store into the span memory.
        finish_reason: ``stop`` (end-of-sequence token or stop string) or ``length``.
        usage: The engine's accounting at the end (:meth:`LtriSession.usage`).
    """

    text: str
    token_ids: list[int]
    spans: list[SpanHit]
    documents: list[tuple[str, str]]
    prompt_tokens: int
    memory_tokens: int
    finish_reason: str
    usage: dict[str, int] = field(default_factory=dict)


class _QueryRecorder(LtriCache):
    """An :class:`LtriCache` that also sums each global layer's position-free queries while ``recording``."""

    def __init__(self, model: nn.Module, config: LtriConfig) -> None:
        super().__init__(model, config, batch_size=1)
        self.recording = False
        self.sums: dict[int, torch.Tensor] = {}  # layer -> [H, D] float32 sum over tokens
        self.counts: dict[int, int] = {}

    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               scaling: float, softcap: float | None = None) -> torch.Tensor:
        """Record ``query [1, H, C, D]`` (rotary positions removed), then attend as usual."""
        state = self.states[layer_idx]
        if self.recording and self.plan is not None and not self.plan.dry and isinstance(state, GlobalLayerState):
            positions = torch.arange(self.plan.pos0, self.plan.pos0 + query.shape[2])
            free = rotate(query[0].float(), -positions, state.inv_freq.float())  # [H, C, D]
            self.sums[layer_idx] = self.sums.get(layer_idx, 0) + free.sum(dim=1).cpu()
            self.counts[layer_idx] = self.counts.get(layer_idx, 0) + query.shape[2]
        return super().attend(layer_idx, query, key, value, scaling=scaling, softcap=softcap)


@torch.inference_mode()
def query_vectors(model: nn.Module, config: LtriConfig, sink_ids: torch.Tensor, query_ids: torch.Tensor,
                  num_kv_heads: int) -> dict[int, torch.Tensor]:
    """Per global layer, the question's query ``[num_kv_heads, head_dim]`` float32 (see the module docstring).

    Args:
        sink_ids: ``[num_sink_tokens]`` sink prefix ids (read first, not recorded).
        query_ids: ``[Q]`` the question's ids.
    """
    session = LtriSession(model, config)
    recorder = _QueryRecorder(model, config)
    session.cache = recorder
    if sink_ids.numel():
        session.feed(sink_ids)
    recorder.recording = True
    session.feed(query_ids)
    out = {}
    for layer, total in sorted(recorder.sums.items()):
        mean = total / recorder.counts[layer]  # [H, D]
        out[layer] = mean.view(num_kv_heads, mean.shape[0] // num_kv_heads, mean.shape[1]).mean(dim=1)
    return out


@dataclass
class _Region:
    anchor: SpanHit
    members: list[SpanHit]
    mass: float


def _overlap(a: SpanHit, b: SpanHit) -> int:
    return min(a.token_end, b.token_end) - max(a.token_start, b.token_start)


def _merged(region: _Region, score: float) -> SpanHit:
    members = sorted(region.members, key=lambda h: (h.char_start, h.char_end))
    text, cursor = "", members[0].char_start
    for hit in members:
        if hit.char_end > cursor:
            text += hit.text[max(0, cursor - hit.char_start):]
            cursor = hit.char_end
    a = region.anchor
    return SpanHit(doc_id=a.doc_id, collection=a.collection, layer=a.layer, span_idx=a.span_idx,
                   token_start=min(h.token_start for h in members), token_end=max(h.token_end for h in members),
                   char_start=members[0].char_start, char_end=cursor, text=text, score=score)


def aggregate_hits(per_layer: dict[int, list[SpanHit]], k: int, temperature: float) -> list[SpanHit]:
    """Rank distinct document regions from every layer's hits (see the module docstring).

    Args:
        per_layer: ``{layer: hits best first}`` from :meth:`SpanStore.search`.
        k: Regions to return.
        temperature: Multiplier of the raw scores inside each layer's softmax.

    Returns:
        At most ``k`` :class:`SpanHit`, best first, ``score`` in ``[0, 1]``.
    """
    weighted: list[tuple[float, SpanHit]] = []
    for layer in sorted(per_layer):
        hits = per_layer[layer]
        if hits:
            probs = torch.softmax(torch.tensor([h.score for h in hits], dtype=torch.float64) * temperature, dim=0)
            weighted += list(zip(probs.tolist(), hits))
    weighted.sort(key=lambda t: (-t[0], t[1].collection, t[1].doc_id, t[1].token_start, t[1].layer))
    regions: dict[tuple[str, str], list[_Region]] = {}
    for prob, hit in weighted:
        doc_regions = regions.setdefault((hit.collection, hit.doc_id), [])
        best, best_overlap = None, 0
        for region in doc_regions:
            overlap = _overlap(hit, region.anchor)
            if overlap > best_overlap:
                best, best_overlap = region, overlap
        if best is None:
            doc_regions.append(_Region(anchor=hit, members=[hit], mass=prob))
        else:
            best.members.append(hit)
            best.mass += prob
    layers = max(1, len(per_layer))
    ranked = sorted((r for rs in regions.values() for r in rs),
                    key=lambda r: (-r.mass, r.anchor.collection, r.anchor.doc_id, r.anchor.token_start))
    return [_merged(r, r.mass / layers) for r in ranked[:k]]


def decode(model: nn.Module, tokenizer: Any, session: LtriSession, logits: torch.Tensor, *, max_new_tokens: int,
           stop: Sequence[str], temperature: float, top_p: float, seed: int | None,
           lock: Any) -> Iterator[tuple[list[int], str, str | None]]:
    """Decode from ``logits`` ``[vocab]`` (the question's last token): yield ``(ids, text, finish reason or None)``
    after each token, ending with a finish reason (``stop`` or ``length``). ``lock`` guards each model call."""
    _check_args(max_new_tokens, temperature, top_p)
    eos = eos_token_ids(model, tokenizer)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        token = _pick(logits, temperature, top_p, generator)
        if token in eos:
            yield out, text, "stop"
            return
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        if cut >= 0:
            yield out, text[:cut], "stop"
            return
        yield out, text, None
        if len(out) < max_new_tokens:
            with lock:
                logits = session.step(torch.tensor([token]))[0]
    yield out, text, "length"


def stream_pieces(steps: Iterator[tuple[list[int], str, str | None]], stop: Sequence[str]
                  ) -> Iterator[tuple[str, tuple[list[int], str, str | None]]]:
    """Turn :func:`decode`'s steps into ``(new text piece, step)``, holding back a trailing partial character and
    any text that could still become a stop string (the piece may be empty)."""
    emitted = 0
    for step in steps:
        _, text, reason = step
        hold = max((len(s) - 1 for s in stop if s), default=0) if reason is None else 0
        safe = len(text.rstrip("\ufffd")) if reason is None else len(text)
        upto = max(emitted, safe - hold)
        piece = text[emitted:upto]
        emitted = max(emitted, upto)
        yield piece, step
