"""The persistent KV memory against a LangChain-style text RAG pipeline on the same corpus, side by side.

    python -m benchmarks.bench_memory --model qwen=qwen.gguf --sizes 20000 60000 --questions 6 --out DIR

For each corpus size (tokens of the answering model), a corpus of whole documents taken in turn from the data
directory's three sources (SQuAD v1.1 dev articles, one document per article; Paul Graham essays; Austen novels
cut at their chapter headings) is ingested twice:

* **KVMemory** (`ltri_rag.KVMemory`, SQLite + FAISS + safetensors in a fresh folder): ingest seconds (and of them the
  store's writes) and tokens/s,
  against the same model's plain prefill of the same documents (full attention, tokens/s, on the first documents
  up to ``--prefill-sample`` tokens); bytes on disk per token; the time to open the memory again; per question the
  latency of ``retrieve`` and the time to the first streamed token of ``stream`` (retrieval, span import and the
  question included), the prompt tokens read (sink prefix + question) and the tokens served from the memory.
* **text RAG** (`benchmarks.rag.TextRAG`: RecursiveCharacterTextSplitter in the model's tokens, all-MiniLM-L6-v2,
  FAISS): ingest seconds (split + embed + index); per question the retrieval latency (embed + search + fill the
  budget) and the prompt tokens (the retrieved chunks within ``--budget`` tokens, plus the question).

Questions are SQuAD dev questions of the articles in the corpus; for each, both systems' top hit is checked for
coming from the question's article and both answers (greedy, ``--max-new-tokens``) for containing a gold answer.
Writes ``bench.json`` and ``bench.md`` under ``--out``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import ltri_rag
from benchmarks.haystack import load_squad, normalise
from benchmarks.tasks import data_dir

CHAPTER = re.compile(r"\n\s*(?:CHAPTER|Chapter) [0-9IVXLC]+\.?\s*\n")


def corpus_sources(root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]], Any]:
    """``(essays, chapters, articles, squad)``: documents as ``(id, text)`` per source, and the SQuAD set."""
    essays = [(f"pg/{p.stem}", p.read_text(encoding="utf-8")) for p in sorted((root / "paul_graham_essays").glob("*.txt"))]
    chapters = []
    for p in sorted((root / "austen").glob("*.txt")):
        parts = [x.strip() for x in CHAPTER.split(p.read_text(encoding="utf-8")) if len(x.strip()) > 500]
        chapters += [(f"austen/{p.stem}/{i}", text) for i, text in enumerate(parts)]
    squad = load_squad(str(root))
    by_article: dict[int, list[str]] = {}
    for para, article in zip(squad.paragraphs, squad.article_of):
        by_article.setdefault(article, []).append(para)
    articles = [(f"squad/{a}", "\n\n".join(paras)) for a, paras in sorted(by_article.items())]
    return essays, chapters, articles, squad


def build_corpus(tokenizer: Any, sources: tuple[list, list, list], tokens: int) -> tuple[list[tuple[str, str]], int]:
    """Documents taken in turn from the sources until ``tokens`` are reached (sources cycle with a ``#copyN``
    suffix if the size needs more text than there is); returns them and their token count."""
    queues = [list(s) for s in sources]
    docs, total, cycle, i = [], 0, 0, 0
    while total < tokens:
        queue = queues[i % len(queues)]
        if not any(queues):
            cycle += 1
            queues = [list(s) for s in sources]
            continue
        if queue:
            doc_id, text = queue.pop(0)
            docs.append((doc_id if cycle == 0 else f"{doc_id}#copy{cycle}", text))
            total += len(tokenizer(text, add_special_tokens=False)["input_ids"])
        i += 1
    return docs, total


def pick_questions(squad: Any, docs: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str, tuple]]:
    """``n`` SQuAD questions (seeded) of articles in the corpus: ``(article doc id, question, answers)``."""
    present = {doc_id for doc_id, _ in docs if doc_id.startswith("squad/") and "#" not in doc_id}
    pool = [(f"squad/{squad.article_of[p]}", q, a) for p, q, a in squad.questions
            if f"squad/{squad.article_of[p]}" in present]
    return random.Random(seed).sample(pool, min(n, len(pool)))


def answered(text: str, answers: tuple) -> bool:
    return any(normalise(a) in normalise(text) for a in answers)


def plain_prefill_tps(model: Any, tokenizer: Any, docs: list[tuple[str, str]], sample: int) -> float:
    """Tokens/s of the model reading the first documents (up to ``sample`` tokens) with full attention, after one
    untimed read of the first document (the baseline runs first in a size's work: the first forward's one-off costs
    would otherwise count against it alone)."""
    session_tokens, seconds = 0, 0.0
    if docs:
        first = tokenizer(docs[0][1], return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        ltri_rag.LtriSession(model, ltri_rag.LtriConfig(mode="full")).feed(first)
        _sync(model)
    for _, text in docs:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        session = ltri_rag.LtriSession(model, ltri_rag.LtriConfig(mode="full"))
        began = time.perf_counter()
        session.feed(ids)
        _sync(model)
        seconds += time.perf_counter() - began
        session_tokens += ids.shape[1]
        if session_tokens >= sample:
            break
    return session_tokens / max(seconds, 1e-9)


def _sync(model: Any) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_kvmemory(model, tokenizer, config, docs, questions, folder: Path, max_new_tokens: int) -> dict[str, Any]:
    shutil.rmtree(folder, ignore_errors=True)
    texts, ids = [t for _, t in docs], [d for d, _ in docs]
    with ltri_rag.KVMemory.create(folder, model, tokenizer, config) as memory:
        store_s = [0.0]  # of the ingest: the store's writes (K/V files, SQL rows, FAISS), the rest is the model's
        store_add = memory.store.add

        def timed_add(documents):
            began = time.perf_counter()
            try:
                return store_add(documents)
            finally:
                store_s[0] += time.perf_counter() - began

        memory.store.add = timed_add
        began = time.perf_counter()
        memory.add_documents(texts, ids=ids, progress=True)
        ingest_s = time.perf_counter() - began
    began = time.perf_counter()
    memory = ltri_rag.KVMemory.open(folder, model, tokenizer)
    open_s = time.perf_counter() - began
    rows = []
    with memory:
        stats = memory.stats()
        for article, question, answers in questions:
            began = time.perf_counter()
            hits = memory.retrieve(question, k=4)
            retrieve_s = time.perf_counter() - began
            began = time.perf_counter()
            stream = memory.stream(question, max_new_tokens=max_new_tokens)
            pieces = iter(stream)
            first = next(pieces, "")
            ttft_s = time.perf_counter() - began
            text = first + "".join(pieces)
            result = stream.result
            rows.append({"question": question, "retrieve_s": retrieve_s, "ttft_s": ttft_s,
                         "top_hit_right": bool(hits) and hits[0].doc_id == article,
                         "answer": text, "answered": answered(text, answers),
                         "prompt_tokens": result.prompt_tokens if result else None,
                         "memory_tokens": result.memory_tokens if result else None})
    return {"ingest_s": ingest_s, "ingest_store_s": store_s[0], "open_s": open_s, "bytes_on_disk": folder_bytes(folder),
            "stored_tokens": stats.tokens, "store_bytes": stats.bytes_on_disk, "questions": rows}


def bench_text_rag(model, tokenizer, docs, questions, budget: int, max_new_tokens: int) -> dict[str, Any]:
    import faiss

    from benchmarks.rag import TextRAG, _normalised

    rag = TextRAG(tokenizer)
    began = time.perf_counter()
    chunks = [(doc_id, start, text) for doc_id, doc in docs for start, text in rag.split(doc)]
    counts = rag.count_tokens([c[2] for c in chunks])
    vectors = _normalised(rag.embedder([c[2] for c in chunks]), len(chunks), "chunk embeddings")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    ingest_s = time.perf_counter() - began
    rows = []
    for article, question, answers in questions:
        began = time.perf_counter()
        q = _normalised(rag.embedder([question]), 1, "query embedding")
        _, order = index.search(q, min(len(chunks), 64))
        chosen, left = [], budget
        for i in order[0].tolist():
            if 0 <= i and counts[i] <= left:
                chosen.append(i)
                left -= counts[i]
        retrieve_s = time.perf_counter() - began
        context = "\n\n".join(chunks[i][2] for i in sorted(chosen, key=lambda i: (chunks[i][0], chunks[i][1])))
        prompt = f"{context}\n\nAnswer briefly from the text above.\nQuestion: {question}"
        text = ltri_rag.generate(model, tokenizer, [{"role": "user", "content": prompt}],
                                 ltri_rag.LtriConfig(mode="full"), max_new_tokens=max_new_tokens)
        rows.append({"question": question, "retrieve_s": retrieve_s,
                     "top_hit_right": bool(chosen) and chunks[order[0][0]][0] == article,
                     "answer": text, "answered": answered(text, answers),
                     "prompt_tokens": len(tokenizer(prompt, add_special_tokens=False)["input_ids"])})
    return {"ingest_s": ingest_s, "chunks": len(chunks), "questions": rows}


def summary_rows(result: dict[str, Any]) -> list[str]:
    def med(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    header = ("| corpus tokens | system | ingest s | ingest tok/s | plain prefill tok/s | bytes / token | open s | "
              "retrieve ms (median) | TTFT s (median) | prompt tokens (median) | top hit in the right document | "
              "answered |")
    lines = [header, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        n, kv, rag = run["tokens"], run["kvmemory"], run["text_rag"]
        q = len(kv["questions"])
        store = f" (store {kv['ingest_store_s']:.1f})" if "ingest_store_s" in kv else ""
        lines.append(f"| {n:,} | KVMemory | {kv['ingest_s']:.1f}{store} | {n / kv['ingest_s']:,.0f} | "
                     f"{run['plain_prefill_tps']:,.0f} | {kv['bytes_on_disk'] / n:,.0f} | {kv['open_s']:.2f} | "
                     f"{1000 * med(kv['questions'], 'retrieve_s'):.0f} | {med(kv['questions'], 'ttft_s'):.2f} | "
                     f"{med(kv['questions'], 'prompt_tokens'):.0f} (+ memory) | "
                     f"{sum(r['top_hit_right'] for r in kv['questions'])}/{q} | "
                     f"{sum(r['answered'] for r in kv['questions'])}/{q} |")
        lines.append(f"| {n:,} | text RAG | {rag['ingest_s']:.1f} | {n / rag['ingest_s']:,.0f} | - | - | - | "
                     f"{1000 * med(rag['questions'], 'retrieve_s'):.0f} | - | "
                     f"{med(rag['questions'], 'prompt_tokens'):.0f} | "
                     f"{sum(r['top_hit_right'] for r in rag['questions'])}/{q} | "
                     f"{sum(r['answered'] for r in rag['questions'])}/{q} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="NAME=PATH", help="the answering model (Hub id or file)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000], help="corpus sizes in the model's tokens")
    parser.add_argument("--questions", type=int, default=6, help="SQuAD questions per size")
    parser.add_argument("--budget", type=int, default=2048, help="text RAG's retrieved tokens (= ltri's budget)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--prefill-sample", type=int, default=16384, help="tokens of the plain-prefill baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--store-dir", type=Path, default=None,
                        help="where the memories are written (default --out; each is deleted after its size)")
    args = parser.parse_args(argv)
    if any(n < 1000 for n in args.sizes):
        parser.error(f"--sizes must be >= 1000 tokens each, got {args.sizes}")
    if args.questions < 1:
        parser.error(f"--questions must be >= 1, got {args.questions}")
    name, _, path = args.model.partition("=")
    model, tokenizer = ltri_rag.load_model(path or name)
    config = ltri_rag.LtriConfig(mode="ltri", budget=args.budget)
    sources = corpus_sources(data_dir())
    args.out.mkdir(parents=True, exist_ok=True)
    stores = args.store_dir or args.out
    stores.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": args.model, "device": str(model.device), "sizes": args.sizes,
                              "budget": args.budget, "seed": args.seed, "runs": []}
    for size in args.sizes:
        docs, tokens = build_corpus(tokenizer, (sources[2], sources[0], sources[1]), size)
        questions = pick_questions(sources[3], docs, args.questions, args.seed)
        print(f"== {tokens:,} tokens, {len(docs)} documents, {len(questions)} questions", flush=True)
        run = {"tokens": tokens, "documents": len(docs),
               "plain_prefill_tps": plain_prefill_tps(model, tokenizer, docs, args.prefill_sample),
               "kvmemory": bench_kvmemory(model, tokenizer, config, docs, questions, stores / f"mem_{size}",
                                          args.max_new_tokens),
               "text_rag": bench_text_rag(model, tokenizer, docs, questions, args.budget, args.max_new_tokens)}
        shutil.rmtree(stores / f"mem_{size}", ignore_errors=True)
        result["runs"].append(run)
        (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    lines = [f"# KV memory vs text RAG ({args.model.split('=')[0]}, {result['device']})", "", *summary_rows(result)]
    (args.out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
