"""The coarse stage of ``KVMemory.retrieve``: does the FAISS search put the question's document among the first?

When the stored documents hold more than ``max_memory_tokens`` tokens, ``retrieve`` / ``generate`` first choose which
documents to read with the store's FAISS search (per global layer, the question's mean position-free query against
every span's index vectors; ``ltri_rag/memory_search.py``), then rank spans in-model over those documents only. At 1M
tokens (227 documents) the right SQuAD article came first for 2 of 8 questions against 7 of 8 for text RAG
(``benchmarks/results/memory_h200_qwen_1m``). This script measures the coarse stage alone, on a store it builds once
(and reuses), for several ways of scoring, over SQuAD questions split by article into a development and a held-out
set::

    python -m benchmarks.bench_coarse_stage --model ~/models/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b.gguf \\
        --store /tmp/coarse_store --out benchmarks/results/coarse_stage_cpu_qwen

Corpus (``$LTRI_DATA_DIR``): ``--articles`` SQuAD dev articles (their first paragraphs up to ``--doc-tokens``),
``--essays`` Paul Graham essays and ``--chapters`` Austen chapters (their first paragraphs up to the same size).
Questions: up to ``--per-article`` per article whose answer paragraph is in the kept text (seeded); articles at even
positions form the development set, odd ones the held-out set.

Scorings:

* ``library``: what ``KVMemory`` does now (:mod:`ltri_rag.memory_coarse`: every query head and token against every
  index vector, documents by their share of the attention beyond the neutral question's).
* ``mean``: the FAISS search with the question's mean query per layer, 64 hits per layer, documents in the order of
  their first region (what the library did before, and still does past ``coarse_bytes``).

With ``--explore``, the FAISS variants tried on the way:
* ``delta``: the mean query minus ``--lam`` x the neutral question's (``NEUTRAL_QUESTION``) mean query: spans every
  question attends to (documents' openings) lose their lead, as the fine stage's ``excess`` ranking does.
* ``mean256`` / ``delta256``: the same with 256 hits per layer.
* ``tokens_region`` / ``tokens_mass`` (``_excess``): each question token's own FAISS search (KV-group mean query),
  softmax over its hits, averaged over tokens; documents by first region or by summed probability (minus the neutral
  question's).

Per set and scoring: the answer document's rank among documents (MRR, hits at 1 / 3 / 5) and how many documents a
reader would need to import to reach it (tokens). Writes ``coarse.json`` and ``coarse.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import ltri_rag
from benchmarks.bench_memory import corpus_sources
from benchmarks.tasks import data_dir
from ltri_rag.memory_query import (
    EXCESS_TIE_WEIGHT,
    NEUTRAL_QUESTION,
    aggregate_hits,
    query_vectors,
    recording_session,
)


def _first_paragraphs(tokenizer: Any, text: str, tokens: int) -> str:
    """The leading paragraphs of ``text`` up to about ``tokens`` tokens (at least one paragraph)."""
    out, used = [], 0
    for para in [p for p in text.split("\n\n") if p.strip()] or [text]:
        n = len(tokenizer(para, add_special_tokens=False)["input_ids"])
        if out and used + n > tokens:
            break
        out.append(para)
        used += n
    return "\n\n".join(out)


def build_corpus(tokenizer: Any, root: Path, args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[dict]]:
    """``(documents as (id, text), questions as dicts with article id, question, split)``."""
    essays, chapters, articles, squad = corpus_sources(root)
    rng = random.Random(args.seed)
    chosen_articles = rng.sample(articles, args.articles)
    docs = [(doc_id, _first_paragraphs(tokenizer, text, args.doc_tokens)) for doc_id, text in chosen_articles]
    docs += [(doc_id, _first_paragraphs(tokenizer, text, args.doc_tokens))
             for doc_id, text in rng.sample(essays, args.essays) + rng.sample(chapters, args.chapters)]
    kept = dict(docs)
    questions = []
    for position, (doc_id, _) in enumerate(chosen_articles):
        article = int(doc_id.split("/")[1])
        pool = [(p, q, a) for p, q, a in squad.questions
                if squad.article_of[p] == article and squad.paragraphs[p] in kept[doc_id]]
        for p, q, a in rng.sample(pool, min(args.per_article, len(pool))):
            questions.append({"doc_id": doc_id, "question": q, "answers": list(a),
                              "split": "dev" if position % 2 == 0 else "test"})
    return docs, questions


def coarse_order(memory: Any, queries: dict[int, torch.Tensor], fetch: int) -> list[str]:
    """Document ids in the order the coarse stage would take them."""
    per_layer = {layer: memory.store.search(layer, q, fetch) for layer, q in queries.items()}
    order: list[str] = []
    for hit in aggregate_hits(per_layer, 1 << 30, memory.scaling / memory.num_kv_heads):
        if hit.doc_id not in order:
            order.append(hit.doc_id)
    return order


def token_queries(model: Any, memory: Any, text: str) -> dict[int, torch.Tensor]:
    """Per global layer the question's position-free queries per token, each KV head's group averaged:
    ``{layer: [Q, Hkv, D]}``."""
    session, recorder = recording_session(model, memory.config)
    if memory.sink_ids.numel():
        session.feed(memory.sink_ids)
    recorder.recording = True
    session.feed(memory._question_ids(text))
    out = {}
    for layer in sorted(recorder.queries):
        q = recorder.recorded(layer).float().cpu()  # [H, Q, D]
        heads, length, dim = q.shape
        out[layer] = q.view(memory.num_kv_heads, heads // memory.num_kv_heads, length, dim).mean(1).permute(1, 0, 2)
    return out


def token_distributions(memory: Any, queries: dict[int, torch.Tensor], fetch: int) -> dict[int, dict[tuple, tuple]]:
    """Per layer ``{(doc, span): (mean probability over the question's tokens, a hit)}``: each token's own
    distribution over its top ``fetch`` spans (softmax at attention temperature), averaged over tokens, as the fine
    stage averages per-token distributions (a span outside a token's top hits counts 0 for it)."""
    temperature = memory.scaling / memory.num_kv_heads
    out = {}
    for layer, per_token in queries.items():
        acc: dict[tuple, list] = {}
        for q in per_token:
            hits = memory.store.search(layer, q, fetch)
            if not hits:
                continue
            probs = torch.softmax(torch.tensor([h.score for h in hits], dtype=torch.float64) * temperature, 0)
            for p, h in zip(probs.tolist(), hits):
                entry = acc.setdefault((h.collection, h.doc_id, h.span_idx), [0.0, h])
                entry[0] += p / len(per_token)
        out[layer] = {key: (p, h) for key, (p, h) in acc.items()}
    return out


def order_from_distributions(dists: dict[int, dict[tuple, tuple]], neutral: dict[int, dict[tuple, tuple]] | None,
                             by: str) -> list[str]:
    """Documents ranked from per-layer span distributions (minus the neutral question's, with ``neutral``):
    ``region``: by their first region (as the library aggregates); ``mass``: by their summed score."""
    per_layer = {}
    for layer, dist in dists.items():
        base = neutral.get(layer, {}) if neutral is not None else {}
        scored = []
        for key, (p, hit) in dist.items():
            score = p if neutral is None else (1 - EXCESS_TIE_WEIGHT) * max(p - base.get(key, (0.0,))[0], 0.0) \
                + EXCESS_TIE_WEIGHT * p
            scored.append(dataclasses.replace(hit, score=score))
        per_layer[layer] = sorted(scored, key=lambda h: -h.score)
    if by == "mass":
        mass: dict[str, float] = {}
        for hits in per_layer.values():
            for h in hits:
                mass[h.doc_id] = mass.get(h.doc_id, 0.0) + h.score
        return sorted(mass, key=lambda d: (-mass[d], d))
    order: list[str] = []
    for hit in aggregate_hits(per_layer, 1 << 30):
        if hit.doc_id not in order:
            order.append(hit.doc_id)
    return order


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="GGUF file or Hugging Face folder")
    parser.add_argument("--store", type=Path, required=True, help="where the store is built (reused if it matches)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--articles", type=int, default=16)
    parser.add_argument("--essays", type=int, default=12)
    parser.add_argument("--chapters", type=int, default=12)
    parser.add_argument("--doc-tokens", type=int, default=1000)
    parser.add_argument("--per-article", type=int, default=3)
    parser.add_argument("--lam", type=float, nargs="+", default=[1.0])
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--fetch", type=int, default=64, help="hits per token and layer of the tokens_* scorings")
    parser.add_argument("--explore", action="store_true",
                        help="also the FAISS variants tried while choosing (delta*, mean256, tokens_*; slow)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model, tokenizer = ltri_rag.load_model(args.model, dtype="float32", device="cpu")
    docs, questions = build_corpus(tokenizer, data_dir(), args)
    manifest = args.store / "corpus.json"
    wanted = [doc_id for doc_id, _ in docs]
    config = ltri_rag.LtriConfig(mode="ltri", budget=args.budget)
    # a store is reused only for the same documents, texts, engine settings and model file
    built = {"docs": wanted, "texts_sha256": hashlib.sha256("\0".join(t for _, t in docs).encode()).hexdigest(),
             "config": repr(config), "model": str(args.model)}
    if manifest.is_file() and {k: json.loads(manifest.read_text()).get(k) for k in built} == built:
        memory = ltri_rag.KVMemory.open(args.store / "memory", model, tokenizer)
        ingest_s = json.loads(manifest.read_text())["ingest_s"]
    else:
        args.store.mkdir(parents=True, exist_ok=True)
        memory = ltri_rag.KVMemory.create(args.store / "memory", model, tokenizer, config)
        began = time.perf_counter()
        memory.add_documents([t for _, t in docs], ids=wanted, progress=True)
        ingest_s = time.perf_counter() - began
        manifest.write_text(json.dumps({**built, "ingest_s": ingest_s}))
    tokens = {info.doc_id: info.num_tokens for info in memory.store.get(wanted)}

    neutral = query_vectors(model, memory.config, memory.sink_ids, memory._question_ids(NEUTRAL_QUESTION),
                            memory.num_kv_heads)
    scorings: dict[str, tuple[float, int]] = {"mean": (0.0, 64)}
    token_scorings: list[str] = []
    if args.explore:
        scorings["mean256"] = (0.0, 256)
        for lam in args.lam:
            scorings[f"delta{lam:g}"] = (lam, 64)
            scorings[f"delta{lam:g}_256"] = (lam, 256)
        neutral_dist = token_distributions(memory, token_queries(model, memory, NEUTRAL_QUESTION), args.fetch)
        token_scorings = [f"tokens_{by}{'_excess' if ex else ''}" for by in ("region", "mass") for ex in (False, True)]
    candidates = memory._documents(None, None)
    rows = []
    for item in questions:
        ids = memory._question_ids(item["question"])
        began = time.perf_counter()
        with memory._lock:
            library = memory._coarse_order(ids, candidates, None, None)
        row = dict(item, library_s=time.perf_counter() - began, ranks={}, tokens_to_reach={})
        orders = {"library": [d.doc_id for d in library]}
        q = query_vectors(model, memory.config, memory.sink_ids, ids, memory.num_kv_heads)
        for name, (lam, fetch) in scorings.items():
            queries = {layer: v - lam * neutral[layer] for layer, v in q.items()}
            orders[name] = coarse_order(memory, queries, fetch)
        if args.explore:
            dists = token_distributions(memory, token_queries(model, memory, item["question"]), args.fetch)
            for name in token_scorings:
                orders[name] = order_from_distributions(dists, neutral_dist if name.endswith("excess") else None,
                                                        "mass" if "_mass" in name else "region")
        for name, order in orders.items():
            rank = order.index(item["doc_id"]) + 1 if item["doc_id"] in order else None
            row["ranks"][name] = rank
            row["tokens_to_reach"][name] = sum(tokens[d] for d in order[:rank]) if rank else None
        rows.append(row)
        print(f"[{item['split']}] {item['question'][:60]!r}: " +
              ", ".join(f"{n} {r}" for n, r in row["ranks"].items()), flush=True)
    memory.close()

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for split in ("dev", "test"):
        part = [r for r in rows if r["split"] == split]
        summary[split] = {}
        for name in ["library", *scorings, *token_scorings]:
            ranks = [r["ranks"][name] for r in part]
            reach = [r["tokens_to_reach"][name] for r in part if r["tokens_to_reach"][name] is not None]
            summary[split][name] = {
                "questions": len(part),
                "mrr": statistics.fmean(1 / r if r else 0.0 for r in ranks),
                "hit1": sum(r == 1 for r in ranks), "hit3": sum(bool(r) and r <= 3 for r in ranks),
                "hit5": sum(bool(r) and r <= 5 for r in ranks), "missing": sum(r is None for r in ranks),
                "median_tokens_to_reach": statistics.median(reach) if reach else None}
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "documents": len(docs), "stored_tokens": sum(tokens.values()), "ingest_s": ingest_s,
              "questions": rows, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coarse.json").write_text(json.dumps(result, indent=1))
    lines = [f"{len(docs)} documents, {sum(tokens.values()):,} tokens; ingest {ingest_s:.0f} s", "",
             "| set | scoring | questions | MRR | hit@1 | hit@3 | hit@5 | median tokens to reach |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for split, by_name in summary.items():
        for name, s in by_name.items():
            lines.append(f"| {split} | {name} | {s['questions']} | {s['mrr']:.3f} | {s['hit1']} | {s['hit3']} | "
                         f"{s['hit5']} | {s['median_tokens_to_reach']} |")
    (args.out / "coarse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
