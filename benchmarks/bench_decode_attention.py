"""One decode step of a global layer, side by side: the torch composition, the fused Triton kernel, and SDPA.

    python -m benchmarks.bench_decode_attention --out benchmarks/results/decode_attention_h200

One query per sequence (batch 1, bf16) against ``[memory | local window]`` at 4K / 16K / 128K keys per KV head
(window ``min(4096, keys / 2)``, the rest memory), for Llama-3-8B (32 query / 8 KV heads, head_dim 128) and
Qwen2.5-0.5B (14 / 2, 64) layers. Backends:

* ``torch``: the engine's decode step today (``attention_with_lse`` over the memory, ``local_attention`` over the
  window with ``extra_lse``, ``merge_attention``), computing ``out``, ``lse``, the window's key mass and band;
* ``triton``: :func:`ltri_rag.kernels.triton_decode.decode_attention_triton`, the same result in two launches
  (``triton (previous finish)``: its finishing pass in the form before session 22, ``ONE_TILE_FINISH`` off;
  ``triton (finish in the split pass)``: one launch, ``FUSED_FINISH`` on, same results bit for bit;
  ``triton (finish as a dependent launch)``: ``PDL_FINISH`` on, the finishing launch started while the split pass
  runs, on compute capability 9.0 and later, the plain launch elsewhere);
* ``sdpa (out only)``: ``scaled_dot_product_attention`` over the keys concatenated beforehand (GQA native), the
  reference speed of plain decode attention without the statistics;
* ``read floor (one launch)``: :func:`benchmarks.decode_read_floor.read_kv`, one Triton launch reading the same K
  and V in the Triton kernel's split layout and only adding them up: what any one-launch decode kernel of that
  layout cannot beat (its error column: the relative error of the sum of everything read).

Each backend runs over ``--layers`` separate copies of the inputs, in turn, so that consecutive calls never find
their K/V in the 60 MB L2 (as the layers of a real step would not). Times are µs per layer: ``us`` the median of
CUDA-event timings of single eager calls (launch overhead included), ``us_graph`` one CUDA graph holding a call per
layer, replayed, divided by the number of layers (what a graph-captured decode step pays; empty where the capture
failed). ``floor %`` = K+V bytes read / 4.3 TB/s / time (graph time where there is one). Errors are against the
float32 composition on the same bf16 values.

``--splits`` / ``--block-n`` add Triton rows with those settings (tuning); ``--grid KEY=V1,V2 ...`` adds one Triton
row per combination of the listed settings (keys: ``num_splits``, ``block_n``, ``num_warps``, ``num_stages``), and
a read-floor row with the same settings.
Prints a Markdown table and writes ``bench.json`` and ``bench.md`` under ``--out``. On CPU (``--small``, with
``TRITON_INTERPRET=1`` for the Triton row) it runs tiny shapes: a check that the script works, not a speed result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HBM_BYTES_PER_S = 4.3e12
"""The floor's bandwidth (``--hbm-tbps``): the lent H200's device-to-device copy rate (performance.md). Another GPU
needs its own figure; the rate used is written into the results and their header."""
L2_BYTES = 60e6
MODELS = {  # name: (num_heads, num_kv_heads, head_dim)
    "llama3-8b": (32, 8, 128),
    "qwen2.5-0.5b": (14, 2, 64),
}
CONTEXTS = (4096, 16384, 131072)  # keys per KV head (memory + window)
READ_FLOOR = "read floor (one launch)"
ONE_LAUNCH = "triton (finish in the split pass)"  # the row of FUSED_FINISH flipped on (off: TWO_LAUNCHES)
TWO_LAUNCHES = "triton (finish launched apart)"
DEPENDENT = "triton (finish as a dependent launch)"  # the row of PDL_FINISH flipped on (off: NOT_DEPENDENT)
NOT_DEPENDENT = "triton (finish launched plainly)"
SMALL_MODELS = {"tiny": (4, 2, 32)}
SMALL_CONTEXTS = (48, 96)


def _split(keys: int) -> tuple[int, int]:
    """``(mem_len, win_len)`` of ``keys`` keys: a window of up to 4096, the rest memory."""
    win = min(4096, keys // 2)
    return keys - win, win


def _time_events(fns: list[Callable[[], Any]], reps: int, cuda: bool) -> float:
    """Median µs of one call, cycling through ``fns`` (one per layer), after one warm-up round."""
    for fn in fns:
        fn()
    times = []
    for i in range(reps * len(fns)):
        fn = fns[i % len(fns)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e6)
    return statistics.median(times)


def _time_graph(fns: list[Callable[[], Any]], reps: int) -> float | None:
    """µs per call of a CUDA graph that calls every fn once, replayed ``reps`` times (median); None if the
    capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for fn in fns:
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
    except Exception as exc:  # noqa: BLE001 - any capture failure: report the eager time only
        print(f"  (graph capture failed: {type(exc).__name__}: {exc})", flush=True)
        torch.cuda.synchronize()
        return None
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    del graph
    return statistics.median(times)


def _triton_module(device: torch.device):
    try:
        from ltri_rag.kernels import triton_decode
    except ImportError:
        return None
    ok = triton_decode.triton_available() and (device.type == "cuda" or triton_decode.INTERPRETED)
    return triton_decode if ok else None


def _tuned(backend: str, settings: dict[str, int]) -> str:
    """The row label of ``backend`` run with explicit launch ``settings``, e.g. ``triton (num_splits=2)``."""
    return f"{backend} (" + ", ".join(f"{k}={v}" for k, v in settings.items()) + ")"


def bench_shape(model: str, heads: tuple[int, int, int], keys: int, device: torch.device, dtype: torch.dtype,
                reps: int, band: int, layers: int | None, tuning: list[dict[str, int]],
                hbm_bytes_per_s: float = HBM_BYTES_PER_S) -> list[dict[str, Any]]:
    """One row per backend for one (model, context); ``floor_pct``: K+V bytes / ``hbm_bytes_per_s`` over the time."""
    from ltri_rag.kernels.triton_decode import decode_attention

    num_heads, num_kv_heads, head_dim = heads
    mem_len, win_len = _split(keys)
    kv_bytes = 2 * num_kv_heads * keys * head_dim * torch.finfo(dtype).bits // 8
    if layers is None:  # enough copies that one round exceeds three times the L2
        layers = max(2, min(128, -(-int(3 * L2_BYTES) // kv_bytes)))
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:  # drawn on the device: fast at 128K keys
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    copies = []
    for _ in range(layers):
        q = randn(1, num_heads, 1, head_dim)
        mem_k, mem_v = randn(1, num_kv_heads, mem_len, head_dim), randn(1, num_kv_heads, mem_len, head_dim)
        win_k, win_v = randn(1, num_kv_heads, win_len, head_dim), randn(1, num_kv_heads, win_len, head_dim)
        mem_mask = torch.ones(1, num_kv_heads, mem_len, dtype=torch.bool, device=device)
        copies.append((q, mem_k, mem_v, mem_mask, win_k, win_v))
    scaling = head_dim ** -0.5
    kwargs = {"scaling": scaling, "band_width": band, "want_key_mass": True}
    cuda = device.type == "cuda"

    backends: dict[str, list[Callable[[], Any]]] = {
        "torch": [lambda c=c: decode_attention(*c, **kwargs) for c in copies]}
    td = _triton_module(device)
    if td is not None:
        backends["triton"] = [lambda c=c: td.decode_attention_triton(*c, **kwargs) for c in copies]

        def flipped(c, flag: str):  # the kernel with one of its form switches flipped, for a same-run A/B
            current = getattr(td, flag)
            setattr(td, flag, not current)
            try:
                return td.decode_attention_triton(*c, **kwargs)
            finally:
                setattr(td, flag, current)

        # the finishing pass before session 22 (ONE_TILE_FINISH off); the finish in the split pass (FUSED_FINISH)
        # and the finishing pass as a programmatic dependent launch (PDL_FINISH; Hopper and later, else the same)
        for flag, on_label, off_label in (("ONE_TILE_FINISH", "triton (one-tile finish)", "triton (previous finish)"),
                                          ("FUSED_FINISH", ONE_LAUNCH, TWO_LAUNCHES),
                                          ("PDL_FINISH", DEPENDENT, NOT_DEPENDENT)):
            label = off_label if getattr(td, flag) else on_label  # the row of the flipped form
            backends[label] = [lambda c=c, flag=flag: flipped(c, flag) for c in copies]
        for t in tuning:
            backends[_tuned("triton", t)] = [lambda c=c, t=t: td.decode_attention_triton(*c, **kwargs, **t)
                                             for c in copies]
        from benchmarks import decode_read_floor as floor

        if cuda or floor.INTERPRETED:  # K and V read once in the same layout, nothing computed: one launch's floor
            backends[READ_FLOOR] = [lambda c=c: floor.read_kv(c[1], c[2], c[4], c[5]) for c in copies]
            for t in tuning:  # the same launch settings for the bare read: how fast can one launch read at all
                backends[_tuned(READ_FLOOR, t)] = [lambda c=c, t=t: floor.read_kv(c[1], c[2], c[4], c[5], **t)
                                                   for c in copies]
    cat = [(c[0], torch.cat([c[1], c[4]], 2), torch.cat([c[2], c[5]], 2)) for c in copies]

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)

    backends["sdpa (out only)"] = [lambda c=c: sdpa(*c) for c in cat]
    ref = decode_attention(*(t.float() if t.dtype != torch.bool else t for t in copies[0]), **kwargs)

    rows = []
    for backend, fns in backends.items():
        us = _time_events(fns, reps, cuda)
        us_graph = _time_graph(fns, reps) if cuda else None
        best = us_graph if us_graph is not None else us
        row = {"model": model, "keys": keys, "mem_len": mem_len, "win_len": win_len, "backend": backend,
               "us": us, "us_graph": us_graph, "kv_bytes": kv_bytes, "layers": layers, "dtype": str(dtype),
               "floor_pct": 100.0 * kv_bytes / hbm_bytes_per_s / (best * 1e-6)}
        got = fns[0]()
        if backend.startswith(READ_FLOOR):  # the partial sums add up to every element read once
            total = sum(float(t.double().sum()) for t in (copies[0][1], copies[0][2], copies[0][4], copies[0][5]))
            row["max_err_out"] = abs(float(got.double().sum()) - total) / max(abs(total), 1.0)
        elif backend.startswith("sdpa"):
            row["max_err_out"] = float((got.float() - ref.out).abs().max())
        else:
            row["max_err_out"] = float((got.out - ref.out).abs().max())
            row["max_rel_err_key_mass"] = float(((got.key_mass - ref.key_mass).abs()
                                                 / ref.key_mass.abs().clamp(min=1e-6)).max())
        rows.append(row)
        graph_text = "-" if us_graph is None else f"{us_graph:9.1f}"
        print(f"{model:13s} {keys:7d} {backend:28s} {us:9.1f} us  graph {graph_text} us  "
              f"{row['floor_pct']:6.1f} % of floor", flush=True)
    return rows


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown table of every row, times relative to the torch composition of the same shape."""
    def best(r: dict[str, Any]) -> float:
        return r["us_graph"] if r["us_graph"] is not None else r["us"]

    torch_us = {(r["model"], r["keys"]): best(r) for r in rows if r["backend"] == "torch"}
    lines = [f"# Decode attention over [memory | window], {meta['device']} ({meta['dtype']}, torch {meta['torch']})",
             "", f"batch 1, band {meta['band']}, key mass on; µs per layer; floor = K+V bytes / "
             f"{meta.get('hbm_tbps', 4.3)} TB/s.", "",
             ("| model | keys / KV head | memory + window | backend | µs (events) | µs (graph) | % of floor | "
              "vs torch | max abs err (out) | max rel err (key mass) |"),
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        graph = "-" if r["us_graph"] is None else f"{r['us_graph']:.1f}"
        mass = f"{r['max_rel_err_key_mass']:.1e}" if "max_rel_err_key_mass" in r else "-"
        lines.append(f"| {r['model']} | {r['keys']} | {r['mem_len']} + {r['win_len']} | {r['backend']} | "
                     f"{r['us']:.1f} | {graph} | {r['floor_pct']:.1f} | "
                     f"{torch_us[(r['model'], r['keys'])] / best(r):.2f}x | {r['max_err_out']:.1e} | {mass} |")
    return "\n".join(lines) + "\n"


_GRID_KEYS = ("num_splits", "block_n", "num_warps", "num_stages")


def _grid(items: list[str]) -> list[dict[str, int]]:
    """Every combination of ``KEY=V1,V2`` settings (``--grid``)."""
    axes: list[list[tuple[str, int]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in _GRID_KEYS:
            raise SystemExit(f"--grid expects KEY=V1,V2 with KEY one of {_GRID_KEYS}, got {item!r}")
        axes.append([(key, int(v)) for v in values.split(",") if v])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--band", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="input copies (default: enough to defeat the L2)")
    parser.add_argument("--contexts", type=int, nargs="*", default=None, help="keys per KV head")
    parser.add_argument("--models", nargs="*", default=None, choices=sorted(MODELS))
    parser.add_argument("--splits", type=int, nargs="*", default=[], help="extra Triton rows with num_splits=N")
    parser.add_argument("--block-n", type=int, nargs="*", default=[], help="extra Triton rows with block_n=N")
    parser.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2",
                        help="extra Triton rows: every combination of these settings")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU check of the script)")
    parser.add_argument("--hbm-tbps", type=float, default=HBM_BYTES_PER_S / 1e12,
                        help="bandwidth of the floor, TB/s (default: the H200's 4.3; give another GPU's own)")
    args = parser.parse_args(argv)
    if args.hbm_tbps <= 0:
        parser.error(f"--hbm-tbps must be > 0, got {args.hbm_tbps}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = SMALL_MODELS if args.small else {m: MODELS[m] for m in (args.models or MODELS)}
    contexts = args.contexts or (SMALL_CONTEXTS if args.small else CONTEXTS)
    tuning = [{"num_splits": s} for s in args.splits] + [{"block_n": b} for b in args.block_n] + _grid(args.grid)
    band = min(args.band, 8) if args.small else args.band
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "torch": torch.__version__, "reps": args.reps, "band": band, "hbm_tbps": args.hbm_tbps}
    if device.type == "cuda" and "H200" not in meta["device"] and args.hbm_tbps == HBM_BYTES_PER_S / 1e12:
        print(f"warning: the floor uses the H200's {args.hbm_tbps} TB/s on a {meta['device']}; pass --hbm-tbps",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name, heads in models.items():
        for keys in contexts:
            rows += bench_shape(name, heads, keys, device, dtype, args.reps, band,
                                args.layers if not args.small else 2, tuning, args.hbm_tbps * 1e12)
            # written after every shape: a run cut short by a time limit keeps what it measured
            (args.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
            text = render(rows, meta)
            (args.out / "bench.md").write_text(text, encoding="utf-8")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(text)


if __name__ == "__main__":
    main()
