"""The small Triton kernels of a retrieving decode step, each in its current form and its previous one, in one run.

    python -m benchmarks.bench_small_kernels --out benchmarks/results/small_kernels_h200

A profile of an 8K decode step of the Llama-3-8B shape (``benchmarks.profile_decode_graph``) spends ~2.4 ms per
token in three small kernels whose bytes would take a few µs: the memory part's assembly (35 µs per layer), the
query rotation (16 µs per layer for 32 rows) and the budget fill (12 µs per call, two per layer). Each row here times
one of them at the shapes of that step (and larger ones), with a module switch set to the current or the previous
form:

* ``fill``: :func:`ltri_rag.kernels.triton_select.fill_ranked` over ``8 x S`` ranked spans (lengths 1-64, budget
  2,048, tail 64); ``SCALAR_WALK`` (the tail walked over unrolled scalar loads) against the previous reduction per
  step;
* ``rotate``: :func:`ltri_rag.kernels.triton_rope.gather_rotate_triton` of ``N`` dense rows by per-row shifts;
  ``HALF_TILES`` (the rotate-half pairs as two half tiles) against one tile with gathered partner columns;
* ``assemble``: :func:`ltri_rag.kernels.triton_assemble.assemble_memory` of ``Hkv x (sinks + W)`` rows from an 8K-token
  pool (device tier; ``--host-share`` of its pages in pinned host memory for the ``host`` rows), contiguous scheme;
  ``HALF_TILES`` likewise;
* ``select``: :func:`ltri_rag.retrieval.select_spans_pair`, a layer's two selections under consensus from ``32 x S``
  span scores (lengths 16-112, budget 2,048, prior, persistence; the ranking, sort and fill of a decode step);
  ``retrieval.PAIRED_SORT`` (both ranked in one tensor: one sort, one fill) against one after the other;
* ``sort_fill``: the same two selections with ``retrieval.SORT_FILL`` (rows of up to 1,024 spans sorted and filled
  in one program, longer ones cut to their best ranks by rounds of chunk sorts first,
  :mod:`ltri_rag.kernels.triton_sort_fill`) against torch's segmented sort, a gather, a scan and :func:`fill_ranked`,
  with ``--short-share`` of the spans 1-7 tokens long (as gap pieces are: they raise the ranks a fill may read, and
  past ``MAX_CANDIDATES`` a long row keeps torch's sort);
* ``row_sums``: the running sums of a paired selection's ``2 x S`` ranked lengths, ``retrieval.FLAT_ROW_SUMS`` (one
  flat scan, each row's start subtracted) against torch's scan along the rows.

Each call is captured ``--calls`` times into one CUDA graph over as many separate input sets (so the assembly's pool
rows are not all in L2), the graph replayed ``--reps`` times; µs per call = replay time / calls (what a captured
decode step pays, launch gaps included). Both forms must give the same result: the script stops otherwise (equal
bit for bit for the fill, the selections and the values, keys to 1e-2 in bfloat16). Writes ``bench.json`` and
``bench.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _graph_us(fns: list[Callable[[], Any]], reps: int) -> float:
    """µs per call of ``fns`` captured in one CUDA graph and replayed ``reps`` times."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(fns))


def fill_case(num_spans: int, calls: int, gen: torch.Generator) -> tuple[list[Callable[[], Any]], Callable[[], Any]]:
    from ltri_rag.kernels import triton_select

    rows, budget, tail = 8, 2048, 64
    inputs = []
    for _ in range(calls):
        lengths = torch.randint(1, 65, (num_spans,), generator=gen)
        keys = torch.randn(rows, num_spans, generator=gen)
        order = torch.argsort(keys, dim=1, descending=True, stable=True)
        ranked = lengths[order]
        inputs.append(tuple(t.cuda() for t in (order, ranked, torch.cumsum(ranked, dim=1))))
    fns = [lambda i=i: triton_select.fill_ranked(i[0], i[1], i[2], budget, tail) for i in inputs]
    return fns, fns[0]


def rotate_case(n_rows: int, head_dim: int, calls: int, gen: torch.Generator):
    from ltri_rag.kernels import triton_rope

    inv_freq = (1.0 / 500000 ** (torch.arange(head_dim // 2, dtype=torch.float64) / (head_dim // 2))).cuda()
    inputs = [(torch.randn(n_rows, head_dim, generator=gen).bfloat16().cuda(),
               torch.randint(0, 1_000_000, (n_rows,), generator=gen).cuda()) for _ in range(calls)]
    fns = [lambda i=i: triton_rope.gather_rotate_triton(i[0], None, None, i[1], inv_freq)[0] for i in inputs]
    return fns, fns[0]


def assemble_case(width: int, host_share: float, calls: int, gen: torch.Generator):
    from ltri_rag.kernels import triton_assemble

    num_kv_heads, head_dim, sinks, page_size, tokens = 8, 128, 128, 128, 8192
    pages = tokens // page_size
    rows = tokens * num_kv_heads
    split = int(round(pages * (1 - host_share))) * page_size * num_kv_heads
    inv_freq = (1.0 / 500000 ** (torch.arange(head_dim // 2, dtype=torch.float64) / (head_dim // 2))).float().cuda()
    inputs = []
    for _ in range(calls):
        pool_k = torch.randn(rows, head_dim, generator=gen).bfloat16()
        pool_v = torch.randn(rows, head_dim, generator=gen).bfloat16()
        slots = torch.stack([torch.randperm(tokens, generator=gen)[:width].sort().values
                             for _ in range(num_kv_heads)])
        slow = (None, None) if split >= rows else (pool_k[split:].pin_memory(), pool_v[split:].pin_memory())
        inputs.append(dict(
            slots=slots.cuda(), page_table=torch.randperm(pages, generator=gen).cuda(), page_size=page_size,
            positions=torch.randint(0, 1_000_000, (tokens,), generator=gen).cuda(), fast_k=pool_k[:split].cuda(),
            fast_v=pool_v[:split].cuda(), slow_k=slow[0], slow_v=slow[1], split_row=min(split, rows),
            sink_k=torch.randn(num_kv_heads, sinks, head_dim, generator=gen).bfloat16().cuda(),
            sink_v=torch.randn(num_kv_heads, sinks, head_dim, generator=gen).bfloat16().cuda(),
            base=1_000_000, inv_freq=inv_freq, scheme="contiguous"))
    fns = [lambda i=i: triton_assemble.assemble_memory(**i) for i in inputs]
    return fns, fns[0]


def select_case(num_spans: int, calls: int, gen: torch.Generator, short_share: float = 0.0):
    from ltri_rag.retrieval import select_spans_pair

    heads, budget = 32, 2048
    inputs = []
    for _ in range(calls):
        lengths = torch.randint(16, 113, (num_spans,), generator=gen)  # mean 64: 1M tokens in 16K spans
        if short_share > 0:  # (drawn only then: the other kinds' inputs stay those of earlier sessions)
            short = torch.rand(num_spans, generator=gen) < short_share
            lengths[short] = torch.randint(1, 8, (int(short.sum()),), generator=gen)  # gap pieces of 1-7 tokens
        inputs.append(dict(
            scores=torch.randn(heads, num_spans, generator=gen).cuda(), lengths=lengths, budget=budget,
            prior=(torch.randint(0, 33, (num_spans,), generator=gen).float() / 32).cuda(), prior_weight=0.5,
            num_kv_heads=8, recency=(torch.rand(num_spans, generator=gen) < 0.1).float().cuda(), bonus=1.0,
            device_lengths=lengths.cuda()))
    fns = [lambda i=i: select_spans_pair(**i) for i in inputs]
    return fns, fns[0]


def row_sums_case(num_spans: int, calls: int, gen: torch.Generator):
    from ltri_rag import retrieval

    inputs = [torch.randint(16, 113, (2, num_spans), generator=gen).cuda() for _ in range(calls)]
    fns = [lambda i=i: retrieval._row_sums(i) for i in inputs]
    return fns, fns[0]


CASES: dict[str, tuple[str, str]] = {  # kind: (module, switch)
    "fill": ("ltri_rag.kernels.triton_select", "SCALAR_WALK"),
    "rotate": ("ltri_rag.kernels.triton_rope", "HALF_TILES"),
    "assemble": ("ltri_rag.kernels.triton_assemble", "HALF_TILES"),
    "select": ("ltri_rag.retrieval", "PAIRED_SORT"),
    "row_sums": ("ltri_rag.retrieval", "FLAT_ROW_SUMS"),
    "sort_fill": ("ltri_rag.retrieval", "SORT_FILL"),
}


def _same(a: Any, b: Any, kind: str) -> bool:
    pairs = list(zip(a, b)) if isinstance(a, tuple) else [(a, b)]
    if kind == "assemble":
        k, v, m = pairs
        return torch.equal(v[0], v[1]) and torch.equal(m[0], m[1]) and torch.allclose(
            k[0].float(), k[1].float(), atol=1e-2, rtol=1e-2)
    if kind == "rotate":
        return torch.allclose(pairs[0][0].float(), pairs[0][1].float(), atol=1e-2, rtol=1e-2)
    if kind in ("select", "sort_fill"):
        return all(torch.equal(x, y) for x, y in pairs)
    return torch.equal(pairs[0][0], pairs[0][1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=32, help="calls (input sets) per captured graph")
    parser.add_argument("--reps", type=int, default=50, help="graph replays timed")
    parser.add_argument("--spans", type=int, nargs="+", default=[256, 4096, 16384], help="fill: spans per row")
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 17408], help="rotate: rows (head_dim 128)")
    parser.add_argument("--widths", type=int, nargs="+", default=[2048], help="assemble: slots per KV head")
    parser.add_argument("--host-share", type=float, default=0.5, help="assemble host rows: pages in host memory")
    parser.add_argument("--select-spans", type=int, nargs="+", default=[128, 2048, 16384, 65536],
                        help="select: spans of a layer")
    parser.add_argument("--short-share", type=float, nargs="+", default=[0.0, 0.05],
                        help="sort_fill: shares of short spans (1-7 tokens, as gap pieces are) among the lengths")
    parser.add_argument("--kinds", nargs="+", default=list(CASES), choices=list(CASES), help="kernels to time")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_small_kernels times compiled kernels: it needs a CUDA device")
    import importlib

    gen = torch.Generator().manual_seed(0)
    cases: list[tuple[str, str, Any]] = []
    kinds = set(args.kinds)
    if "fill" in kinds:
        cases += [("fill", f"8 x {s} spans", fill_case(s, args.calls, gen)) for s in args.spans]
    if "rotate" in kinds:
        cases += [("rotate", f"{n} rows x 128", rotate_case(n, 128, args.calls, gen)) for n in args.rows]
    for w in args.widths if "assemble" in kinds else []:
        cases.append(("assemble", f"8 heads x {128 + w} rows, device tier", assemble_case(w, 0.0, args.calls, gen)))
        cases.append(("assemble", f"8 heads x {128 + w} rows, {args.host_share:.0%} host pages",
                      assemble_case(w, args.host_share, args.calls, gen)))
    if "select" in kinds:
        cases += [("select", f"32 heads x {s} spans, both selections", select_case(s, args.calls, gen))
                  for s in args.select_spans]
    if "sort_fill" in kinds:
        for share in args.short_share:
            cases += [("sort_fill", f"32 heads x {s} spans, {share:.0%} of 1-7 tokens",
                       select_case(s, args.calls, gen, share)) for s in args.select_spans]
    if "row_sums" in kinds:
        cases += [("row_sums", f"2 x {s} spans", row_sums_case(s, args.calls, gen)) for s in args.select_spans]
    rows = []
    for kind, shape, (fns, probe) in cases:
        module = importlib.import_module(CASES[kind][0])
        switch = CASES[kind][1]
        saved = getattr(module, switch)
        result: dict[str, Any] = {"kernel": kind, "shape": shape, "switch": switch}
        outs = {}
        try:
            for value in (True, False):
                setattr(module, switch, value)
                outs[value] = probe()
                result[f"us_{str(value).lower()}"] = round(_graph_us(fns, args.reps), 2)
        finally:
            setattr(module, switch, saved)
        if not _same(outs[True], outs[False], kind):
            raise SystemExit(f"{kind} {shape}: the two forms disagree")
        result["speedup"] = round(result["us_false"] / result["us_true"], 2) if result["us_true"] else math.nan
        rows.append(result)
        print(f"{kind:9s} {shape:40s} {switch}=True {result['us_true']:8.2f} us   False {result['us_false']:8.2f} us"
              f"   x{result['speedup']}", flush=True)
    lines = ["| kernel | shape | switch | µs per call, current (True) | previous (False) | speed-up |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['kernel']} | {r['shape']} | `{r['switch']}` | {r['us_true']} | {r['us_false']} | "
              f"{r['speedup']}x |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "calls": args.calls,
                "reps": args.reps}
        (args.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "bench.md").write_text(f"# Small decode-step kernels, two forms ({meta['device']})\n\n{table}\n")


if __name__ == "__main__":
    main()
