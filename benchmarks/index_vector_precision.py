"""How much retrieval changes when the index vectors take fewer bytes: a dev-split check before building it.

    LTRI_DATA_DIR=... python -m benchmarks.index_vector_precision --model qwen=MODEL.gguf --length 16384 \\
        --tasks niah_multikey qa_squad --samples 2 --variants fp8 int8 max4 --out OUT

At 1M tokens a decoded token's span scoring reads every index vector of every layer (8 GiB for Llama-3-8B), which
is the largest part of what a decode step adds between 8K and 1M (``e2e_llama8b_h200/session24``). Storing the
vectors in 8 bits or keeping fewer of them per span would halve that, at some cost in which spans are retrieved.
This script measures that cost on real prompts before any kernel is written for it.

For each sample (the dev split's seeds, :func:`benchmarks.evaluate.sample_plan`) the engine reads the prompt and
answers greedily with the defaults: the reference. Then it does the same once per variant, fed the reference's
answer tokens (teacher forcing), so every variant makes the same retrieval calls on the same tokens. Each variant
is compared with the reference on:

* **retrieval recall**: per retrieval call (a prompt pass or a decoded token, per global layer), the share of the
  tokens the reference retrieved that the variant retrieved too, averaged over KV-head rows. Reported for the
  prompt's last pass (the question) and for the decode steps, as mean and the share of calls at 100%;
* **answer tokens**: the share of the reference's greedy tokens that the variant also ranks first, and (with
  ``--own-answers``) whether the variant's own greedy answer scores the same (the task's metric on both).

Variants (the kernels are unchanged: the vectors are rounded before the engine lays them out, so the scores are
those an 8-bit store would produce):

* ``fp8``: each index vector (one per span, vector and KV head) as float8 e4m3, scaled by its largest magnitude
  over 448;
* ``int8``: each vector as symmetric int8, scaled by its largest magnitude over 127;
* ``max4``: at most 4 index vectors per span (``max_index_vectors=4``; the default dynamic count allows 8), the
  same bytes as 8 bits at the default count.

Writes ``precision.json`` and ``precision.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import ltri_rag
from benchmarks.evaluate import SYSTEMS, prompt_text, sample_plan, system_config
from benchmarks.long_tasks import TASKS, make_sample, max_new_tokens, score
from benchmarks.trace_retrieval import recording, require_records
from ltri_rag import LtriSession
from ltri_rag.generation import eos_token_ids
from ltri_rag.layer import GlobalLayerState

__all__ = ["compare", "recall", "round_vectors", "rounded_index_vectors", "run"]

VARIANTS = ("fp8", "int8", "max4")
_FP8_MAX = 448.0  # the largest float8 e4m3fn value


def round_vectors(vectors: torch.Tensor, kind: str) -> torch.Tensor:
    """``vectors`` ``[N, Hkv, D]`` rounded as an 8-bit store would keep them (``fp8`` / ``int8``, one scale per
    vector and head: its largest magnitude over the format's largest value), returned dequantised in their dtype."""
    x = vectors.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    if kind == "fp8":
        scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
        q = (x / scale).to(torch.float8_e4m3fn).float()
    elif kind == "int8":
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.round(x / scale).clamp(-127, 127)
    else:
        raise ValueError(f"rounding kind must be 'fp8' or 'int8', got {kind!r}")
    return (q * scale).to(vectors.dtype)


@contextmanager
def rounded_index_vectors(kind: str | None) -> Iterator[None]:
    """While active, every index vector a span table stores is rounded by :func:`round_vectors` (``None``: as
    stored)."""
    from ltri_rag import span_memory

    if kind is None:
        yield
        return
    original = span_memory.span_layout

    def rounded(vectors: torch.Tensor, *args: Any, **kwargs: Any):
        return original(round_vectors(vectors, kind), *args, **kwargs)

    span_memory.span_layout = rounded
    try:
        yield
    finally:
        span_memory.span_layout = original


def _rows(entry: dict[str, Any]) -> list[set[int]]:
    return [set(p) for p in entry["positions"]] if entry["positions"] else []


def recall(reference: dict[str, Any], variant: dict[str, Any]) -> float | None:
    """Mean over KV-head rows of the share of the reference's retrieved tokens the variant retrieved too (None when
    the reference retrieved nothing)."""
    ref, var = _rows(reference), _rows(variant)
    if not ref or not any(ref):
        return None
    if len(var) != len(ref):
        var = var[:1] * len(ref) if len(var) == 1 else var
    shares = [len(r & v) / len(r) for r, v in zip(ref, var) if r]
    return sum(shares) / len(shares)


def run(model: Any, tokenizer: Any, ids: torch.Tensor, config: ltri_rag.LtriConfig, kind: str | None,
        forced: list[int] | None, max_tokens: int, eos: set[int]) -> dict[str, Any]:
    """Read ``ids``, then decode: greedily (``forced`` None) or feeding ``forced``. Returns the retrieval log of the
    prompt's last pass and of each decode step, the tokens fed, and each step's top-1 token."""
    log: list[dict[str, Any]] = []
    with rounded_index_vectors(kind), recording(log), torch.inference_mode():
        session = LtriSession(model, config)
        num_global = sum(isinstance(s, GlobalLayerState) for s in session.cache.states)
        logits = session.feed(ids)
        require_records(log, config)
        question = [e for e in log if not e["dry"]][-num_global:]
        log.clear()
        fed: list[int] = []
        top1: list[int] = [int(logits[0].argmax())]
        steps: list[list[dict[str, Any]]] = []
        for i in range(max_tokens if forced is None else len(forced)):
            token = top1[-1] if forced is None else forced[i]
            if forced is None and token in eos:
                break
            fed.append(token)
            logits = session.step(torch.tensor([token]))
            top1.append(int(logits[0].argmax()))
            steps.append(list(log))
            log.clear()
    return {"question": question, "steps": steps, "fed": fed, "top1": top1}


def compare(ref: dict[str, Any], var: dict[str, Any]) -> dict[str, Any]:
    """Retrieval recall of the question pass and the decode steps, and top-1 agreement, of ``var`` against
    ``ref``."""
    q = [recall(a, b) for a, b in zip(ref["question"], var["question"])]
    d = [recall(a, b) for sa, sb in zip(ref["steps"], var["steps"]) for a, b in zip(sa, sb)]
    q, d = [x for x in q if x is not None], [x for x in d if x is not None]
    same = [a == b for a, b in zip(ref["top1"], var["top1"])]
    return {"question_recall": statistics.fmean(q) if q else None,
            "question_exact": sum(x == 1.0 for x in q) / len(q) if q else None,
            "decode_recall": statistics.fmean(d) if d else None,
            "decode_exact": sum(x == 1.0 for x in d) / len(d) if d else None,
            "decode_calls": len(d), "top1_agreement": sum(same) / len(same) if same else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="NAME=PATH")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--tasks", nargs="+", default=["niah_multikey", "qa_squad"], choices=TASKS)
    parser.add_argument("--samples", type=int, default=2, help="samples per task (dev split seeds)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--own-answers", action="store_true",
                        help="also let each variant answer on its own and score that answer (twice the runs)")
    parser.add_argument("--prompt-format", choices=("auto", "raw", "chat"), default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.length < 1 or args.samples < 1:
        parser.error(f"--length and --samples must be positive, got {args.length} / {args.samples}")
    name, _, path = args.model.partition("=")
    model, tokenizer = ltri_rag.load_model(path or name, dtype=args.dtype, device=args.device)
    eos = set(eos_token_ids(model, tokenizer))
    base = system_config(SYSTEMS["ltri"], argparse.Namespace(window=4096, budget=2048, chunk=2048, sinks=128))
    configs = {v: (replace(base, max_index_vectors=4) if v == "max4" else base) for v in args.variants}
    kinds = {v: (v if v in ("fp8", "int8") else None) for v in args.variants}
    rows: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for task in args.tasks:
        for index, depth, seed in sample_plan(args.samples, "dev"):
            sample = make_sample(task, tokenizer, args.length, depth, seed)
            text, chat = prompt_text(tokenizer, sample, sample.context, args.prompt_format)
            ids = torch.tensor(tokenizer(text, add_special_tokens=not chat)["input_ids"], dtype=torch.int64)
            ref = run(model, tokenizer, ids, base, None, None, max_new_tokens(task), eos)
            answer = tokenizer.decode(ref["fed"], skip_special_tokens=True)
            ref_score = score(answer, sample)
            for variant in args.variants:
                var = run(model, tokenizer, ids, configs[variant], kinds[variant], ref["fed"], 0, eos)
                own = None
                if args.own_answers:
                    free = run(model, tokenizer, ids, configs[variant], kinds[variant], None, max_new_tokens(task),
                               eos)
                    own = tokenizer.decode(free["fed"], skip_special_tokens=True)
                row = {"task": task, "index": index, "seed": seed, "depth": depth, "tokens": int(ids.numel()),
                       "variant": variant, "reference_score": ref_score,
                       "variant_score": None if own is None else score(own, sample),
                       "reference_answer": answer, "variant_answer": own, **compare(ref, var)}
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("task", "index", "variant", "question_recall",
                                                      "decode_recall", "top1_agreement", "reference_score",
                                                      "variant_score")}), flush=True)
                (args.out / "precision.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()
                                                                              if k != "model"},
                                                                     "rows": rows}, indent=1))
    text = render(rows, args)
    (args.out / "precision.md").write_text(text, encoding="utf-8")
    print(text)
    return {"rows": rows}


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """One line per variant: means over the samples."""
    lines = [f"# Index vectors in fewer bytes: retrieval against the defaults ({args.length} tokens, dev split, "
             f"{len(args.tasks)} tasks x {args.samples} samples)", "",
             "| variant | question recall | question calls at 100% | decode recall | decode calls at 100% | "
             "top-1 agreement | score (reference -> variant) |", "|---|---:|---:|---:|---:|---:|---|"]

    def mean(key: str, group: list[dict[str, Any]]) -> str:
        values = [r[key] for r in group if r[key] is not None]
        return f"{statistics.fmean(values):.4f}" if values else "-"

    for variant in args.variants:
        group = [r for r in rows if r["variant"] == variant]
        if not group:
            continue
        ref = sum(r["reference_score"] for r in group) / len(group)
        own = [r["variant_score"] for r in group if r["variant_score"] is not None]
        scores = f"{ref:.2f} -> {sum(own) / len(own):.2f}" if own else f"{ref:.2f} (variants not asked)"
        lines.append(f"| {variant} | {mean('question_recall', group)} | {mean('question_exact', group)} | "
                     f"{mean('decode_recall', group)} | {mean('decode_exact', group)} | "
                     f"{mean('top1_agreement', group)} | {scores} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
