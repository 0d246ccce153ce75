"""The memory part's attention on a CPU: torch's fused CPU attention (``attention.CPU_FLASH_MEMORY``) against the
score-tensor path, side by side in one process.

    LTRI_DATA_DIR=DATA python -m benchmarks.bench_cpu_memory_part --out benchmarks/results/cpu_memory_part \\
        [--model MODELS/qwen2.5-coder-0.5b.gguf --length 16384 --rounds 2]

A layer's working set on the plain-torch path is the memory part (sinks and retrieved spans, which every query sees)
and the local part (window and chunk, causal, with the key mass and band span detection needs). Only the memory part
can go through a fused kernel that returns the LSE: the local part's key mass needs every probability. This times,
switching the flag between alternating runs:

* one prefill chunk's attention (2,048 queries over 2,176 memory rows, a 4,096-token window and the chunk, key mass
  and band), at Qwen2.5-0.5B and Llama-3-8B heads, and one decode step's (one query, the same memory and window);
* with ``--model``: the engine's whole prefill of ``--length`` tokens of Paul Graham essays (the defaults, a fresh
  session per run, the two settings alternating for ``--rounds`` rounds), with the largest difference of the last
  logits and whether their argmax agrees.

Writes ``bench.json`` and ``bench.md``. A speed result for the CPU it runs on.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.output import save_rows
from ltri_rag.kernels import attention

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "llama3-8b": (32, 8, 128)}  # (heads, KV heads, head_dim)
WINDOW, CHUNK, MEMORY, BAND = 4096, 2048, 2176, 64


def _alternate(run: Callable[[], Any], reps: int) -> tuple[dict[bool, list[float]], dict[bool, Any]]:
    """``run()`` with the flag on and off in turn, ``reps`` timed runs each after one warm-up each."""
    times: dict[bool, list[float]] = {True: [], False: []}
    results: dict[bool, Any] = {}
    saved = attention.CPU_FLASH_MEMORY
    try:
        for i in range(2 * reps + 2):
            flag = i % 2 == 0
            attention.CPU_FLASH_MEMORY = flag
            t0 = time.perf_counter()
            results[flag] = run()
            if i >= 2:
                times[flag].append(time.perf_counter() - t0)
    finally:
        attention.CPU_FLASH_MEMORY = saved
    return times, results


def bench_attention(name: str, shape: tuple[int, int, int], q_len: int, reps: int) -> dict[str, Any]:
    """One layer's attention over memory + window (+ the chunk), ``q_len`` queries (a chunk, or 1: a decode step)."""
    heads, kv_heads, dim = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, q_len, dim, generator=gen)
    local = WINDOW + (q_len if q_len > 1 else 0)
    k, v = (torch.randn(1, kv_heads, local, dim, generator=gen) for _ in range(2))
    mem_k, mem_v = (torch.randn(1, kv_heads, MEMORY, dim, generator=gen) for _ in range(2))
    mem_mask = torch.rand(1, kv_heads, MEMORY, generator=gen) < 0.95  # a few padded slots, as selections leave

    def run() -> attention.LocalAttention:
        return attention.local_attention(q, k, v, scaling=dim ** -0.5, causal_offset=local - q_len, band_width=BAND,
                                         want_key_mass=True, memory=(q, mem_k, mem_v, mem_mask))

    times, res = _alternate(run, reps)
    diff = {f: float((getattr(res[True], f) - getattr(res[False], f)).abs().max()) for f in ("out", "lse", "key_mass")}
    row = {"kind": "chunk" if q_len > 1 else "decode step", "shape": name, "heads": heads, "kv_heads": kv_heads,
           "head_dim": dim, "queries": q_len, "fused_s": statistics.median(times[True]),
           "scores_s": statistics.median(times[False]), "times": {"fused": times[True], "scores": times[False]},
           "max_abs_diff": diff}
    print(f"{row['kind']} {name}: fused {row['fused_s'] * 1e3:.2f} ms, score path {row['scores_s'] * 1e3:.2f} ms, "
          f"diffs {diff}", flush=True)
    return row


def bench_prefill(model_path: str, length: int, rounds: int) -> dict[str, Any]:
    """The engine's prefill of ``length`` tokens, the flag alternating between fresh sessions."""
    from benchmarks.bench_cpu_decode import prompt_ids
    from ltri_rag import LtriConfig, LtriSession
    from ltri_rag.loading import load_model

    model, tok = load_model(model_path)
    ids = prompt_ids(tok, length)
    times: dict[bool, list[float]] = {True: [], False: []}
    last: dict[bool, torch.Tensor] = {}
    saved = attention.CPU_FLASH_MEMORY
    try:
        for i in range(2 * rounds):
            flag = i % 2 == 1  # the score path first: a first run carries no warm-up advantage for the new path
            attention.CPU_FLASH_MEMORY = flag
            session = LtriSession(model, LtriConfig())
            t0 = time.perf_counter()
            last[flag] = session.feed(ids)
            times[flag].append(time.perf_counter() - t0)
            print(f"prefill {length}: {'fused' if flag else 'score path'} {times[flag][-1]:.1f} s", flush=True)
    finally:
        attention.CPU_FLASH_MEMORY = saved
    return {"kind": "prefill", "model": Path(model_path).name, "tokens": length,
            "fused_s": statistics.median(times[True]), "scores_s": statistics.median(times[False]),
            "times": {"fused": times[True], "scores": times[False]},
            "max_abs_logit_diff": float((last[True] - last[False]).abs().max()),
            "same_argmax": bool(torch.equal(last[True].argmax(-1), last[False].argmax(-1)))}


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# The memory part's attention on a CPU: fused (torch's CPU flash attention) against the score path", "",
             f"`{meta['command']}`; {meta['cpus']} CPUs ({meta['machine']}), torch {meta['torch']}, float32; "
             "medians of alternating runs.", "",
             "| what | shape | fused | score path | speed-up | max diff out / lse / key mass |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r["kind"] == "prefill":
            continue
        d = r["max_abs_diff"]
        lines.append(f"| {r['kind']} ({r['queries']} queries) | {r['shape']} ({r['heads']} / {r['kv_heads']} / "
                     f"{r['head_dim']}) | {r['fused_s'] * 1e3:.2f} ms | {r['scores_s'] * 1e3:.2f} ms | "
                     f"{r['scores_s'] / r['fused_s']:.2f}x | {d['out']:.1e} / {d['lse']:.1e} / {d['key_mass']:.1e} |")
    for r in rows:
        if r["kind"] == "prefill":
            runs = "; ".join(f"{k} " + " / ".join(f"{x:.1f}" for x in v) for k, v in r["times"].items())
            lines += ["", f"Engine prefill of {r['tokens']:,} tokens ({r['model']}, the defaults), runs in s ({runs}): "
                      f"**fused {r['fused_s']:.1f} s, score path {r['scores_s']:.1f} s "
                      f"({r['scores_s'] / r['fused_s']:.2f}x)**; last logits differ by at most "
                      f"{r['max_abs_logit_diff']:.1e}, same argmax: {r['same_argmax']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=3, help="timed runs of each attention setting (default 3)")
    parser.add_argument("--model", help="a GGUF file: also time the engine's prefill both ways")
    parser.add_argument("--length", type=int, default=16384, help="prefill tokens with --model (default 16384)")
    parser.add_argument("--rounds", type=int, default=2, help="prefills of each setting with --model (default 2)")
    args = parser.parse_args(argv)
    for name in ("reps", "length", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if attention._FLASH_CPU is None:
        parser.error(f"torch {torch.__version__} has no fused CPU attention op: nothing to compare")
    rows = [bench_attention(name, shape, q_len, args.reps) for q_len in (CHUNK, 1) for name, shape in SHAPES.items()]
    if args.model:
        rows.append(bench_prefill(args.model, args.length, args.rounds))
    meta = {"torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "command": " ".join(["python -m benchmarks.bench_cpu_memory_part",
                                 *(argv if argv is not None else sys.argv[1:])])}
    save_rows(args.out, meta, rows, render(rows, meta))


if __name__ == "__main__":
    main()
