"""What the span selection's Triton sorts cost the first time they run: compile time per row length, cold cache.

    python -m benchmarks.bench_compile --out benchmarks/results/compile_h200

A selection row of up to ``MAX_SPANS`` spans is sorted by one program with ``tl.sort``
(:mod:`ltri_rag.kernels.triton_sort_fill`), and longer rows go through chunk-sort rounds first. Triton compiles
each block size on first use, so a prompt that grows its span memory from a few dozen to thousands of spans pays
one compile per size it meets. This script points Triton's cache at an empty directory (``TRITON_CACHE_DIR``, set
before triton is imported; ``--cache-dir`` keeps one between runs), then for each ``--spans`` length calls
:func:`ltri_rag.retrieval.select_spans_pair` (a layer's two selections, the decode step's shapes of
``bench_small_kernels``) three times: the first call's time minus the median of the later two is the compile time
that length added. Also counts the compiled kernels left in the cache. GPU only.

``--precompile`` first runs :func:`ltri_rag.kernels.precompile.precompile_sort_kernels` (every sort variant, in
parallel child processes) and records its wall time and the device memory the children took (the least free memory
seen while they ran, against before); the per-length rows then show what compiling is left.

Prints and writes ``bench.json`` / ``bench.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def _compiled_kernels(cache_dir: str) -> int:
    """Kernels Triton has written to ``cache_dir`` (one ``.json`` metadata file each, ``__grp__`` files aside)."""
    return sum(1 for p in Path(cache_dir).rglob("*.json") if not p.name.startswith("__grp__"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spans", type=int, nargs="+", default=[64, 100, 200, 400, 800, 1024, 2048, 16384, 65536])
    parser.add_argument("--cache-dir", default=None, help="Triton cache to use (default: a new empty directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precompile", action="store_true", help="compile the sort variants ahead first (timed)")
    parser.add_argument("--workers", type=int, default=None, help="child processes of --precompile")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if any(s < 1 for s in args.spans):
        parser.error(f"--spans must be >= 1, got {args.spans}")
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # before triton is imported (by torch or ltri_rag below)

    import torch

    from benchmarks.bench_small_kernels import select_case

    if not torch.cuda.is_available():
        raise SystemExit("bench_compile needs a CUDA device (the CPU path compiles nothing)")
    gen = torch.Generator().manual_seed(args.seed)
    ahead = _precompile(args.workers) if args.precompile else None
    rows = []
    for spans in args.spans:
        fns, _ = select_case(spans, 3, gen)
        before = _compiled_kernels(cache_dir)
        times = []
        for fn in fns:
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        steady = statistics.median(times[1:])
        row = {"spans": spans, "first_s": times[0], "steady_s": steady, "compile_s": times[0] - steady,
               "new_kernels": _compiled_kernels(cache_dir) - before}
        rows.append(row)
        print(f"{spans:7d} spans  first {times[0]:8.3f} s  then {steady * 1e3:8.3f} ms  "
              f"compile ~{row['compile_s']:7.3f} s  {row['new_kernels']} new kernels", flush=True)
    total = sum(r["compile_s"] for r in rows)
    print(f"total compile ~{total:.1f} s, {_compiled_kernels(cache_dir)} kernels in the cache")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "cold_cache": args.cache_dir is None, "precompile": ahead}
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# First calls of a layer's two span selections ({meta['device']}, triton {meta['triton']})", "",
             "| spans | first call, s | later calls, ms | compile, s | kernels compiled |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['spans']} | {r['first_s']:.3f} | {r['steady_s'] * 1e3:.3f} | {r['compile_s']:.3f} | "
              f"{r['new_kernels']} |" for r in rows]
    lines += ["", f"Total: ~{total:.1f} s of compiling in the calls."]
    if ahead is not None:
        lines += ["", f"Compiled ahead first (`--precompile`): {ahead['variants']} variants in {ahead['wall_s']:.1f} s "
                  f"of wall time over {ahead['workers']} child processes; they took up to "
                  f"{ahead['device_mib']:.0f} MiB of device memory while running."]
    (out / "bench.md").write_text("\n".join(lines) + "\n")


def _precompile(workers: int | None) -> dict:
    """Run the ahead-of-use compile, timed, watching the device's free memory while its children run."""
    import torch
    from ltri_rag.kernels.precompile import precompile_sort_kernels

    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    least = free_before
    start = time.perf_counter()
    job = precompile_sort_kernels(workers=workers, wait=False)
    if job is None:
        return {"variants": 0, "workers": 0, "wall_s": 0.0, "device_mib": 0.0}
    while not job.done():
        least = min(least, torch.cuda.mem_get_info()[0])
        time.sleep(0.05)
    job.wait()
    wall = time.perf_counter() - start
    row = {"variants": len(job.variants), "workers": len(job.processes), "wall_s": wall,
           "device_mib": (free_before - least) / 2 ** 20}
    print(f"precompiled {row['variants']} variants in {wall:.1f} s over {row['workers']} processes "
          f"(device memory taken while running: {row['device_mib']:.0f} MiB)", flush=True)
    return row


if __name__ == "__main__":
    main()
