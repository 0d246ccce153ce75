"""The query side of :class:`~ltri_rag.memory.KVMemory`: which stored spans the model attends to for a question,
how they are ranked across layers, and the decode loop over a session holding imported documents.

**In-model retrieval.** The candidate documents' span memory is imported after the sink prefix and the question is
read (as plain text) by a session whose cache records every global layer's queries with their rotary positions
removed (:class:`QueryRecorder`). Each layer then scores its whole span table as the engine does when it chooses what
to load (:func:`session_hits`): a distribution over spans per query head and token, averaged. Ranking a layer's own
spans this way finds the right document where a single mean query vector does not (measured on five Paul Graham
essays, 13.8K tokens, with Qwen2.5-Coder-0.5B and 9 questions: :meth:`KVMemory.retrieve`'s top region lay in the
answer's essay for 9 of 9, about 2 s each on 2 CPU cores, while the FAISS search below put the right essay first for
2 of 9, its top hits being the documents' first spans; those 9 questions are not kept in the repository).

**Excess over a neutral question (ranking ``excess``, the default).** Some spans draw much of
any question's attention (documents' openings: dates, titles, boilerplate act like attention sinks), so the raw
distribution ``p_q`` often ranks them above the passage with the answer. Before the question, the same session reads
:data:`NEUTRAL_QUESTION` in one dry pass of 6 tokens that changes no state (:func:`read_neutral`: 1.2 s against
3-3.6 s for reading an Austen question, one CPU thread on a busy 2-core machine; retrieve over the four full test
essays took 3.2 s against 2.6-3.3 s without it); its distribution ``p_0`` is what any question pays each span, and a
span scores ``max(p_q - p_0, 0)`` (:func:`span_scores`).

Measured (``benchmarks/bench_retrieve_ranking.py``, Qwen2.5-Coder-0.5B, CPU, float32): rank of the region holding the
answer sentence (top 10; ``-`` beyond) and whether the top region is in the answer's document, ``attention`` ->
``excess``. Development set (the 3 ``ltri-rag demo`` questions over its Austen excerpts; 7 questions over the first
2,500 characters of 5 essays: founders, wisdom, hubs, gap, love): ranks 1,-,2,1,4,5,9,1,1,2 -> 1,10,9,1,1,1,6,1,1,1,
answer region first 4 -> 7 of 10, top document right 6 -> 9 of 10 (``pmi``, ``max(p_q log(p_q/p_0), 0)``: 6 and 9
of 10). Held out (the tests' "200 founders" question over 1,500-character excerpts of boss, apple, submarine, and
over the full submarine, apple, boss, vb essays, plus 4 more questions over the full essays): ranks 4,1,1,-,-,4 ->
1,1,1,3,-,1, answer region first 2 -> 4 of 6, top document right 4 -> 6 of 6. Small samples: no held-out question
got worse, one development question did (Persuasion, 2 -> 9). Spans without excess are ordered by their raw
attention (a weight of :data:`EXCESS_TIE_WEIGHT`), so a retrieval with a large ``k`` still reaches every document.

**Coarse stage.** When the candidates hold more than ``max_memory_tokens`` tokens, the documents to import are first
chosen with the store's FAISS search: per global layer the question's mean position-free query, averaged over each
KV head's query group (:func:`query_vectors`), scored by the store against every span's best index vector.

**Across layers.** Each layer's top hits carry probabilities (the in-model distribution, or a softmax of the FAISS
scores at attention temperature). Hits are taken in order of probability: a hit that overlaps (in tokens) an already
formed region of the same document adds its probability to that region (the one it overlaps most) and widens it,
otherwise it starts a region. A region's score is its probability mass summed over layers divided by the number of
layers, in ``[0, 1]``: the share of the layers' attention over the memory that points at it. Regions are ranked by
score (ties by collection, document, offset), which is deterministic; with ``excess`` the mass is the attention
paid beyond the neutral question's, so a region's score is the share of the layers' attention that the question adds
to it (plus the small tie-breaking share of its raw attention). The returned :class:`~ltri_rag.store.SpanHit`
carries the region's offsets and text and the layer and span index of the hit that started it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ltri_rag.cache import LtriCache
from ltri_rag.config import LtriConfig
from ltri_rag.engine import LtriSession
from ltri_rag.generation import _check_args, decoded_tokens, eos_token_ids, texts_of
from ltri_rag.kernels.scoring import span_probabilities
from ltri_rag.layer import GlobalLayerState
from ltri_rag.rope import rotate
from ltri_rag.store import DocumentInfo, SpanHit, SpanRecord

__all__ = ["DEFAULT_RANKING", "NEUTRAL_QUESTION", "RANKINGS", "MemoryAnswer", "MemoryStream", "Placement",
           "QueryRecorder", "aggregate_hits", "choose_ranked", "decode", "documents_of_hits", "query_vectors",
           "question_queries", "read_neutral", "recording_session",
           "session_hits", "span_scores", "stream_pieces"]

RANKINGS = ("attention", "excess", "pmi")
"""How :func:`session_hits` scores a span from the question's distribution ``p_q`` over a layer's spans and a neutral
question's ``p_0`` (see :func:`span_scores`)."""
DEFAULT_RANKING = "excess"
EXCESS_TIE_WEIGHT = 1e-3  # orders spans without excess by attention (see span_scores)
NEUTRAL_QUESTION = "What is this text about?"
"""The question whose attention over the memory is taken as what any question pays (rankings ``excess``, ``pmi``)."""


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


class QueryRecorder(LtriCache):
    """An :class:`LtriCache` that also keeps each global layer's position-free queries while ``recording``.

    Attributes:
        queries: ``{layer: [[H, C, D] float32 per recorded pass]}``.
    """

    def __init__(self, model: nn.Module, config: LtriConfig) -> None:
        super().__init__(model, config, batch_size=1)
        self.recording = False
        self.record_dry = False  # record dry (look-ahead) passes instead of real ones
        self.queries: dict[int, list[torch.Tensor]] = {}

    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               scaling: float, softcap: float | None = None) -> torch.Tensor:
        """Record ``query [1, H, C, D]`` with its rotary positions removed, then attend as usual."""
        state = self.states[layer_idx]
        if (self.recording and self.plan is not None and self.plan.dry == self.record_dry
                and isinstance(state, GlobalLayerState)):
            positions = torch.arange(self.plan.pos0, self.plan.pos0 + query.shape[2])
            free = rotate(query[0].float(), -positions, state.inv_freq.float())  # [H, C, D]
            self.queries.setdefault(layer_idx, []).append(free)
        return super().attend(layer_idx, query, key, value, scaling=scaling, softcap=softcap)

    def recorded(self, layer_idx: int) -> torch.Tensor:
        """``[H, Q, D]`` the recorded queries of a layer."""
        return torch.cat(self.queries[layer_idx], dim=1)


@torch.inference_mode()
def read_neutral(session: LtriSession, recorder: QueryRecorder, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Read ``ids`` ``[N]`` (the neutral question) in one dry pass at the session's next position and return each
    global layer's position-free queries ``{layer: [H, N, D]}``.

    The pass changes no state: the layers keep nothing and the cross-layer evidence it leaves is put back, so a
    question read next is read exactly as without it. The recorder's own recordings are left as they were.
    """
    consensus = recorder.consensus
    prior = list(consensus.prior) if consensus is not None else None
    kept, recording, record_dry = recorder.queries, recorder.recording, recorder.record_dry
    recorder.queries, recorder.recording, recorder.record_dry = {}, True, True
    try:
        session._forward(session._check_ids(ids.reshape(1, -1)), keep_all=False, dry=True)
        return {layer: recorder.recorded(layer) for layer in recorder.queries}
    finally:
        recorder.queries, recorder.recording, recorder.record_dry = kept, recording, record_dry
        if consensus is not None and prior is not None:
            consensus.prior = prior


def span_scores(probs: torch.Tensor, neutral: torch.Tensor | None, ranking: str) -> torch.Tensor:
    """A layer's span scores ``[S]`` from the question's distribution over its spans ``probs`` ``[S]`` and the
    neutral question's ``neutral`` ``[S]`` (needed unless ``ranking`` is ``attention``).

    ``attention``: ``p_q``. ``excess``: ``(1 - w) max(p_q - p_0, 0) + w p_q`` (``w`` =
    :data:`EXCESS_TIE_WEIGHT`), the attention the question pays a span beyond what any question pays it (spans every
    question attends to, such as documents' openings, are sinks, not evidence); the small ``w p_q`` orders spans
    without excess by their attention instead of tying them at 0, and keeps a layer's scores summing to at most 1.
    ``pmi``: ``max(p_q * log(p_q / p_0), 0)``.
    """
    if ranking == "attention":
        return probs
    if neutral is None:
        raise ValueError(f"ranking {ranking!r} needs the neutral question's distribution")
    if ranking == "excess":
        return (1.0 - EXCESS_TIE_WEIGHT) * (probs - neutral).clamp(min=0) + EXCESS_TIE_WEIGHT * probs
    if ranking == "pmi":
        tiny = torch.finfo(probs.dtype).tiny
        return (probs * (probs.clamp(min=tiny).log() - neutral.clamp(min=tiny).log())).clamp(min=0)
    raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")


def recording_session(model: nn.Module, config: LtriConfig) -> tuple[LtriSession, QueryRecorder]:
    """A session whose cache is a :class:`QueryRecorder` (not recording until told)."""
    session = LtriSession(model, config)
    recorder = QueryRecorder(model, config)
    session.cache = recorder
    session.decode_graph = None  # built for the replaced cache; the recorder's steps run eagerly
    return session, recorder


@torch.inference_mode()
def question_queries(model: nn.Module, config: LtriConfig, sink_ids: torch.Tensor,
                     query_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per global layer, the position-free queries ``[H, Q, D]`` of the question read alone after the sink prefix
    (on the model's device).

    Args:
        sink_ids: ``[num_sink_tokens]`` sink prefix ids (read first, not recorded).
        query_ids: ``[Q]`` the question's ids.
    """
    session, recorder = recording_session(model, config)
    if sink_ids.numel():
        session.feed(sink_ids)
    recorder.recording = True
    session.feed(query_ids)
    return {layer: recorder.recorded(layer) for layer in sorted(recorder.queries)}


@torch.inference_mode()
def query_vectors(model: nn.Module, config: LtriConfig, sink_ids: torch.Tensor, query_ids: torch.Tensor,
                  num_kv_heads: int) -> dict[int, torch.Tensor]:
    """Per global layer, the question's mean query ``[num_kv_heads, head_dim]`` float32 (the FAISS coarse stage,
    used when the store's index vectors exceed ``coarse_bytes``; see :mod:`ltri_rag.memory_coarse`).

    Args:
        sink_ids: ``[num_sink_tokens]`` sink prefix ids (read first, not recorded).
        query_ids: ``[Q]`` the question's ids.
    """
    out = {}
    for layer, queries in question_queries(model, config, sink_ids, query_ids).items():
        mean = queries.mean(dim=1).cpu()  # [H, D]
        out[layer] = mean.view(num_kv_heads, mean.shape[0] // num_kv_heads, mean.shape[1]).mean(dim=1)
    return out


@dataclass(frozen=True)
class Placement:
    """Where one imported document's spans of one layer sit in the session's span table.

    Attributes:
        first_span: Index of the document's first span in the layer's table.
        spans: The document's stored spans of that layer (document-local offsets), in table order.
        doc_id, collection, text: The document.
    """

    first_span: int
    spans: tuple[SpanRecord, ...]
    doc_id: str
    collection: str
    text: str


@torch.inference_mode()
def session_hits(recorder: QueryRecorder, placements: dict[int, list[Placement]], scaling: float, fetch: int,
                 backend: str = "torch", *, neutral: dict[int, torch.Tensor] | None = None,
                 ranking: str = "attention") -> dict[int, list[SpanHit]]:
    """Per global layer, the imported spans the recorded question attends to most, as hits with probabilities.

    Each layer scores its span table as the engine does (:func:`~ltri_rag.kernels.scoring.span_probabilities`:
    per query head and question token a softmax over spans of the best index vector's scaled inner product,
    averaged over tokens), averaged over heads: a distribution over the layer's spans. Its ``fetch`` most probable
    spans that belong to imported documents come back as :class:`SpanHit` s with that probability as ``score``.
    With ``ranking`` other than ``attention`` the score is :func:`span_scores` against the same distribution for the
    ``neutral`` queries (:func:`read_neutral`).
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    out: dict[int, list[SpanHit]] = {}
    for state in recorder.states:
        if not isinstance(state, GlobalLayerState) or not state.tables or state.layer_idx not in recorder.queries:
            continue
        table, places = state.tables[0], placements.get(state.layer_idx, [])
        if len(table) == 0 or not places:
            continue
        queries = recorder.recorded(state.layer_idx).to(table.device, table.dtype)
        probs = span_probabilities(queries, None, None, len(table), scaling, backend=backend,
                                   layout=table.layout()).float().mean(dim=0).cpu()  # [S]
        base = None
        if ranking != "attention":
            if neutral is None or state.layer_idx not in neutral:
                raise ValueError(f"ranking {ranking!r} needs the neutral queries of layer {state.layer_idx}")
            base = span_probabilities(neutral[state.layer_idx].to(table.device, table.dtype),
                                      None, None, len(table), scaling, backend=backend,
                                      layout=table.layout()).float().mean(dim=0).cpu()  # [S]
        probs = span_scores(probs, base, ranking)
        order = torch.argsort(probs, descending=True, stable=True)
        firsts = [p.first_span for p in places]
        hits: list[SpanHit] = []
        for j in order.tolist():
            at = bisect.bisect_right(firsts, j) - 1
            if at < 0 or j - places[at].first_span >= len(places[at].spans):
                continue  # a span of the question itself
            place = places[at]
            span = place.spans[j - place.first_span]
            hits.append(SpanHit(doc_id=place.doc_id, collection=place.collection, layer=state.layer_idx,
                                span_idx=span.span_idx, token_start=span.token_start, token_end=span.token_end,
                                char_start=span.char_start, char_end=span.char_end,
                                text=place.text[span.char_start:span.char_end], score=float(probs[j])))
            if len(hits) == fetch:
                break
        out[state.layer_idx] = hits
    return out


class MemoryStream:
    """An answer being streamed by :meth:`KVMemory.stream`: iterate for text pieces.

    ``spans`` (the recalled spans) and ``documents`` are known before the first piece; ``result`` (a
    :class:`MemoryAnswer`) once the iteration has ended.
    """

    def __init__(self, pieces: Iterator[str], spans: list[SpanHit], documents: list[tuple[str, str]]) -> None:
        self._pieces = pieces
        self.spans = spans
        self.documents = documents
        self.result: MemoryAnswer | None = None

    def __iter__(self) -> Iterator[str]:
        return self._pieces


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


def aggregate_hits(per_layer: dict[int, list[SpanHit]], k: int, temperature: float | None = None) -> list[SpanHit]:
    """Rank distinct document regions from every layer's hits (see the module docstring).

    Args:
        per_layer: ``{layer: hits best first}``.
        k: Regions to return.
        temperature: ``None``: the hits' scores are already the layer's probabilities (:func:`session_hits`);
            else raw scores (:meth:`SpanStore.search`), turned into probabilities by a softmax of
            ``temperature * score`` over the layer's hits.

    Returns:
        At most ``k`` :class:`SpanHit`, best first, ``score`` in ``[0, 1]``.
    """
    weighted: list[tuple[float, SpanHit]] = []
    for layer in sorted(per_layer):
        hits = per_layer[layer]
        if hits and temperature is None:
            weighted += [(h.score, h) for h in hits]
        elif hits:
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


def documents_of_hits(docs: Sequence[DocumentInfo], spans: Sequence[SpanHit]) -> list[DocumentInfo]:
    """``docs`` in the order of their first span among ``spans`` (documents without a span left out)."""
    by_key = {(d.collection, d.doc_id): d for d in docs}
    ranked = dict.fromkeys((h.collection, h.doc_id) for h in spans if (h.collection, h.doc_id) in by_key)
    return [by_key[key] for key in ranked]


def choose_ranked(ranked: Sequence[DocumentInfo], cap: int) -> list[DocumentInfo]:
    """Documents taken in rank order (the first always, the next ones while they fit ``cap`` tokens in all), in
    (collection, id) order."""
    chosen: list[DocumentInfo] = []
    used = 0
    for doc in ranked:
        if chosen and used + doc.num_tokens > cap:
            continue
        chosen.append(doc)
        used += doc.num_tokens
    return sorted(chosen, key=lambda d: (d.collection, d.doc_id))


def decode(model: nn.Module, tokenizer: Any, session: LtriSession, logits: torch.Tensor, *, max_new_tokens: int,
           stop: Sequence[str], temperature: float, top_p: float, seed: int | None,
           lock: Any) -> Iterator[tuple[list[int], str, str | None]]:
    """Decode from ``logits`` ``[vocab]`` (the question's last token): yield ``(ids, text, finish reason or None)``
    after each token, ending with a finish reason (``stop`` or ``length``). ``lock`` guards each model call."""
    _check_args(max_new_tokens, temperature, top_p)
    eos = eos_token_ids(model, tokenizer)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens = decoded_tokens(session, logits, max_new_tokens, temperature=temperature, top_p=top_p,
                            generator=generator, lock=lock)
    yield from texts_of(tokens, tokenizer, eos, stop)


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
