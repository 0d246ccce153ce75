"""The engine's local attention pass, side by side: plain torch, Triton, and SDPA over the same keys.

    python -m benchmarks.bench_local_attention --out benchmarks/results/local_attention_h200

One chunk of queries against [local window | the chunk itself, causal], bf16, the shapes the quality grid runs
(Qwen2.5-0.5B: 14 query / 2 KV heads, head_dim 64) and a Llama-3-8B layer (32 / 8, 128), window 4096 + chunk 2048.
Each backend computes what ltri needs (``out``, ``lse``, per-key attention mass, the diagonal band of 64);
``sdpa`` computes ``out`` only (``scaled_dot_product_attention`` with the causal-offset mask), as the reference speed
of a fused kernel without the statistics. Times are medians of ``--reps`` runs after a warm-up (CUDA events on the
GPU). TFLOP/s counts the causal part only: ``4 * H * D * sum_i (offset + i + 1)``.

``--sweep`` also times the Triton kernel over launch settings (block rows x block keys x warps x stages; settings
that do not compile or fail are recorded as such) and writes ``sweep.json`` / ``sweep.md``, best first per shape:
the data for :func:`ltri_rag.kernels.triton_local.block_sizes`.

Prints a Markdown table and writes ``bench.json`` and ``bench.md`` under ``--out``. On CPU (``--small``, with
``TRITON_INTERPRET=1`` for the Triton row) it runs tiny shapes: a check that the script works, not a speed result.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.output import save_rows
from ltri_rag.kernels.attention import local_attention, local_attention_backend

SHAPES = {  # name: (num_heads, num_kv_heads, head_dim, window, chunk)
    "qwen2.5-0.5b": (14, 2, 64, 4096, 2048),
    "llama3-8b": (32, 8, 128, 4096, 2048),
}
SMALL = {"tiny": (4, 2, 32, 96, 64)}


def _time(fn: Callable[[], Any], reps: int, cuda: bool) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def _case(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
          band: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any], int]:
    """One shape's inputs (seed 0), the call's keyword arguments (key mass and band on) and its causal FLOPs:
    ``q [1, H, chunk, D]``, ``k, v [1, Hkv, window + chunk, D]``."""
    num_heads, num_kv_heads, head_dim, window, chunk = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, num_heads, chunk, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(1, num_kv_heads, window + chunk, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(1, num_kv_heads, window + chunk, head_dim, generator=gen).to(device, dtype)
    kwargs = {"scaling": head_dim ** -0.5, "causal_offset": window, "band_width": band, "want_key_mass": True}
    flops = 4 * num_heads * head_dim * sum(window + i + 1 for i in range(chunk))
    return q, k, v, kwargs, flops


def load_baseline(path: Path) -> Callable[..., Any]:
    """``local_attention_triton`` of another copy of ``kernels/triton_local.py`` (e.g. ``git show
    REV:kernels/triton_local.py > prev.py``), imported from ``path`` beside the installed one, for same-run A/Bs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_triton_local", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import a kernel module from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.local_attention_triton


def bench_shape(name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, reps: int,
                band: int, baseline: Callable[..., Any] | None = None,
                mass_steps: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """One row per backend for one shape (``baseline``: another ``local_attention_triton``, rows ``baseline``
    and ``baseline (no key mass)``; ``mass_steps``: Triton rows whose key mass sums every N-th query only,
    checked against the torch path with the same sampling)."""
    num_heads, num_kv_heads, _, window, chunk = shape
    kv_len = window + chunk
    q, k, v, kwargs, flops = _case(shape, device, dtype, band)
    scaling = kwargs["scaling"]
    backends: dict[str, Callable[[], Any]] = {"torch": lambda: local_attention(q, k, v, **kwargs)}
    sampled: dict[str, int] = {}  # rows whose key mass sums every N-th query: their N
    triton_fn = local_attention_backend("triton", device) if _triton_runs(device) else None
    if triton_fn is not None:
        backends["triton"] = lambda: triton_fn(q, k, v, **kwargs)
        # the forward alone (band kept): the difference to the row above is the key-mass pass
        backends["triton (no key mass)"] = lambda: triton_fn(q, k, v, **{**kwargs, "want_key_mass": False})
        for step in mass_steps:
            sampled[f"triton (key mass of 1/{step} queries)"] = step
            backends[f"triton (key mass of 1/{step} queries)"] = functools.partial(
                triton_fn, q, k, v, **kwargs, mass_step=step)
    if baseline is not None:
        backends["baseline"] = lambda: baseline(q, k, v, **kwargs)
        backends["baseline (no key mass)"] = lambda: baseline(q, k, v, **{**kwargs, "want_key_mass": False})
    allowed = torch.arange(kv_len, device=device)[None, :] <= torch.arange(chunk, device=device)[:, None] + window
    group = num_heads // num_kv_heads
    k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    backends["sdpa (out only)"] = lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k_rep, v_rep, attn_mask=allowed, scale=scaling)
    ref = local_attention(q.float(), k.float(), v.float(), **kwargs)
    sampled_refs = {step: local_attention(q.float(), k.float(), v.float(), **kwargs, mass_step=step)
                    for step in set(sampled.values())}
    rows = []
    for backend, fn in backends.items():
        ms = _time(fn, reps, device.type == "cuda")
        row = {"shape": name, "backend": backend, "ms": ms, "tflops": flops / ms / 1e9, "dtype": str(dtype)}
        if backend != "sdpa (out only)":
            got = fn()
            want = sampled_refs[sampled[backend]] if backend in sampled else ref
            row["max_err_out"] = float((got.out - want.out).abs().max())
            if got.key_mass is not None:
                row["max_rel_err_key_mass"] = float(((got.key_mass - want.key_mass).abs()
                                                     / want.key_mass.abs().clamp(min=1e-3)).max())
        rows.append(row)
        print(f"{name:14s} {backend:16s} {ms:9.3f} ms {row['tflops']:8.2f} TFLOP/s", flush=True)
    return rows


SWEEP = {"block_m": (64, 128), "block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
SMALL_SWEEP = {"block_m": (16, 32), "block_n": (16,), "num_warps": (1,), "num_stages": (1,)}


def sweep_shape(name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, reps: int, band: int,
                grid: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """The Triton kernel of one shape over every launch setting of ``grid``: one row each, fastest first (settings
    that raise, e.g. too much shared memory, get ``ms`` None and the error), each checked against the float32
    torch reference."""
    from ltri_rag.kernels.triton_local import local_attention_triton

    q, k, v, kwargs, flops = _case(shape, device, dtype, band)
    ref = local_attention(q.float(), k.float(), v.float(), **kwargs)
    rows = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        row: dict[str, Any] = {"shape": name, **setting}
        try:
            fn = functools.partial(local_attention_triton, q, k, v, **kwargs, **setting)
            got = fn()
            row["max_err_out"] = float((got.out - ref.out).abs().max())
            row["ms"] = _time(fn, reps, device.type == "cuda")
            row["tflops"] = flops / row["ms"] / 1e9
        except Exception as error:  # noqa: BLE001 - a setting that does not compile or launch is a result
            row["ms"], row["error"] = None, f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)
        print(f"{name:14s} {setting} {row['ms'] if row['ms'] is None else round(row['ms'], 3)} ms", flush=True)
    return sorted(rows, key=lambda r: (r["ms"] is None, r["ms"] or 0.0))


MASS_SWEEP = {"block_m": (64, 128), "block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3)}
SMALL_MASS_SWEEP = {"block_m": (16, 32), "block_n": (16,), "num_warps": (1,), "num_stages": (1,)}


def mass_sweep_shape(name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, reps: int,
                     band: int, grid: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """The key-mass kernel's launch settings (``triton_local.KEY_MASS_LAUNCH``; the forward keeps its defaults)
    over ``grid``: one row each, fastest first, timing the whole call (forward and key mass) and checking the key
    mass against the float32 torch reference; a setting that fails is a row with its error. The first row,
    ``default``, is the call without an override."""
    from ltri_rag.kernels import triton_local

    q, k, v, kwargs, flops = _case(shape, device, dtype, band)
    ref = local_attention(q.float(), k.float(), v.float(), **kwargs)
    fn = functools.partial(triton_local.local_attention_triton, q, k, v, **kwargs)
    saved = triton_local.KEY_MASS_LAUNCH
    rows = []
    try:
        for values in [None, *itertools.product(*grid.values())]:
            setting = {} if values is None else dict(zip(grid, values))
            row: dict[str, Any] = {"shape": name, "setting": "default" if values is None else "override", **setting}
            triton_local.KEY_MASS_LAUNCH = None if values is None else tuple(values)
            try:
                got = fn()
                row["max_rel_err_key_mass"] = float(((got.key_mass - ref.key_mass).abs()
                                                     / ref.key_mass.abs().clamp(min=1e-3)).max())
                row["ms"] = _time(fn, reps, device.type == "cuda")
                row["tflops"] = flops / row["ms"] / 1e9
            except Exception as error:  # noqa: BLE001 - a setting that does not compile or launch is a result
                row["ms"], row["error"] = None, f"{type(error).__name__}: {str(error)[:200]}"
            rows.append(row)
            print(f"{name:14s} key mass {setting or 'default'} "
                  f"{row['ms'] if row['ms'] is None else round(row['ms'], 3)} ms", flush=True)
    finally:
        triton_local.KEY_MASS_LAUNCH = saved
    return sorted(rows, key=lambda r: (r["ms"] is None, r["ms"] or 0.0))


def render_mass_sweep(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown: the key-mass sweep rows, fastest first per shape."""
    lines = [f"# Key-mass kernel launch settings, {meta['device']} ({meta['dtype']}); ms of the whole call", "",
             "| shape | block_m | block_n | warps | stages | ms | TFLOP/s | max rel err (key mass) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        timing = (f"{r['ms']:.3f} | {r['tflops']:.1f} | {r['max_rel_err_key_mass']:.1e}" if r["ms"] is not None
                  else f"- | - | {r['error']}")
        cells = ("default", "", "", "") if r["setting"] == "default" else (
            r["block_m"], r["block_n"], r["num_warps"], r["num_stages"])
        lines.append(f"| {r['shape']} | " + " | ".join(str(c) for c in cells) + f" | {timing} |")
    return "\n".join(lines) + "\n"


def render_sweep(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown: the sweep rows, fastest first per shape."""
    lines = [f"# Local attention launch settings, {meta['device']} ({meta['dtype']})", "",
             "| shape | block_m | block_n | warps | stages | ms | TFLOP/s | max abs err (out) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        timing = (f"{r['ms']:.3f} | {r['tflops']:.1f} | {r['max_err_out']:.1e}" if r["ms"] is not None
                  else f"- | - | {r['error']}")
        lines.append(f"| {r['shape']} | {r['block_m']} | {r['block_n']} | {r['num_warps']} | {r['num_stages']} | "
                     f"{timing} |")
    return "\n".join(lines) + "\n"


def _triton_runs(device: torch.device) -> bool:
    try:
        from ltri_rag.kernels.triton_local import INTERPRETED, triton_available
    except ImportError:
        return False
    return triton_available() and (device.type == "cuda" or INTERPRETED)


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown table of every row, times relative to the torch path of the same shape."""
    torch_ms = {r["shape"]: r["ms"] for r in rows if r["backend"] == "torch"}
    lines = [f"# Local attention pass, {meta['device']} ({meta['dtype']}, torch {meta['torch']})", "",
             "| shape | backend | ms | TFLOP/s | vs torch path | max abs err (out) | max rel err (key mass) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mass = f"{r['max_rel_err_key_mass']:.1e}" if "max_rel_err_key_mass" in r else "-"
        err = f"{r['max_err_out']:.1e} | {mass}" if "max_err_out" in r else "- | -"
        lines.append(f"| {r['shape']} | {r['backend']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
                     f"{torch_ms[r['shape']] / r['ms']:.2f}x | {err} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--band", type=int, default=64)
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU check of the script)")
    parser.add_argument("--sweep", action="store_true", help="also time the Triton kernel's launch settings")
    parser.add_argument("--mass-sweep", action="store_true",
                        help="also time the key-mass kernel's launch settings (mass_sweep.json / .md)")
    parser.add_argument("--mass-step", type=int, nargs="*", default=[], metavar="N",
                        help="also time the Triton call whose key mass sums every N-th query only (mass_step)")
    parser.add_argument("--baseline", type=Path, default=None, metavar="FILE",
                        help="another copy of kernels/triton_local.py to time in the same run (rows 'baseline')")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    baseline = load_baseline(args.baseline) if args.baseline is not None and _triton_runs(device) else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, shape in (SMALL if args.small else SHAPES).items():
        rows += bench_shape(name, shape, device, dtype, args.reps, args.band, baseline, tuple(args.mass_step))
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
            "torch": torch.__version__, "reps": args.reps, "band": args.band}
    save_rows(args.out, meta, rows, render(rows, meta))
    if args.sweep and _triton_runs(device):
        sweep = []
        for name, shape in (SMALL if args.small else SHAPES).items():
            sweep += sweep_shape(name, shape, device, dtype, args.reps, args.band,
                                 SMALL_SWEEP if args.small else SWEEP)
        (args.out / "sweep.json").write_text(json.dumps({"meta": meta, "rows": sweep}, indent=2))
        (args.out / "sweep.md").write_text(render_sweep(sweep, meta), encoding="utf-8")
    if args.mass_sweep and _triton_runs(device):
        sweep = []
        for name, shape in (SMALL if args.small else SHAPES).items():
            sweep += mass_sweep_shape(name, shape, device, dtype, args.reps, args.band,
                                      SMALL_MASS_SWEEP if args.small else MASS_SWEEP)
        (args.out / "mass_sweep.json").write_text(json.dumps({"meta": meta, "rows": sweep}, indent=2))
        text = render_mass_sweep(sweep, meta)
        (args.out / "mass_sweep.md").write_text(text, encoding="utf-8")
        print(text)


if __name__ == "__main__":
    main()
