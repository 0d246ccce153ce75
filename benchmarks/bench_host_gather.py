"""Gathering span rows that live in pinned host memory: staged copy against a kernel reading host memory directly.

    python -m benchmarks.bench_host_gather --rows 17408 --head-dim 128 --pool-rows 2097152 --out results/host_gather

The span pool's host tier is pinned memory. Today a retrieval gathers the selected host rows on the host into a
pinned buffer and copies that to the GPU (``PagedKVPool.gather_host_rows``), which needs the row list on the host, so
a step that touches host pages cannot be captured as a CUDA graph. A GPU can also read pinned host memory directly
(it is mapped into the device's address space): a Triton kernel gathering rows by index from the host tier needs no
host work and can run inside a graph. This measures, for one layer's worth of selected rows (K and V, bf16):

* ``device``: the same gather from a device-memory pool (the GPU tier; HBM), the reference;
* ``staged``: ``index_select`` on the host into pinned memory + one asynchronous copy (the current path);
* ``zero_copy``: the Triton kernel reading the pinned host pool directly; also replayed inside a CUDA graph.

Each result is checked against ``index_select`` before it is timed (CUDA events, median of ``--reps``). GPU only.
Writes ``bench.json`` / ``bench.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - GPU-only benchmark
    triton = None


if triton is not None:

    @triton.jit
    def _gather_rows_kernel(src_k, src_v, rows, out_k, out_v, n_rows,
                            HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        live = r < n_rows
        src = tl.load(rows + r, mask=live, other=0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols < HEAD_DIM)[None, :]
        off = src[:, None] * HEAD_DIM + cols[None, :]
        dst = r[:, None].to(tl.int64) * HEAD_DIM + cols[None, :]
        tl.store(out_k + dst, tl.load(src_k + off, mask=mask), mask=mask)
        tl.store(out_v + dst, tl.load(src_v + off, mask=mask), mask=mask)


def gather_rows(src_k: torch.Tensor, src_v: torch.Tensor, rows: torch.Tensor, out_k: torch.Tensor,
                out_v: torch.Tensor, block_r: int = 32) -> None:
    """``out[i] = src[rows[i]]`` for K and V ``[*, D]``; ``src`` may be pinned host memory, the rest on the GPU."""
    n, d = rows.numel(), src_k.shape[-1]
    _gather_rows_kernel[(triton.cdiv(n, block_r),)](src_k, src_v, rows, out_k, out_v, n, HEAD_DIM=d,
                                                    BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(d))


def _time(fn: Any, reps: int) -> float:
    """Median microseconds of ``fn`` (CUDA events, after two warm-up calls)."""
    fn()
    fn()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3)
    return statistics.median(out)


def measure(n: int, host_k: torch.Tensor, host_v: torch.Tensor, dev_k: torch.Tensor, dev_v: torch.Tensor,
            gen: torch.Generator, reps: int) -> dict[str, Any]:
    """One row of the table: ``n`` random rows gathered each way, checked, timed."""
    dev, head_dim, pool_rows = dev_k.device, host_k.shape[1], host_k.shape[0]
    rows_host = torch.randint(0, pool_rows, (n,), generator=gen)
    rows_dev = rows_host.to(dev)
    want_k, want_v = host_k.index_select(0, rows_host).to(dev), host_v.index_select(0, rows_host).to(dev)
    out_k = torch.empty(n, head_dim, dtype=torch.bfloat16, device=dev)
    out_v = torch.empty_like(out_k)
    staging_k = torch.empty(n, head_dim, dtype=torch.bfloat16).pin_memory()
    staging_v = torch.empty_like(staging_k).pin_memory()
    row: dict[str, Any] = {"rows": n, "bytes": 2 * n * head_dim * 2}

    def device_gather() -> None:
        gather_rows(dev_k, dev_v, rows_dev, out_k, out_v)

    def staged() -> None:
        torch.index_select(host_k, 0, rows_host, out=staging_k)
        torch.index_select(host_v, 0, rows_host, out=staging_v)
        out_k.copy_(staging_k, non_blocking=True)
        out_v.copy_(staging_v, non_blocking=True)

    def zero_copy() -> None:
        gather_rows(host_k, host_v, rows_dev, out_k, out_v)

    for name, fn in (("device", device_gather), ("staged", staged), ("zero_copy", zero_copy)):
        out_k.zero_()
        out_v.zero_()
        try:
            fn()
            torch.cuda.synchronize()
            ok = torch.equal(out_k, want_k) and torch.equal(out_v, want_v)
            row[name] = {"equal": ok, "us": _time(fn, reps)}
        except Exception as err:  # noqa: BLE001 - a refused host pointer is a result here
            row[name] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    if "us" in row["zero_copy"]:
        try:  # the zero-copy gather captured once and replayed
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                graph.capture_begin()
                zero_copy()
                graph.capture_end()
            torch.cuda.current_stream().wait_stream(side)
            out_k.zero_()
            graph.replay()
            torch.cuda.synchronize()
            row["zero_copy_graph"] = {"equal": torch.equal(out_k, want_k) and torch.equal(out_v, want_v),
                                      "us": _time(graph.replay, reps)}
        except Exception as err:  # noqa: BLE001
            row["zero_copy_graph"] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    for name in ("device", "staged", "zero_copy", "zero_copy_graph"):
        if "us" in row.get(name, {}):
            row[name]["gb_s"] = row["bytes"] / row[name]["us"] / 1e3
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1088, 17408],
                        help="rows gathered per call (tokens x KV heads; 17,408 = 2,176 tokens x 8 heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--pool-rows", type=int, default=1 << 21, help="rows in each pool (K and V alike)")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        parser.error("needs a CUDA device and Triton")
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(args.seed)
    began = time.perf_counter()
    host_k = torch.randn(args.pool_rows, args.head_dim, generator=gen).to(torch.bfloat16).pin_memory()
    host_v = torch.randn(args.pool_rows, args.head_dim, generator=gen).to(torch.bfloat16).pin_memory()
    dev_k, dev_v = host_k.to(dev), host_v.to(dev)
    result: dict[str, Any] = {"head_dim": args.head_dim, "pool_rows": args.pool_rows, "device":
                              torch.cuda.get_device_name(dev), "torch": torch.__version__,
                              "triton": triton.__version__, "setup_s": time.perf_counter() - began, "rows": []}
    for n in args.rows:
        row = measure(n, host_k, host_v, dev_k, dev_v, gen, args.reps)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    lines = [(f"# Gathering rows from pinned host memory ({result['device']}, torch {result['torch']}, triton "
              f"{result['triton']})"), "",
             (f"Pools of {args.pool_rows:,} rows x {args.head_dim} (bf16, K and V); random rows; median of CUDA-event "
              "timings."), "",
             "| rows | MB | device (HBM) us | staged copy us | zero-copy us | zero-copy in a graph us |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        cells = []
        for name in ("device", "staged", "zero_copy", "zero_copy_graph"):
            cell = row.get(name, {})
            cells.append(f"{cell['us']:.1f} ({cell['gb_s']:.0f} GB/s{'' if cell['equal'] else ', WRONG'})"
                         if "us" in cell else cell.get("error", "-")[:60])
        lines.append(f"| {row['rows']:,} | {row['bytes'] / 1e6:.2f} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    (args.out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
