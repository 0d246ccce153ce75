"""Host time of picking index tokens at an eviction: the current NumPy bookkeeping against the torch form before it.

    python -m benchmarks.bench_index_tokens --out benchmarks/results/index_tokens_cpu

An eviction cuts every layer's evicted tokens into spans and picks each span's index tokens
(:func:`ltri_rag.index_vectors.select_index_tokens_batch`, all layers at once). Its per-layer bookkeeping (which
span each token belongs to, which tokens a span keeps) works on host tensors of a few hundred elements. Until
session 31 it ran as torch CPU operations; ``torch.repeat_interleave`` runs a parallel loop of grain 1 there, so
each of its 32 calls per eviction woke torch's intra-op thread pool (0.22 s of a 32K prefill's host time on a
16-core GPU host, ``benchmarks/results/e2e_llama8b_h200/session31/host_profile_32k.txt``). It now runs in NumPy.

Both forms of the bookkeeping (:func:`ltri_rag.index_vectors.span_bookkeeping` and the torch form before it, kept
here) run on the same segments (``--layers`` segments of ``--tokens`` tokens, ``--spans`` spans each, seeded), are
checked to return the same tensors, and are timed at each ``--threads`` setting of torch's intra-op pool (medians of
``--reps`` calls after a warm-up), with the whole call beside them. Prints a table, writes ``bench.json`` and
``bench.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import median_seconds
from benchmarks.output import save_rows
from ltri_rag.index_vectors import select_index_tokens_batch, span_bookkeeping


def previous_bookkeeping(spans: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], num_tokens: int
                         ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """:func:`ltri_rag.index_vectors.span_bookkeeping` as it was before session 31 (torch CPU operations), kept as
    the baseline."""
    span_of_token = torch.empty(len(spans), num_tokens, dtype=torch.int64)
    kept, owners = [], []
    for b, (starts, ends, counts) in enumerate(spans):
        starts, ends, counts = starts.cpu(), ends.cpu(), counts.cpu()
        of_token = torch.repeat_interleave(torch.arange(starts.numel()), ends - starts)
        span_of_token[b] = of_token
        rank_in_span = torch.arange(num_tokens) - starts[of_token]
        keep = torch.nonzero(rank_in_span < counts[of_token]).flatten()
        kept.append(keep + b * num_tokens)
        owners.append(of_token[keep])
    return span_of_token, torch.cat(kept), owners


def make_segments(layers: int, tokens: int, spans: int, kv_heads: int, seed: int = 0):
    """``(key_mass [layers, kv_heads, tokens], [(starts, ends, counts)] per layer)``: random cuts, up to 8 index
    tokens per span."""
    if not 1 <= spans <= tokens:
        raise ValueError(f"spans must be in [1, tokens={tokens}], got {spans}")
    gen = torch.Generator().manual_seed(seed)
    segments = []
    for _ in range(layers):
        cuts = torch.sort(torch.randperm(tokens - 1, generator=gen)[: spans - 1] + 1).values
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), cuts])
        ends = torch.cat([cuts, torch.tensor([tokens])])
        counts = torch.clamp(ends - starts, max=int(torch.randint(4, 9, (1,), generator=gen)))
        segments.append((starts, ends, counts))
    return torch.rand(layers, kv_heads, tokens, generator=gen), segments


def _median_ms(fn, reps: int) -> float:
    return median_seconds(fn, reps) * 1e3


def _same(a: tuple, b: tuple) -> bool:
    return (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and len(a[2]) == len(b[2])
            and all(torch.equal(x, y) for x, y in zip(a[2], b[2])))


def run(layers: int, tokens: int, spans: int, kv_heads: int, threads: list[int], reps: int) -> list[dict[str, Any]]:
    """One row per thread count: each form's median ms per eviction (the host bookkeeping, and the whole
    :func:`select_index_tokens_batch` on this CPU, whose sorts run on the device on a GPU) and whether the two
    bookkeeping forms agree."""
    mass, segments = make_segments(layers, tokens, spans, kv_heads)
    same = _same(span_bookkeeping(segments, tokens), previous_bookkeeping(segments, tokens))
    saved = torch.get_num_threads()
    rows = []
    try:
        for count in threads:
            torch.set_num_threads(count)
            row = {"threads": count, "same_result": same,
                   "previous_ms": _median_ms(lambda: previous_bookkeeping(segments, tokens), reps),
                   "numpy_ms": _median_ms(lambda: span_bookkeeping(segments, tokens), reps),
                   "whole_call_ms": _median_ms(lambda: select_index_tokens_batch(mass, segments), reps)}
            rows.append(row)
            print(f"threads {count:2d}: bookkeeping before (torch) {row['previous_ms']:8.2f} ms, now (NumPy) "
                  f"{row['numpy_ms']:8.2f} ms per eviction of {layers} layers (same result: {same}); the whole "
                  f"call now {row['whole_call_ms']:.2f} ms", flush=True)
    finally:
        torch.set_num_threads(saved)
    return rows


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Index-token bookkeeping of one eviction ({meta['layers']} layers x {meta['tokens']} tokens, "
             f"{meta['spans']} spans each; {meta['cpu_count']} CPUs, torch {meta['torch']})", "",
             "| torch threads | bookkeeping before (torch CPU ops), ms | now (NumPy), ms | same result | "
             "whole call now (CPU sorts included), ms |",
             "|---:|---:|---:|---|---:|"]
    lines += [f"| {r['threads']} | {r['previous_ms']:.2f} | {r['numpy_ms']:.2f} | {r['same_result']} | "
              f"{r['whole_call_ms']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=2048, help="evicted tokens per layer (one prompt chunk)")
    parser.add_argument("--spans", type=int, default=120, help="spans per layer")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    for name in ("layers", "tokens", "kv_heads", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(t < 1 for t in args.threads):
        parser.error(f"--threads must all be >= 1, got {args.threads}")
    rows = run(args.layers, args.tokens, args.spans, args.kv_heads, args.threads, args.reps)
    meta = {"layers": args.layers, "tokens": args.tokens, "spans": args.spans, "kv_heads": args.kv_heads,
            "reps": args.reps, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    save_rows(args.out, meta, rows, render(rows, meta))


if __name__ == "__main__":
    main()
