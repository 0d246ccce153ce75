"""``ltri-rag demo``: the whole loop on bundled public-domain texts, offline.

It reads three short Jane Austen excerpts (``ltri_rag/demo_data``) into a fresh store, asks questions whose answers
sit deep inside them (``questions.json``), and prints each answer with its cited spans, whether it holds the expected
fact, and timings.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ltri_rag.cli.commands import answer_question, print_citations
from ltri_rag.cli.runtime import CliError, Output
from ltri_rag.cli.session import open_memory

__all__ = ["DemoQuestion", "cmd_demo", "demo_documents", "demo_questions", "is_correct"]


@dataclass(frozen=True)
class DemoQuestion:
    """A demo question: the document holding the answer, the passage stating it (``evidence``), and words a correct
    answer contains (one of them)."""

    question: str
    document: str
    evidence: str
    expect: tuple[str, ...]


def _data() -> Any:
    return resources.files("ltri_rag") / "demo_data"


def demo_documents() -> dict[str, str]:
    """``{doc_id: text}`` of the bundled excerpts (the file names without ``.txt``)."""
    docs = {entry.name.removesuffix(".txt"): entry.read_text(encoding="utf-8") for entry in _data().iterdir()
            if entry.name.endswith(".txt")}
    if not docs:
        raise CliError("the demo texts are missing from the installed package (ltri_rag/demo_data/*.txt)")
    return dict(sorted(docs.items()))


def demo_questions() -> list[DemoQuestion]:
    """The demo's questions (``questions.json``)."""
    raw = json.loads((_data() / "questions.json").read_text(encoding="utf-8"))
    return [DemoQuestion(q["question"], q["document"], q["evidence"], tuple(q["expect"])) for q in raw]


def is_correct(answer: str, expect: tuple[str, ...]) -> bool:
    """Whether ``answer`` contains one of the expected words (whole words, case-insensitive)."""
    return any(re.search(rf"\b{re.escape(word)}\b", answer, flags=re.IGNORECASE) for word in expect)


def _passage_rank(hits: list[Any], q: DemoQuestion, text: str) -> int | None:
    """1-based rank of the first cited span that covers the start of the question's evidence, or None."""
    at = text.find(q.evidence)
    for rank, hit in enumerate(hits, 1):
        if hit.doc_id == q.document and hit.char_start <= at < hit.char_end:
            return rank
    return None


def _rank_text(rank: int | None) -> str:
    return f"cited #{rank}" if rank is not None else "not cited"


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    """Ingest the bundled excerpts into a store (a temporary one unless ``--store`` is given), answer the demo
    questions with citations and timings."""
    docs = demo_documents()
    questions = demo_questions()
    keep = args.store is not None
    tmp = None if keep else tempfile.mkdtemp(prefix="ltri-demo-")
    store_args = argparse.Namespace(**{**vars(args), "store": args.store or str(Path(tmp) / "store")})
    total_start = time.perf_counter()
    out.text(f"ltri-rag demo: {len(docs)} public-domain excerpts (Jane Austen), {len(questions)} questions, "
             "answered by in-model KV retrieval")
    try:
        opened = open_memory(store_args, out, create=True)
        memory = opened.memory
        try:
            out.text(f"model: {opened.loaded.name} ({opened.loaded.source}), loaded in {opened.loaded.seconds:.1f} s")
            present = {doc_id for _, doc_id in memory.list_documents("default")}
            todo = {doc_id: text for doc_id, text in docs.items() if doc_id not in present}
            start = time.perf_counter()
            if todo:
                out.status(f"reading {len(todo)} documents into the memory")
                memory.add_documents(list(todo.values()), [{"source": f"demo_data/{d}.txt"} for d in todo],
                                     list(todo), progress=out.progress)
            ingest_s = time.perf_counter() - start
            tokens = memory.stats().tokens
            out.text(f"ingest: {len(docs)} documents, {tokens:,} tokens in {ingest_s:.1f} s"
                     + (f" ({tokens / ingest_s:,.0f} tok/s)" if todo and ingest_s > 0 else " (already stored)"))
            results = []
            for n, q in enumerate(questions, 1):
                out.text(f"\nQ{n}: {q.question}\nA{n}: ", end="")
                result = answer_question(opened, out, q.question, max_new_tokens=args.max_new_tokens, k=args.k,
                                         collection=None, filter=None, temperature=0.0, seed=None)
                hits = result.pop("hits")
                correct = is_correct(result["answer"], q.expect)
                doc_rank = next((i for i, h in enumerate(hits, 1) if h.doc_id == q.document), None)
                passage_rank = _passage_rank(hits, q, docs[q.document])
                print_citations(out, hits, indent="    ")
                verdict = "holds the expected" if correct else "does NOT hold the expected"
                out.text(f"    answer {verdict} {' / '.join(q.expect)!r}; its document {q.document!r}: "
                         f"{_rank_text(doc_rank)}, the passage stating it: {_rank_text(passage_rank)}; retrieve + "
                         f"read {result['retrieve_s']:.1f} s, answer {result['answer_s']:.1f} s")
                results.append({"question": q.question, "document": q.document, "expect": list(q.expect),
                                "correct": correct, "document_rank": doc_rank, "passage_rank": passage_rank,
                                **result})
        finally:
            memory.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    total_s = time.perf_counter() - total_start
    right = sum(r["correct"] for r in results)
    summary = {"model": opened.loaded.name, "source": opened.loaded.source, "documents": list(docs),
               "tokens": tokens, "load_model_s": round(opened.loaded.seconds, 3), "ingest_s": round(ingest_s, 3),
               "questions": results, "correct": right, "total_s": round(total_s, 3),
               "store": str(opened.path) if keep else None}
    out.json(summary)
    out.text(f"\n{right}/{len(results)} answers hold the expected fact; total {total_s:.0f} s"
             + (f"; store kept at {opened.path}" if keep else ""))
    return 0
