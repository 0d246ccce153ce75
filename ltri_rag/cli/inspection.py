"""``ltri-rag inspect``: pictures of what the memory does with one document.

* ``attention_L<layer>.png``: the head-mean attention map of a window of the document at one layer, as the engine
  keeps it (the band of ``span_max_len`` keys behind each token that the triangle segmentation reads), with the
  spans the engine cut on it drawn as triangles. The window is read the way ``KVMemory`` ingests a document (a fresh
  session, the sink prefix, then the document's tokens; as many tokens before the window as the local window holds),
  the band is the layer's own (``GlobalLayerState.win_band``) and the spans are what ``flush()`` stores from it; for a
  document that fits in the local window they are the stored spans.
* ``spans_L<layer>.png``: the window's text, each stored span of that layer on its own colour.
* ``retrieval.png`` (with ``--question``): per layer, the score each span of the document gets when the model reads
  the question after the candidate documents (:meth:`KVMemory.retrieve_by_layer`, the per-layer hits that
  :meth:`KVMemory.retrieve` merges), with the regions it cites marked.

The document is a stored one (``--doc ID``, from ``--store``) or a text file, which is first ingested into a temporary
store (removed afterwards).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ltri_rag.cli.documents import collect_documents
from ltri_rag.cli.runtime import CliError, Output, UsageError
from ltri_rag.cli.session import OpenedMemory, open_memory

__all__ = ["AttentionWindow", "LayerRetrieval", "attention_window", "cmd_inspect", "layer_retrieval",
           "pick_layer"]

DEFAULT_OUT = "ltri-inspect"
MAX_WINDOW = 1024


@dataclass(frozen=True)
class AttentionWindow:
    """The attention band of one layer over a window of a document, and the spans the engine cut on it.

    Attributes:
        layer: The layer.
        start: Document offset of the window's first token.
        dense: ``[L, L]`` float32 NumPy array: head-mean probability of query ``start + i`` on key ``start + j``,
            zero outside the band the engine keeps (``band_width`` keys up to and including the query).
        band_width: Keys per row in the band.
        spans: ``(token_start, token_end)`` document offsets of the engine's spans that overlap the window, clipped.
        read_from: First document token the session read (context before the window).
        read_to: End (exclusive) of what it read.
    """

    layer: int
    start: int
    dense: Any
    band_width: int
    spans: list[tuple[int, int]]
    read_from: int
    read_to: int

    @property
    def end(self) -> int:
        """Document offset just past the window."""
        return self.start + int(self.dense.shape[0])


@dataclass(frozen=True)
class LayerRetrieval:
    """Per-layer scores of one document's spans for a question.

    Attributes:
        layers: The global layers, one row each.
        scores: ``[num_layers, num_tokens]`` float32: the score of the span holding each token (NaN: not scored).
        elsewhere: Per layer, the summed score of other documents' spans.
        regions: ``(rank, token_start, token_end)`` of the document's regions among the merged top ``k``.
        cited: Every merged region ``(rank, collection, doc_id, token_start, token_end, score)``.
        documents: Documents the question was read over.
    """

    layers: list[int]
    scores: Any
    elsewhere: list[float]
    regions: list[tuple[int, int, int]]
    cited: list[tuple[int, str, str, int, int, float]]
    documents: int


def pick_layer(memory: Any, layer: int | None) -> int:
    """``layer`` checked against the model's global layers; ``None``: the middle global layer.

    Raises:
        UsageError: not a layer of the model, or a sliding-window layer (no span memory).
    """
    layers = list(memory.global_layers)
    if not layers:
        raise CliError("the model has no global-attention layer: nothing is stored in span memory")
    if layer is None:
        return layers[len(layers) // 2]
    from ltri_rag.cache import layer_sliding_windows

    num_layers = len(layer_sliding_windows(memory.model))
    if not 0 <= layer < num_layers:
        raise UsageError(f"--layer {layer}: the model has {num_layers} layers (0-{num_layers - 1})")
    if layer not in layers:
        raise UsageError(f"--layer {layer} is a sliding-window layer, which keeps no span memory; global layers: "
                         f"{_ranges(layers)}")
    return layer


def _ranges(values: list[int]) -> str:
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(out)


def attention_window(memory: Any, ids: Any, layer: int, start: int, length: int) -> AttentionWindow:
    """Read a window of a document as ingest reads it and return the layer's attention band and spans there.

    The session reads the sink prefix, then document tokens ``[read_from, read_to)``: the whole document when it fits
    in the local window, else the window, ``band_width - 1`` tokens after it (the rows the segmentation also reads)
    and as many tokens before it as the local window holds. Nothing is evicted before the end, so the layer's band
    covers every token read; ``flush()`` then cuts the spans exactly as when a document ends.

    Args:
        memory: An open :class:`~ltri_rag.KVMemory` (its model, config and sink prefix are used).
        ids: ``[T]`` the document's token ids.
        layer: A global layer.
        start: First token of the window.
        length: Tokens in the window (cut at the document's end).

    Raises:
        CliError: the config has no triangle segmentation, or ``start`` is past the end.
    """
    from ltri_rag import LtriSession
    from ltri_rag.spans import band_to_dense

    cfg = memory.config
    if cfg.segmentation != "triangle":
        raise CliError(f"the store's engine config cuts spans with segmentation {cfg.segmentation!r} (mode "
                       f"{cfg.mode!r}); the attention picture needs 'triangle' (mode 'ltri')")
    total = int(ids.numel())
    if not 0 <= start < total:
        raise UsageError(f"--start {start}: the document has {total} tokens (0-{total - 1})")
    end = min(total, start + length)
    band_width = cfg.span_max_len
    if length + band_width - 1 > cfg.local_window:
        raise UsageError(f"--tokens {length}: at most {cfg.local_window - band_width + 1} with this config "
                         f"(local_window {cfg.local_window}, span_max_len {band_width})")
    read_to = total if total <= cfg.local_window else min(total, end + band_width - 1)
    read_from = max(0, read_to - cfg.local_window)
    session = LtriSession(memory.model, cfg)
    if memory.sink_ids.numel():
        session.feed(memory.sink_ids)
    cache = session.cache
    first_slot = cache.memory_tokens()
    session.feed(ids[read_from:read_to])
    state = cache.states[layer]
    band = getattr(state, "win_band", None)
    if band is None or band.shape[1] != read_to - read_from:
        raise RuntimeError(f"layer {layer} holds no attention band for the {read_to - read_from} tokens read")
    rows = band[0, start - read_from:end - read_from].float().cpu()
    dense = band_to_dense(rows).numpy()
    session.flush()
    exported = session.export_memory(first_slot).layers[layer]
    spans = []
    for s, e in zip(exported["starts"].tolist(), exported["ends"].tolist()):
        s, e = s + read_from, e + read_from
        if e > start and s < end:
            spans.append((max(s, start), min(e, end)))
    return AttentionWindow(layer=layer, start=start, dense=dense, band_width=band_width, spans=spans,
                           read_from=read_from, read_to=read_to)


def layer_retrieval(memory: Any, question: str, doc: Any, k: int) -> LayerRetrieval:
    """Per-layer scores of ``doc``'s spans for ``question``, read over the documents of ``doc``'s collection.

    The scores are :meth:`KVMemory.retrieve_by_layer`'s (every span); the cited regions are what
    :meth:`KVMemory.retrieve` returns (the same per-layer hits, each layer's best
    :func:`~ltri_rag.memory_search.hits_per_layer` merged).
    """
    import numpy as np

    from ltri_rag.memory_query import aggregate_hits
    from ltri_rag.memory_search import hits_per_layer

    per_layer = memory.retrieve_by_layer(question, None, collection=doc.collection)
    layers = sorted(memory.global_layers)
    scores = np.full((len(layers), doc.num_tokens), np.nan, dtype=np.float32)
    elsewhere = []
    documents = set()
    for row, layer in enumerate(layers):
        other = 0.0
        for hit in per_layer.get(layer, []):
            documents.add((hit.collection, hit.doc_id))
            if hit.doc_id == doc.doc_id and hit.collection == doc.collection:
                scores[row, hit.token_start:hit.token_end] = hit.score
            else:
                other += hit.score
        elsewhere.append(other)
    fetch = hits_per_layer(k)
    merged = aggregate_hits({layer: hits[:fetch] for layer, hits in per_layer.items()}, k)
    cited = [(rank, h.collection, h.doc_id, h.token_start, h.token_end, h.score) for rank, h in enumerate(merged, 1)]
    regions = [(rank, s, e) for rank, coll, doc_id, s, e, _ in cited
               if doc_id == doc.doc_id and coll == doc.collection]
    return LayerRetrieval(layers=layers, scores=scores, elsewhere=elsewhere, regions=regions, cited=cited,
                          documents=len(documents))


# ------------------------------------------------------------------------------------------------- the command
def _target(args: argparse.Namespace, out: Output, tmp: str | None) -> tuple[OpenedMemory, Any]:
    """Open the store (or a temporary one holding the text file) and return it with the document's info."""
    if args.file is not None:
        docs = collect_documents([args.file])
        if len(docs) != 1:
            raise UsageError(f"{args.file!r} names {len(docs)} files; inspect takes one text file (or --doc ID)")
        assert tmp is not None
        store_args = argparse.Namespace(**{**vars(args), "store": str(Path(tmp) / "store")})
        opened = open_memory(store_args, out, create=True)
        out.status(f"reading {docs[0].path} into a temporary store")
        opened.memory.add_documents([docs[0].text], [{"source": str(docs[0].path)}], [docs[0].doc_id],
                                    progress=out.progress)
        return opened, opened.memory.get([docs[0].doc_id])[0]
    opened = open_memory(args, out, read_only=True)
    collection = args.collection
    present = sorted(doc_id for _, doc_id in opened.memory.list_documents(collection))
    if args.doc not in present:
        opened.memory.close()
        hint = f"; it holds: {', '.join(present[:8])}{'...' if len(present) > 8 else ''}" if present else \
            "; it is empty"
        raise UsageError(f"--doc {args.doc!r} is not in collection {collection!r} of the store at "
                         f"{str(opened.path)!r}{hint}")
    return opened, opened.memory.get([args.doc], collection=collection)[0]


def cmd_inspect(args: argparse.Namespace, out: Output) -> int:
    """Render the attention window, span and (with ``--question``) per-layer retrieval pictures of one document."""
    from ltri_rag.cli import plots
    from ltri_rag.memory_ingest import encode_document

    plots.require_matplotlib()  # before loading anything
    if args.question is not None and not args.question.strip():
        raise UsageError("--question is empty")
    out_dir = Path(args.out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a folder")
    tmp = tempfile.mkdtemp(prefix="ltri-inspect-") if args.file is not None else None
    started = time.perf_counter()
    try:
        opened, doc = _target(args, out, tmp)
        memory = opened.memory
        try:
            layer = pick_layer(memory, args.layer)
            ids, offsets = encode_document(memory.tokenizer, doc.text)
            if int(ids.numel()) != doc.num_tokens:
                raise CliError(f"document {doc.doc_id!r} encodes to {ids.numel()} tokens now, {doc.num_tokens} when "
                               "stored: the tokenizer differs from the store's")
            name = f"{doc.doc_id} ({doc.num_tokens:,} tokens, model {Path(opened.loaded.name).name})"
            out.status(f"reading tokens {args.start}-{args.start + args.tokens} of {doc.doc_id} at layer {layer}")
            window = attention_window(memory, ids, layer, args.start, args.tokens)
            files = [plots.plot_attention_window(out_dir / f"attention_L{layer}.png", window.dense, window.start,
                                                 window.spans, layer=layer, band_width=window.band_width,
                                                 title=name)]
            import torch

            stored = memory.store.load_spans(doc.doc_id, layer, collection=doc.collection).spans
            in_window = [s for s in stored if s.token_end > window.start and s.token_start < window.end]
            char_lo = int(offsets.boundaries(torch.tensor([window.start]))[0])
            char_hi = int(offsets.boundaries(torch.tensor([window.end]))[0])
            files.append(plots.plot_span_text(out_dir / f"spans_L{layer}.png", doc.text[char_lo:char_hi], char_lo,
                                              [(max(s.char_start, char_lo), min(s.char_end, char_hi))
                                               for s in in_window], layer=layer,
                                              title=f"{name}, tokens {window.start}-{window.end}"))
            result: dict[str, Any] = {
                "doc_id": doc.doc_id, "collection": doc.collection, "tokens": doc.num_tokens,
                "model": opened.loaded.name, "layer": layer, "window": [window.start, window.end],
                "window_spans": [list(s) for s in window.spans],
                "stored_spans": [[s.token_start, s.token_end] for s in in_window],
            }
            if args.question is not None:
                out.status("reading the question over the documents")
                retrieval = layer_retrieval(memory, args.question.strip(), doc, args.k)
                others = [f"#{r} {d} (tokens {s}-{e})" for r, c, d, s, e, _ in retrieval.cited
                          if (c, d) != (doc.collection, doc.doc_id)]
                files.append(plots.plot_layer_retrieval(
                    out_dir / "retrieval.png", retrieval.scores, retrieval.layers, question=args.question.strip(),
                    regions=retrieval.regions, score_name=f"{memory.ranking} score", title=name,
                    elsewhere=retrieval.elsewhere if retrieval.documents > 1 else None,
                    note=f"read over {retrieval.documents} documents; also cited: {', '.join(others)}" if others
                    else ""))
                result["question"] = args.question.strip()
                result["documents_read"] = retrieval.documents
                result["cited"] = [{"rank": r, "collection": c, "doc_id": d, "token_start": s, "token_end": e,
                                    "score": round(float(score), 4)} for r, c, d, s, e, score in retrieval.cited]
        finally:
            memory.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["files"] = [str(f) for f in files]
    result["seconds"] = round(time.perf_counter() - started, 3)
    out.json(result)
    out.text(f"{doc.doc_id}: layer {layer}, tokens {window.start}-{window.end}: {len(window.spans)} spans cut on the "
             f"attention band, {len(result['stored_spans'])} stored spans there")
    if args.question is not None:
        cited = ", ".join(f"#{r} {d} tokens {s}-{e}" for r, _, d, s, e, _ in retrieval.cited) or "(none)"
        out.text(f"question read over {retrieval.documents} document(s); cited: {cited}")
    for f in files:
        out.text(f"wrote {f}")
    return 0
