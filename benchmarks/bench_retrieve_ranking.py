"""How :meth:`KVMemory.retrieve` ranks the passage holding an answer under each ranking of
:data:`ltri_rag.memory_query.RANKINGS` (raw attention, attention in excess of a neutral question's, PMI-like).

Per question one session is built as ``KVMemory._retrieve`` builds it (candidate documents imported after the sink
prefix), the neutral question is read in a dry pass (:func:`read_neutral`), the question for real, then
:func:`session_hits` + :func:`aggregate_hits` run once per ranking on the same recorded queries. Reported per
question and ranking: the rank (1-based, top ``k``) of the first region whose character range holds the answer
sentence, and whether the top region is in the answer's document.

Corpora (``--corpora``, joined by ``+``): ``austen`` (the ``ltri-rag demo`` texts and questions), ``pgdev`` (7
questions over the first 2,500 characters of five Paul Graham essays) — the development set; ``excerpts`` (the
integration tests' 1,500-character excerpts of boss, apple, submarine) and ``full`` (the unit test's four full
essays, with 4 more questions) — held out. Stores are built under ``--stores`` when absent (CPU ingest is slow).

    python -m benchmarks.bench_retrieve_ranking --model ~/models/qwen2.5-coder-0.5b/qwen2.5-coder-0.5b.gguf \\
        --stores /tmp/ranking-stores --corpora austen+pgdev+excerpts+full --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import ltri_rag
from benchmarks.tasks import data_dir
from ltri_rag import KVMemory, LtriConfig
from ltri_rag.memory_query import NEUTRAL_QUESTION, RANKINGS, aggregate_hits, read_neutral, session_hits

CONFIG = {"mode": "ltri", "local_window": 512, "budget": 512, "chunk_size": 512, "num_sink_tokens": 64}
DEMO = Path(ltri_rag.__file__).parent / "demo_data"
DEV_ESSAYS = ("founders", "wisdom", "hubs", "gap", "love")

QUESTIONS: dict[str, list[tuple[str, str, str]]] = {  # corpus: [(document, question, answer sentence fragment)]
    "pgdev": [("founders", "Who is the current record holder for flexibility?", "Daniel Gross of Greplin"),
              ("founders", "Which founders are a good example of determination?", "Bill Clerico and Rich Aberman"),
              ("wisdom", "How should intelligence and wisdom be judged?",
               "judge intelligence at its best, and wisdom by its average"),
              ("hubs", "What did the author compare the average town to?", "a roach motel for startup ambitions"),
              ("gap", "What did the author think created electricity when he was five?",
               "electricity was created by electric sockets"),
              ("gap", "Who was a second-rate contemporary of Leonardo?", "Borgognone"),
              ("love", "What did the author's father tell him when he was about 9 or 10?",
               "my father told me I could be whatever")],
    "excerpts": [("boss", "How many startup founders has the author worked with?", "over 200")],
    "full": [("boss", "How many startup founders has the author worked with?", "worked with over 200"),
             ("submarine", "How many stores did the author estimate there were on the Web?",
              "about 5000 stores on the Web"),
             ("submarine", "Which list did the claim about Jeremy Jaynes originate from?", "Spamhaus's ROKSO list"),
             ("apple", "How long can it take to get a bug fix approved in the App Store?", "4-8 weeks"),
             ("vb", "What does the author say making money consists mostly of?",
              "making money consists mostly of errands")],
}


def corpus_texts(name: str) -> dict[str, str]:
    """``{doc_id: text}`` of a corpus."""
    essays = data_dir() / "paul_graham_essays"
    if name == "austen":
        return {n: (DEMO / f"{n}.txt").read_text(encoding="utf-8") for n in ("emma", "northanger_abbey", "persuasion")}
    if name == "pgdev":
        return {n: (essays / f"{n}.txt").read_text(encoding="utf-8")[:2500] for n in DEV_ESSAYS}
    if name == "excerpts":
        return {n: (essays / f"{n}.txt").read_text(encoding="utf-8")[:1500] for n in ("boss", "apple", "submarine")}
    if name == "full":
        return {n: (essays / f"{n}.txt").read_text(encoding="utf-8") for n in ("submarine", "apple", "boss", "vb")}
    raise ValueError(f"unknown corpus {name!r}")


def corpus_questions(name: str) -> list[tuple[str, str, str]]:
    if name == "austen":
        return [(q["document"], q["question"], q["evidence"])
                for q in json.loads((DEMO / "questions.json").read_text(encoding="utf-8"))]
    return QUESTIONS[name]


def locate(text: str, fragment: str) -> tuple[int, int]:
    """Character range of ``fragment`` in ``text``, any run of whitespace matching any other."""
    match = re.search(r"\s+".join(map(re.escape, fragment.split())), text)
    if match is None:
        raise ValueError(f"{fragment!r} is not in the document")
    return match.start(), match.end()


def evaluate(memory: KVMemory, corpus: str, k: int) -> list[dict]:
    """One row per question: timings and, per ranking, the answer region's rank and the top-document check."""
    docs = memory._documents(None, None)
    texts = {d.doc_id: d.text for d in docs}
    rows = []
    for doc, question, fragment in corpus_questions(corpus):
        start, end = locate(texts[doc], fragment)
        t0 = time.perf_counter()
        session, recorder, placements, _ = memory._load_session(docs, record=True)
        t1 = time.perf_counter()
        neutral = read_neutral(session, recorder, memory._question_ids(NEUTRAL_QUESTION))
        t2 = time.perf_counter()
        recorder.recording = True
        session.feed(memory._question_ids(question))
        t3 = time.perf_counter()
        row: dict = {"corpus": corpus, "doc": doc, "question": question, "load_s": round(t1 - t0, 2),
                     "neutral_s": round(t2 - t1, 2), "question_s": round(t3 - t2, 2)}
        for ranking in RANKINGS:
            per_layer = session_hits(recorder, placements, memory.scaling, max(4 * k, 16),
                                     backend=memory.config.attention_backend, neutral=neutral, ranking=ranking)
            hits = aggregate_hits(per_layer, k)
            rank = next((i for i, h in enumerate(hits, 1)
                         if h.doc_id == doc and h.char_start <= start and end <= h.char_end), None)
            row[ranking] = {"rank": rank, "top_doc": bool(hits) and hits[0].doc_id == doc,
                            "top": [(h.doc_id, h.char_start, h.char_end, round(h.score, 4)) for h in hits[:4]]}
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--stores", required=True, help="folder of one store per corpus (built when absent)")
    parser.add_argument("--corpora", default="austen+pgdev+excerpts+full")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="JSON lines file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = ltri_rag.load_model(args.model, dtype="float32", device="cpu")
    rows = []
    for corpus in args.corpora.split("+"):
        path = Path(args.stores) / corpus
        if not path.exists():
            texts = corpus_texts(corpus)
            with KVMemory.create(path, model, tokenizer, LtriConfig(**CONFIG)) as memory:
                memory.add_documents(list(texts.values()), [{"name": n} for n in texts], list(texts), progress=False)
        with KVMemory.open(path, model, tokenizer) as memory:
            for row in evaluate(memory, corpus, args.k):
                rows.append(row)
                print(json.dumps(row), flush=True)
    for ranking in RANKINGS:
        first = sum(r[ranking]["rank"] == 1 for r in rows)
        top = sum(r[ranking]["top_doc"] for r in rows)
        mrr = sum(1 / r[ranking]["rank"] for r in rows if r[ranking]["rank"]) / max(1, len(rows))
        print(f"{ranking:10s} answer region first {first}/{len(rows)}, top document right {top}/{len(rows)}, "
              f"MRR@{args.k} {mrr:.3f}")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
