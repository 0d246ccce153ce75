"""What pinning the span pool's host tier costs: torch's pinned allocator against registering pageable memory.

    python -m benchmarks.bench_host_alloc --gib 12 --pieces 64 --out results/host_alloc

A prompt whose span pool outgrows the GPU tier gets its host tier in one allocation per layer and K / V (64 pieces
for a 32-layer model), sized for the prompt. ``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching
host allocator, which rounds each block up to a power of two (a 192 MiB piece takes 256 MiB) and page-locks it with
``cudaHostAlloc``. The alternative measured here allocates pageable memory of the exact size and page-locks it with
``cudaHostRegister`` (portable | mapped). Per variant, in one process (``--order`` sets which runs first):

* ``alloc_s``: wall time to allocate (and pin) every piece;
* ``touch_s``: wall time to write every piece once from the host (what the pool's first use costs);
* ``pinned_gib``: host memory page-locked for it (torch's host allocator stats, or the registered bytes);
* ``free_s``: wall time to release it (unregister / empty torch's host cache);
* ``gpu_read_ok``: a Triton kernel on the GPU gathers rows of the first piece in place and equals ``index_select``
  (registered memory must be usable the way the pool's in-place kernels use it).

GPU only. Writes ``bench.json`` / ``bench.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ltri_rag.kernels.triton_gather import gather_two_tiers

_PORTABLE_MAPPED = 3  # cudaHostRegisterPortable | cudaHostRegisterMapped


def _host_stats() -> dict[str, int]:
    stats = getattr(torch.cuda, "host_memory_stats", None)
    return dict(stats()) if stats is not None else {}


def _pinned_now() -> int:
    stats = _host_stats()
    return int(stats.get("reserved_bytes.current", stats.get("allocated_bytes.current", 0)))


def _gpu_read_ok(piece: torch.Tensor) -> bool:
    """Gather 1,000 rows of ``piece`` (a host ``[rows, D]`` view) with the in-place kernel; equal to indexing?"""
    rows = piece.view(-1, piece.shape[-1])
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, rows.shape[0], (1000,), generator=gen)
    empty = torch.empty(0, rows.shape[1], dtype=rows.dtype, device="cuda")
    k, v = gather_two_tiers(empty, empty, rows, rows, idx.cuda(), split_row=0)
    torch.cuda.synchronize()
    want = rows.index_select(0, idx)
    return bool(torch.equal(k.cpu(), want) and torch.equal(v.cpu(), want))


def _torch_pinned(pieces: int, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
    before = _pinned_now()
    start = time.perf_counter()
    tensors = [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(pieces)]
    alloc = time.perf_counter() - start
    pinned = _pinned_now() - before
    start = time.perf_counter()
    for t in tensors:
        t.fill_(1.0)
    touch = time.perf_counter() - start
    ok = _gpu_read_ok(tensors[0])
    start = time.perf_counter()
    del tensors
    torch.cuda.synchronize()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    free = time.perf_counter() - start
    return {"alloc_s": alloc, "touch_s": touch, "pinned_gib": pinned / 2**30, "free_s": free, "gpu_read_ok": ok}


def _registered(pieces: int, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
    cudart = torch.cuda.cudart()
    start = time.perf_counter()
    tensors = [torch.empty(shape, dtype=dtype) for _ in range(pieces)]
    nbytes = 0
    for t in tensors:
        size = t.numel() * t.element_size()
        err = int(cudart.cudaHostRegister(t.data_ptr(), size, _PORTABLE_MAPPED))
        if err != 0:
            raise RuntimeError(f"cudaHostRegister failed with CUDA error {err}")
        nbytes += size
    alloc = time.perf_counter() - start
    start = time.perf_counter()
    for t in tensors:
        t.fill_(1.0)
    touch = time.perf_counter() - start
    pinned_check = all(t.is_pinned() for t in tensors)
    ok = _gpu_read_ok(tensors[0])
    start = time.perf_counter()
    torch.cuda.synchronize()
    for t in tensors:
        cudart.cudaHostUnregister(t.data_ptr())
    del tensors
    free = time.perf_counter() - start
    return {"alloc_s": alloc, "touch_s": touch, "pinned_gib": nbytes / 2**30, "free_s": free, "gpu_read_ok": ok,
            "is_pinned": pinned_check}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=12.0, help="host tier size in GiB (all pieces together)")
    parser.add_argument("--pieces", type=int, default=64, help="allocations (layers x K/V)")
    parser.add_argument("--row-bytes", type=int, default=2048, help="bytes per token row of one piece (Hkv x D x 2)")
    parser.add_argument("--order", nargs="+", default=["torch_pinned", "registered"],
                        choices=["torch_pinned", "registered"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_host_alloc needs a GPU")
    torch.cuda.init()
    rows = int(args.gib * 2**30 / args.pieces / args.row_bytes)
    shape = (rows, args.row_bytes // 256, 128)  # bf16 rows of Hkv x 128
    runs = {"torch_pinned": _torch_pinned, "registered": _registered}
    results: dict[str, Any] = {"gib": args.gib, "pieces": args.pieces, "piece_mib": rows * args.row_bytes / 2**20,
                               "device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {}}
    for name in args.order:
        results["variants"][name] = runs[name](args.pieces, shape, torch.bfloat16)
        print(name, json.dumps(results["variants"][name]), flush=True)
    lines = [f"# Host tier of {args.gib} GiB in {args.pieces} pieces of {results['piece_mib']:.1f} MiB "
             f"({results['device']}, torch {results['torch']})", "",
             "| variant | alloc s | first touch s | pinned GiB | free s | GPU reads in place |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in results["variants"].items():
        lines.append(f"| {name} | {r['alloc_s']:.2f} | {r['touch_s']:.2f} | {r['pinned_gib']:.2f} | {r['free_s']:.2f} "
                     f"| {r['gpu_read_ok']} |")
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(results, indent=2))
        (args.out / "bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
