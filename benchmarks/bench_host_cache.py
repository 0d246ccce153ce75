"""The device cache of host-tier rows on real text: how many of the host rows decode steps read come from the cache,
and the time per token with and without it, in one run.

Example (the lent GPU)::

    python -m benchmarks.bench_host_cache --model /tmp/m/qwen2.5-coder-0.5b.gguf --lengths 131072 262144 \\
        --kv-device-gib 1.0 --out benchmarks/results/host_cache_qwen_h200

A prompt of ``length`` tokens of essay text (``$LTRI_DATA_DIR``, :func:`benchmarks.tasks.haystack_text`, repeated as
needed) is read with the span pool's device budget held to ``--kv-device-gib`` (so most pages live in pinned host
memory and decode steps read them in place; the cache's size is capped at a quarter of it), then ``--tokens``
greedy decode steps are timed one by one (synchronised), with ``host_cache_tokens`` = 0 (no cache) and each of
``--cache-tokens``; each cached setting runs a second time counting the host rows its steps read and those read
from the cache (``COUNT_HOST_CACHE``, two atomic adds per host row: not timed). The cache holds exact copies, so
every run should decode the same tokens; each row records the first step that did not (``first_other_token``,
None when all agree; a near-tie can flip a greedy token between CUDA runs with or without the cache). Writes
``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.tasks import haystack_text
from ltri_rag import LtriConfig, LtriSession
from ltri_rag.loading import load_model


def prompt_ids(tokenizer: Any, length: int) -> torch.Tensor:
    """``[1, length]`` token ids of the essay text, repeated until long enough."""
    ids = tokenizer(haystack_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    reps = -(-length // ids.numel())
    return ids.repeat(reps)[:length][None, :]


def run(model: Any, ids: torch.Tensor, config: LtriConfig, tokens: int, count: bool) -> dict[str, Any]:
    """Prefill, then ``tokens`` greedy steps timed one by one; ms per step, the tokens, and (``count``) how many
    host rows the steps read and how many of them came from the cache."""
    from ltri_rag.kernels import triton_assemble

    triton_assemble.COUNT_HOST_CACHE = count  # (read when a step is captured: set for the whole session)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # peak_gib: this run's own
    try:
        session = LtriSession(model, config)
        device = session.device
        start = time.perf_counter()
        logits = session.feed(ids.to(device))
        torch.cuda.synchronize(device)
        prefill_s = time.perf_counter() - start
        pool = session.cache.pool
        stats = pool.host_cache_stats  # None without a cache
        if stats is not None:
            stats.zero_()
        times, out = [], []
        for _ in range(tokens):
            token = logits[0].argmax()
            out.append(int(token))
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            logits = session.step(token.view(1))
            torch.cuda.synchronize(device)
            times.append(1000 * (time.perf_counter() - start))
        hits, host_rows = stats.tolist() if stats is not None else (0, 0)
    finally:
        triton_assemble.COUNT_HOST_CACHE = False
    graph = session.decode_graph
    return {"counted": count, "prefill_s": prefill_s, "median_ms": statistics.median(times),
            "mean_ms": statistics.fmean(times), "times_ms": [round(t, 3) for t in times], "tokens": out,
            "host_rows": host_rows if count else None, "cache_hits": hits if count else None,
            "hit_rate": hits / host_rows if count and host_rows else None,
            "host_pages": pool.num_pages - pool.pages_on_device, "pages": pool.num_pages,
            "cache_tokens": pool.host_cache_tokens,
            "retrieving_replays": None if graph is None else graph.retrieving_replays,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id, model directory or .gguf file")
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--tokens", type=int, default=64, help="timed decode steps per run")
    parser.add_argument("--kv-device-gib", type=float, default=1.0,
                        help="the pool's device budget in GiB (the cache takes at most a quarter of it)")
    parser.add_argument("--cache-tokens", type=int, nargs="+", default=[32768])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_host_cache needs a CUDA device (the cache serves host rows a GPU reads in place)")
    for n in args.cache_tokens:
        if n <= 0:
            raise SystemExit(f"--cache-tokens must be positive, got {n}")
    model, tokenizer = load_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        # a warm-up session first (kernel compiles, allocator growth), so that the no-cache baseline is not the
        # process's cold run
        run(model, ids, LtriConfig(kv_device_gib=args.kv_device_gib, host_cache_tokens=0), 2, False)
        runs = [(0, False)] + [(n, count) for n in args.cache_tokens for count in (False, True)]
        for cache_tokens, count in runs:
            config = LtriConfig(kv_device_gib=args.kv_device_gib, host_cache_tokens=cache_tokens)
            row = {"length": length, "cache_tokens_asked": cache_tokens, **run(model, ids, config, args.tokens, count)}
            rows.append(row)
            print(f"[{length} cache {row['cache_tokens']}{' counted' if count else ''}] prefill "
                  f"{row['prefill_s']:.2f} s, decode {row['median_ms']:.2f} ms median ({row['mean_ms']:.2f} mean), "
                  f"host rows {row['host_rows']}, from the cache {row['cache_hits']}, pages {row['host_pages']} of "
                  f"{row['pages']} in host memory, {row['retrieving_replays']} retrieving replays", flush=True)
            base = next(r for r in rows if r["length"] == length)["tokens"]
            row["first_other_token"] = next((i for i, (a, b) in enumerate(zip(base, row["tokens"])) if a != b), None)
            if row["first_other_token"] is not None:  # recorded, not fatal: CUDA runs can differ in a near-tie
                print(f"  note: decode step {row['first_other_token']} gave another token than the run without a "
                      "cache", flush=True)
    lines = ["| length | cache tokens | counted | host pages / pages | decode ms (median) | host rows read | "
             "from the cache |", "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        rate = "-" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
        read = "-" if r["host_rows"] is None else f"{r['host_rows']:,}"
        lines.append(f"| {r['length']:,} | {r['cache_tokens']:,} | {'yes' if r['counted'] else 'no'} | "
                     f"{r['host_pages']:,} / {r['pages']:,} | {r['median_ms']:.2f} | {read} | {rate} |")
    text = "\n".join(lines)
    print(text)
    meta = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "kv_device_gib": args.kv_device_gib, "tokens": args.tokens}
    (args.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "bench.md").write_text(f"# Host-row cache on real text\n\n`{json.dumps(meta)}`\n\n{text}\n")


if __name__ == "__main__":
    main()
