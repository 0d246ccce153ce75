"""The exact coarse-stage scorings compared while choosing ``ltri_rag.memory_coarse``'s (development split decides).

Every query head and token of the question against every index vector of the 40 documents of
``bench_coarse_stage`` (whose store it reads), per layer ``span_probabilities`` (softmax over spans), heads averaged;
documents ranked by: ``mass`` (their summed share), ``mass_excess`` (their share minus the neutral question's,
clamped, plus 1e-3 of the share: the one chosen), ``max`` (their best span), ``max_excess`` (their best span's
excess), ``mass_excess_span`` (summed per-span excess). Run after ``bench_coarse_stage`` built the store::

    python -m benchmarks.coarse_variants MODEL.gguf STORE/memory OUT.json
"""
import argparse
import json
import statistics
import sys
import time

import torch
from ltri_rag.kernels.scoring import span_probabilities

import ltri_rag
from benchmarks.bench_coarse_stage import build_corpus
from benchmarks.tasks import data_dir
from ltri_rag.memory_query import EXCESS_TIE_WEIGHT, NEUTRAL_QUESTION


def main() -> None:
    args = argparse.Namespace(articles=16, essays=12, chapters=12, doc_tokens=1000, per_article=3, seed=0)
    torch.manual_seed(0)
    model, tok = ltri_rag.load_model(sys.argv[1], dtype="float32", device="cpu")
    docs, questions = build_corpus(tok, data_dir(), args)
    memory = ltri_rag.KVMemory.open(sys.argv[2], model, tok)
    layers = memory.global_layers
    tables = {}
    for layer in layers:
        vecs, owner, span_doc, n = [], [], [], 0
        for doc_id, _ in docs:
            ls = memory.store.load_spans(doc_id, layer)
            vecs.append(ls.vectors.float()); owner.append(ls.owner + n); span_doc += [doc_id] * len(ls.spans); n += len(ls.spans)
        tables[layer] = (torch.cat(vecs), torch.cat(owner), n, span_doc)
    print("vectors per layer", {l: tables[l][0].shape[0] for l in layers[:2]}, "spans", tables[layers[0]][2], flush=True)

    def recorded(text):
        from ltri_rag.memory_query import recording_session
        session, rec = recording_session(model, memory.config)
        if memory.sink_ids.numel(): session.feed(memory.sink_ids)
        rec.recording = True
        session.feed(memory._question_ids(text))
        return {l: rec.recorded(l).float().cpu() for l in rec.queries}

    def span_dists(q):
        return {l: span_probabilities(q[l], tables[l][0], tables[l][1], tables[l][2], memory.scaling) for l in layers}  # [H,S]

    neutral = span_dists(recorded(NEUTRAL_QUESTION))
    doc_ids = [d for d, _ in docs]
    def orders(dist, neu):
        out = {}
        for name in ("mass", "mass_excess", "max", "max_excess", "mass_excess_span"):
            score = {d: 0.0 for d in doc_ids}
            for l in layers:
                p = dist[l].mean(0)  # [S] head mean
                p0 = neu[l].mean(0)
                if name == "mass_excess_span" or name == "max_excess":
                    s = (1 - EXCESS_TIE_WEIGHT) * (p - p0).clamp(min=0) + EXCESS_TIE_WEIGHT * p
                else:
                    s = p
                per_doc = {}
                for i, d in enumerate(tables[l][3]):
                    v = float(s[i])
                    per_doc[d] = per_doc.get(d, 0.0) + v if name.startswith("mass") else max(per_doc.get(d, 0.0), v)
                if name == "mass_excess":
                    base = {}
                    for i, d in enumerate(tables[l][3]):
                        base[d] = base.get(d, 0.0) + float(p0[i])
                    per_doc = {d: max(per_doc[d] - base[d], 0) + 1e-3 * per_doc[d] for d in per_doc}
                for d, v in per_doc.items():
                    score[d] += v
            out[name] = sorted(doc_ids, key=lambda d: (-score[d], d))
        return out

    rows = []
    for item in questions:
        t = time.perf_counter()
        o = orders(span_dists(recorded(item["question"])), neutral)
        ranks = {k: v.index(item["doc_id"]) + 1 for k, v in o.items()}
        rows.append(dict(item, ranks=ranks, s=time.perf_counter() - t))
        print(item["split"], item["question"][:50], ranks, f"{rows[-1]['s']:.1f}s", flush=True)
    for split in ("dev", "test"):
        part = [r for r in rows if r["split"] == split]
        for name in rows[0]["ranks"]:
            rk = [r["ranks"][name] for r in part]
            print(split, name, f"MRR {statistics.fmean(1/x for x in rk):.3f} hit1 {sum(x==1 for x in rk)} hit3 {sum(x<=3 for x in rk)} hit5 {sum(x<=5 for x in rk)}")
    with open(sys.argv[3], "w") as out:
        json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
