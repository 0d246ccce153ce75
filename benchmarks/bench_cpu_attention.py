"""The plain-torch local attention on a CPU, whole chunk against query blocks, side by side in one process.

    python -m benchmarks.bench_cpu_attention --out benchmarks/results/cpu_attention \\
        [--model qwen2.5-coder-0.5b.gguf --docs 3]

``kernels.attention.local_attention`` on a CPU attends a chunk's queries ``CPU_QUERY_BLOCK`` at a time (each block's
score tensor stays in cache across its passes; keys past the block are skipped). This times one prefill chunk's
local attention (2,048 queries over a 4,096-token window plus the chunk, with key mass and band, as the engine asks
for it) at Qwen2.5-0.5B and Llama-3-8B heads, blocked and whole (``CPU_QUERY_BLOCK`` set past the chunk), alternating,
and reports the largest differences of the results. With ``--model`` it also ingests the first ``--docs`` Paul
Graham essays into a fresh ``KVMemory`` both ways (alternating, twice each) and reads the same texts with the plain
model (tokenised beforehand, last-position logits only, no cache; twice, after the ingests, median). Writes
``bench.json`` and ``bench.md``. CPU only; a speed result for the machine it runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ltri_rag.kernels import attention

SHAPES = {"qwen2.5-0.5b": (14, 2, 64), "llama3-8b": (32, 8, 128)}  # (heads, KV heads, head_dim)
WINDOW, CHUNK, BAND = 4096, 2048, 8


def _attend(q, k, v, lse_m) -> attention.LocalAttention:
    return attention.local_attention(q, k, v, scaling=q.shape[-1] ** -0.5, causal_offset=WINDOW, extra_lse=lse_m,
                                     band_width=BAND, want_key_mass=True)


def bench_chunk(name: str, shape: tuple[int, int, int], reps: int) -> dict[str, Any]:
    heads, kv_heads, dim = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, CHUNK, dim, generator=gen)
    k, v = (torch.randn(1, kv_heads, WINDOW + CHUNK, dim, generator=gen) for _ in range(2))
    lse_m = torch.randn(1, heads, CHUNK, generator=gen)
    block = attention.CPU_QUERY_BLOCK
    times: dict[str, list[float]] = {"blocked": [], "whole": []}
    results = {}
    try:
        for rep in range(2 * reps + 2):  # alternating; the first of each is a warm-up
            kind = "blocked" if rep % 2 == 0 else "whole"
            attention.CPU_QUERY_BLOCK = block if kind == "blocked" else 1 << 30
            t0 = time.perf_counter()
            results[kind] = _attend(q, k, v, lse_m)
            if rep >= 2:
                times[kind].append(time.perf_counter() - t0)
    finally:
        attention.CPU_QUERY_BLOCK = block
    a, b = results["blocked"], results["whole"]
    diff = {f: float((getattr(a, f) - getattr(b, f)).abs().max()) for f in ("out", "lse", "key_mass", "band")}
    row = {"shape": name, "heads": heads, "kv_heads": kv_heads, "head_dim": dim, "block": block,
           "blocked_s": statistics.median(times["blocked"]), "whole_s": statistics.median(times["whole"]),
           "max_abs_diff": diff, "key_mass_max": float(b.key_mass.abs().max())}
    print(f"{name}: blocked {row['blocked_s']:.3f} s, whole {row['whole_s']:.3f} s, diffs {diff}", flush=True)
    return row


def plain_read(model: Any, ids: list[torch.Tensor]) -> float:
    """Seconds for the plain model to read each ``[1, n]`` id tensor in one forward, as an ingest reads a document:
    tokenised beforehand, no cache kept, logits for the last position only (an ingest keeps none; all-position
    logits are ~29% more matrix work at Qwen2.5-0.5B's vocabulary)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        for x in ids:
            model(input_ids=x, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - t0


def bench_ingest(model_path: str, docs: int) -> dict[str, Any]:
    from ltri_rag import KVMemory
    from ltri_rag.loading import load_model

    model, tok = load_model(model_path)
    data = Path(os.environ.get("LTRI_DATA_DIR", "../shared/data")) / "paul_graham_essays"
    texts = [p.read_text(encoding="utf-8") for p in sorted(data.glob("*.txt"))[:docs]]
    tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    block = attention.CPU_QUERY_BLOCK
    seconds: dict[str, list[float]] = {"blocked": [], "whole": []}
    try:
        for run in range(4):
            kind = "blocked" if run % 2 == 0 else "whole"
            attention.CPU_QUERY_BLOCK = block if kind == "blocked" else 1 << 30
            with tempfile.TemporaryDirectory() as folder:
                memory = KVMemory.create(Path(folder) / "memory", model, tok)
                t0 = time.perf_counter()
                memory.add_documents(texts)
                seconds[kind].append(time.perf_counter() - t0)
                memory.close()
    finally:
        attention.CPU_QUERY_BLOCK = block
    plain = statistics.median(plain_read(model, [torch.tensor([tok(t)["input_ids"]]) for t in texts])
                              for _ in range(2))
    row = {"model": Path(model_path).name, "docs": docs, "tokens": tokens,
           "ingest_s": seconds, "plain_prefill_s": plain,
           "tok_per_s": {k: tokens / statistics.median(v) for k, v in seconds.items()} | {"plain": tokens / plain}}
    print(f"ingest {tokens} tokens: {row['tok_per_s']}", flush=True)
    return row


def render(rows: list[dict[str, Any]], ingest: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    lines = [f"# Plain-torch local attention on a CPU, query blocks of {meta['block']} against the whole chunk", "",
             f"`{meta['command']}`; {meta['cpus']} CPUs, torch {meta['torch']}, float32.", "",
             "| heads (q / kv / d) | blocked s | whole s | speed-up | max |diff| out / lse / key mass / band | "
             "largest key mass |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        d = r["max_abs_diff"]
        lines.append(f"| {r['shape']} ({r['heads']} / {r['kv_heads']} / {r['head_dim']}) | {r['blocked_s']:.3f} | "
                     f"{r['whole_s']:.3f} | {r['whole_s'] / r['blocked_s']:.2f}x | {d['out']:.1e} / {d['lse']:.1e} / "
                     f"{d['key_mass']:.1e} / {d['band']:.1e} | {r['key_mass_max']:.1f} |")
    if ingest:
        t = ingest["tok_per_s"]
        lines += ["", f"KVMemory ingest of {ingest['docs']} essays ({ingest['tokens']:,} tokens, {ingest['model']}), "
                  "alternating, median of two each: blocked {:.0f} tok/s, whole {:.0f} tok/s; the plain model reading "
                  "the same texts {:.0f} tok/s.".format(t["blocked"], t["whole"], t["plain"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", help="a GGUF file: also time KVMemory ingest both ways")
    parser.add_argument("--docs", type=int, default=3)
    args = parser.parse_args(argv)
    rows = [bench_chunk(name, shape, args.reps) for name, shape in SHAPES.items()]
    ingest = bench_ingest(args.model, args.docs) if args.model else None
    meta = {"torch": torch.__version__, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "block": attention.CPU_QUERY_BLOCK,
            "command": " ".join(["python -m benchmarks.bench_cpu_attention",
                                 *(argv if argv is not None else sys.argv[1:])])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps({"meta": meta, "chunks": rows, "ingest": ingest}, indent=2))
    text = render(rows, ingest, meta)
    (args.out / "bench.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
