"""The engine's span scoring (``span_probabilities``), side by side: plain torch and the fused Triton kernels.

    python -m benchmarks.bench_span_scoring --out benchmarks/results/span_scoring_h200

One layer's scoring of a chunk of queries against a memory of 1,000 / 4,000 / 16,000 spans, each with 4-8 index
vectors (the dynamic counts' default range), at the shapes the quality grid runs (Qwen2.5-0.5B: 14 query / 2 KV
heads, head_dim 64), for a prefill chunk of 2,048 queries and a decode step (1 query). Queries and vectors are
bf16 on the GPU, as in the engine. Times are medians of ``--reps`` runs after a warm-up (CUDA events on the GPU).
Each backend is timed twice: with the per-span layout of the vectors built once and passed in (``layout=``, what
the engine's span tables do) and rebuilt on every call (``+ layout`` rows: ``span_layout``, one device sync).
``int8`` rows read a layout of int8 codes with a scale per vector and KV head (``LtriConfig.index_precision=
"int8"``: half the bytes); their errors against the float32 reference include the quantisation's.
TFLOP/s counts one
score matrix, ``2 * H * q_len * num_vectors_padded * D``. For a chunk the Triton kernels compute it once and keep
the float32 scores in a buffer (``score_buffer``, 256 MiB by default; ``32 MiB slabs`` rows: a smaller one, the
queries in more slabs); ``recomputed`` rows compute it twice and keep nothing (``score_buffer=0``, the kernels before
session 29). The torch path computes it once but writes it to memory. ``x layers`` is the time of one call times
the model's layers.

Prints a Markdown table and writes ``bench.json`` and ``bench.md`` under ``--out``. On CPU (``--small``, with
``TRITON_INTERPRET=1`` for the Triton row) it runs tiny shapes: a check that the script works, not a speed result.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.output import save_rows
from ltri_rag.kernels.scoring import span_layout, span_probabilities

from benchmarks.bench_local_attention import _time

LAYERS = 24  # Qwen2.5-0.5B
SHAPES = {  # name: (num_heads, num_kv_heads, head_dim, num_spans, q_len)
    f"qwen2.5-0.5b S={spans} q={q_len}": (14, 2, 64, spans, q_len)
    for q_len in (2048, 1) for spans in (1000, 4000, 16000)
}
# a decoded token's scoring at Llama-3-8B heads over the span counts of 128K-2M-token memories (32 layers)
LLAMA8B_DECODE = {f"llama3-8b S={spans} q=1": (32, 8, 128, spans, 1) for spans in (4000, 16000, 32000, 64000)}
# a prompt chunk's scoring at Llama-3-8B heads: the engine scores 256 of a chunk's queries (score_queries), over the
# span counts of 128K-1M-token memories (32 layers)
LLAMA8B_PREFILL = {f"llama3-8b S={spans} q=256": (32, 8, 128, spans, 256) for spans in (2000, 16000)}
SMALL = {"tiny S=40 q=16": (4, 2, 32, 40, 16), "tiny S=40 q=1": (4, 2, 32, 40, 1)}
MIN_WIDTH, MAX_WIDTH = 4, 8


def _triton_scorer(device: torch.device) -> Callable[..., torch.Tensor] | None:
    """The Triton scorer where it can run on ``device`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), else None."""
    try:
        from ltri_rag.kernels import triton_scoring
    except ImportError:
        return None
    if not triton_scoring.triton_available() or not (device.type == "cuda" or triton_scoring.INTERPRETED):
        return None
    return triton_scoring.span_probabilities_triton


def bench_shape(name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                reps: int, sweep: bool = False) -> list[dict[str, Any]]:
    """One row per backend for one shape."""
    num_heads, num_kv_heads, head_dim, num_spans, q_len = shape
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(MIN_WIDTH, MAX_WIDTH + 1, (num_spans,), generator=gen)
    owner = torch.repeat_interleave(torch.arange(num_spans), counts).to(device)
    queries = (torch.randn(num_heads, q_len, head_dim, generator=gen) * 2).to(device, dtype)
    vectors = torch.randn(owner.numel(), num_kv_heads, head_dim, generator=gen).to(device, dtype)
    scaling = head_dim ** -0.5
    flops = 2 * num_heads * q_len * num_spans * int(counts.max()) * head_dim
    layout = span_layout(vectors, owner, num_spans, dtype=dtype)
    int8 = span_layout(vectors, owner, num_spans, quantize=True)  # LtriConfig.index_precision="int8"
    backends: dict[str, Callable[[], torch.Tensor]] = {
        "torch": lambda: span_probabilities(queries, vectors, owner, num_spans, scaling, layout=layout),
        "torch + layout": lambda: span_probabilities(queries, vectors, owner, num_spans, scaling)}
    if dtype != torch.float32:  # the torch path before session 16: the kept layout copied to float32 at every call
        backends["torch, float32 copy"] = lambda: span_probabilities(
            queries, vectors, owner, num_spans, scaling, layout=(layout[0].float(), *layout[1:]))
    backends["torch, int8"] = lambda: span_probabilities(queries, vectors, owner, num_spans, scaling, layout=int8)
    triton_fn = _triton_scorer(device)
    if triton_fn is not None:
        backends["triton"] = lambda: triton_fn(queries, vectors, owner, num_spans, scaling, layout=layout)
        backends["triton + layout"] = lambda: triton_fn(queries, vectors, owner, num_spans, scaling)
        backends["triton, int8"] = lambda: triton_fn(queries, vectors, owner, num_spans, scaling, layout=int8)
        if q_len == 1:  # the one-query kernel's span tile (the default is block_sizes')
            for block_s in (32, 128):
                backends[f"triton, block_s {block_s}"] = (
                    lambda b=block_s: triton_fn(queries, vectors, owner, num_spans, scaling, layout=layout, block_s=b))
            for kind, kept in (("bf16", layout), ("int8", int8)) if sweep else ():
                for block_s in (64, 128, 256):
                    for warps in (4, 8):
                        for stages in (2, 3, 4):
                            backends[f"triton {kind}, s{block_s} w{warps} st{stages}"] = (
                                lambda k=kept, b=block_s, w=warps, st=stages: triton_fn(
                                    queries, vectors, owner, num_spans, scaling, layout=k, block_s=b, num_warps=w,
                                    num_stages=st))
        if q_len > 1:  # a chunk's scores stored once (the default) against recomputed, and in smaller slabs
            backends["triton, recomputed"] = lambda: triton_fn(queries, vectors, owner, num_spans, scaling,
                                                               layout=layout, score_buffer=0)
            backends["triton, 32 MiB slabs"] = lambda: triton_fn(queries, vectors, owner, num_spans, scaling,
                                                                 layout=layout, score_buffer=32 << 20)
        if q_len > 1 and sweep:  # the chunk kernels' launch settings (honoured since session 29)
            for block_m, block_s, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
                backends[f"triton, m{block_m} s{block_s} w{warps} st{stages}"] = (
                    lambda bm=block_m, b=block_s, w=warps, st=stages: triton_fn(
                        queries, vectors, owner, num_spans, scaling, layout=layout, block_m=bm, block_s=b,
                        num_warps=w, num_stages=st))
    ref = span_probabilities(queries.float(), vectors.float(), owner, num_spans, scaling)
    rows = []
    for backend, fn in backends.items():
        try:
            ms = _time(fn, reps, device.type == "cuda")
            got = fn()
        except Exception as error:  # noqa: BLE001 - a launch setting that does not compile is a result
            print(f"{name:28s} {backend:15s} failed: {type(error).__name__}: {str(error)[:160]}", flush=True)
            continue
        row = {"shape": name, "backend": backend, "ms": ms, "tflops": flops / ms / 1e9, "dtype": str(dtype),
               "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim, "num_spans": num_spans,
               "q_len": q_len, "num_vectors": int(owner.numel()),
               "max_abs_err": float((got - ref).abs().max()),
               "max_rel_err": float(((got - ref).abs() / ref.abs().clamp(min=1e-6)).max())}
        rows.append(row)
        print(f"{name:28s} {backend:15s} {ms:9.3f} ms {row['tflops']:8.2f} TFLOP/s", flush=True)
    return rows


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown table of every row, times relative to the torch path of the same shape."""
    torch_ms = {r["shape"]: r["ms"] for r in rows if r["backend"] == "torch"}
    lines = [f"# Span scoring (span_probabilities), {meta['device']} ({meta['dtype']}, torch {meta['torch']})", "",
             (f"| shape | backend | ms | x {meta['layers']} layers (ms) | TFLOP/s | vs torch path | max abs err | "
              "max rel err (vs max(p, 1e-6)) |"),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['backend']} | {r['ms']:.3f} | {r['ms'] * meta['layers']:.1f} | "
                     f"{r['tflops']:.1f} | {torch_ms[r['shape']] / r['ms']:.2f}x | {r['max_abs_err']:.1e} | "
                     f"{r['max_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU check of the script)")
    parser.add_argument("--sweep", action="store_true",
                        help="one-query shapes: also every launch setting (block_s 64/128/256 x 4/8 warps x 2-4 "
                             "stages) of the decode kernel, bf16 and int8 layouts; chunk shapes: block_m 64/128 x "
                             "block_s 32/64/128 x 4/8 warps x 2/3 stages of the two chunk kernels (bf16)")
    parser.add_argument("--shapes", choices=("qwen", "llama8b-decode", "llama8b-prefill"), default="qwen",
                        help="qwen: Qwen2.5-0.5B heads, chunks and decode at 1K-16K spans (default); llama8b-decode: "
                             "one decoded token at Llama-3-8B heads, 4K-64K spans; llama8b-prefill: a prompt "
                             "chunk's 256 scored queries at Llama-3-8B heads, 2K and 16K spans")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    shapes = SMALL if args.small else {"llama8b-decode": LLAMA8B_DECODE, "llama8b-prefill": LLAMA8B_PREFILL}.get(
        args.shapes, SHAPES)
    for name, shape in shapes.items():
        rows += bench_shape(name, shape, device, dtype, args.reps, args.sweep)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "torch": torch.__version__, "reps": args.reps, "widths": [MIN_WIDTH, MAX_WIDTH],
            "layers": 32 if shapes in (LLAMA8B_DECODE, LLAMA8B_PREFILL) else LAYERS,
            "command": " ".join(["python -m benchmarks.bench_span_scoring",
                                 *(argv if argv is not None else sys.argv[1:])])}
    save_rows(args.out, meta, rows, render(rows, meta))


if __name__ == "__main__":
    main()
