"""Where an engine prefill spends its time: torch.profiler over one prompt, split by the engine's own stages.

    python -m benchmarks.profile_engine --model qwen=qwen.gguf --length 8192 --modes ltri infllm streaming \\
        [--backends torch triton] --out results/profile

For each mode (and attention backend): one warm-up prefill of the same prompt, one timed prefill of a
``niah_single`` prompt of ``--length`` tokens without the profiler, then one profiled prefill of it. Prints and
saves (``profile.json``, ``profile.md``):

* the engine stages (``record_function`` labels in :mod:`ltri_rag.layer`: ``ltri.retrieve`` with its
  ``score_select`` and ``gather`` parts, ``ltri.attend_memory``, ``ltri.attend_local``, ``ltri.attend_decode``
  (the fused decode kernel), ``ltri.absorb``, ``ltri.evict_segment_store`` with ``ltri.segment_triangle``): wall
  (CPU) time and device time, summed over layers and chunks;
* the top operators by device time (CUDA) or CPU time.

The profiled run is slower than an unprofiled one; the split, not the total, is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import ltri_rag
from benchmarks.evaluate import format_prompt
from benchmarks.long_tasks import make_sample
from ltri_rag import LtriConfig, LtriSession

STAGES = ("ltri.retrieve", "ltri.retrieve.score_select", "ltri.retrieve.gather", "ltri.attend_memory",
          "ltri.attend_local", "ltri.attend_decode", "ltri.absorb", "ltri.evict_segment_store", "ltri.segment_triangle")


def _first(event: Any, *names: str) -> float:
    """The first of ``names`` the profiler event has (device-time fields were renamed across torch versions)."""
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _device_time(event: Any) -> float:
    """Device (CUDA) microseconds of a profiler event, children included."""
    return _first(event, "device_time_total", "cuda_time_total")


def _self_device_time(event: Any) -> float:
    """Device (CUDA) microseconds of the event itself."""
    return _first(event, "self_device_time_total", "self_cuda_time_total")


def profile_prefill(model: Any, ids: torch.Tensor, config: LtriConfig, top: int) -> dict[str, Any]:
    """Profile one prefill of ``ids`` ``[seq]``: total seconds, per-stage and top-operator times (ms)."""
    cuda = next(model.parameters()).device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        LtriSession(model, config).feed(ids)
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - began
    # host-side rows only: on CUDA a record_function range also has a device-timeline row of the same key (its
    # span, idle gaps included, and no CPU time), and each kernel a row of its own beside the operator that
    # launched it; a host row carries its kernels' device time (children included for a stage)
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    stages = {e.key: {"calls": e.count, "cpu_ms": e.cpu_time_total / 1e3, "device_ms": _device_time(e) / 1e3}
              for e in events if e.key in STAGES}
    key = _self_device_time if cuda else (lambda e: float(e.self_cpu_time_total))
    ops = sorted((e for e in events if not e.key.startswith("ltri.")), key=key, reverse=True)[:top]
    return {"seconds": total, "stages": stages,
            "top_ops": [{"op": e.key, "calls": e.count, "self_ms": key(e) / 1e3} for e in ops]}


def timed_prefill(model: Any, ids: torch.Tensor, config: LtriConfig) -> float:
    """Seconds of one prefill of ``ids`` without the profiler (the speed; the profile gives the split)."""
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    LtriSession(model, config).feed(ids)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - began


def count_syncs(model: Any, ids: torch.Tensor, config: LtriConfig, top: int) -> list[dict[str, Any]]:
    """One more prefill under ``torch.cuda.set_sync_debug_mode("warn")``: every host-device synchronisation the
    engine triggers, counted by the line of this project that caused it and that line's caller (or the first
    Python line), most first.

    Each one stalls the host until the device has drained its queue, so a count of thousands per prefill means the
    host and the device take turns instead of overlapping. CUDA only (empty on CPU)."""
    if next(model.parameters()).device.type != "cuda":
        return []
    import traceback
    import warnings
    counts: dict[str, int] = {}
    shown = warnings.showwarning

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if "ltri_rag" in f.filename or "kernels" in f.filename]
        # the innermost two lines of this project: the one that synchronised and its caller
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} ({f.name})" for f in frames[::-1][:2]) \
            if frames else f"{Path(filename).name}:{lineno}"
        counts[where] = counts.get(where, 0) + 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            LtriSession(model, config).feed(ids)
            torch.cuda.synchronize()
    finally:
        warnings.showwarning = shown
        torch.cuda.set_sync_debug_mode(0)
    return [{"where": k, "syncs": v} for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]


def render(results: dict[str, dict[str, Any]], length: int) -> str:
    """Markdown: the stage split and the top operators of every mode."""
    lines = [f"# Engine prefill profile at {length} tokens", ""]
    for mode, res in results.items():
        lines += [f"## {mode}: {res['plain_seconds']:.2f} s ({res['seconds']:.2f} s profiled)", "",
                  "| stage | calls | CPU ms | device ms |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {name} | {s['calls']} | {s['cpu_ms']:.0f} | {s['device_ms']:.0f} |"
                  for name, s in sorted(res["stages"].items())]
        lines += ["", "| operator | calls | self ms |", "|---|---:|---:|"]
        lines += [f"| {o['op']} | {o['calls']} | {o['self_ms']:.1f} |" for o in res["top_ops"]]
        if res.get("syncs"):
            lines += ["", f"Host-device synchronisations: {sum(x['syncs'] for x in res['syncs'])} "
                      "(the lines causing the most):", "", "| where | syncs |", "|---|---:|"]
            lines += [f"| `{x['where']}` | {x['syncs']} |" for x in res["syncs"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="NAME=PATH")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--modes", nargs="+", default=["ltri"], choices=("full", "streaming", "infllm", "ltri"))
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--sinks", type=int, default=128)
    parser.add_argument("--backends", nargs="+", default=["torch"], choices=("torch", "triton", "auto"),
                        help="attention backends to run side by side (LtriConfig.attention_backend)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--offload", choices=("on", "off", "both"), default="on",
                        help="kv_offload: the span pool in pinned host memory (on, the default), on the device (off)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before the runs")
    parser.add_argument("--syncs", action="store_true",
                        help="CUDA: also count host-device synchronisations per source line (one more prefill)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.length < 1024:
        parser.error(f"--length must be >= 1024, got {args.length}")
    _, _, path = args.model.partition("=")
    model, tokenizer = ltri_rag.load_model(path, dtype=args.dtype, device=args.device)
    sample = make_sample("niah_single", tokenizer, args.length, 0.5, 0)
    prompt = format_prompt(tokenizer, sample, sample.context, "auto")
    ids = prompt if isinstance(prompt, torch.Tensor) else ltri_rag.encode_prompt(tokenizer, prompt)
    results = {}
    offloads = {"on": [True], "off": [False], "both": [True, False]}[args.offload]
    meta = {"model": Path(path).name, "length": args.length, "tokens": int(ids.numel()),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()), "config": vars(args) | {"out": str(args.out)}}
    args.out.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        for backend in args.backends if mode != "full" else ["torch"]:
            for offload in offloads if mode in ("ltri", "infllm") else [True]:
                name = mode if len(args.backends) == 1 else f"{mode} ({backend})"
                name += "" if len(offloads) == 1 or mode not in ("ltri", "infllm") else \
                    (" pool on host" if offload else " pool on device")
                config = LtriConfig(mode=mode, local_window=args.window, budget=args.budget, chunk_size=args.chunk,
                                    num_sink_tokens=args.sinks, attention_backend=backend, kv_offload=offload)
                LtriSession(model, config).feed(ids)  # warm-up at the timed shapes (every kernel variant compiled)
                plain = timed_prefill(model, ids, config)
                results[name] = {"plain_seconds": plain, **profile_prefill(model, ids, config, args.top)}
                if args.syncs:
                    results[name]["syncs"] = count_syncs(model, ids, config, args.top)
                print(f"{name}: {plain:.2f} s unprofiled, {results[name]['seconds']:.2f} s profiled, "
                      f"{sum(x['syncs'] for x in results[name].get('syncs', []))} syncs counted", flush=True)
                # saved after every configuration, so a run stopped by a time limit keeps what it measured
                (args.out / "profile.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2,
                                                                  default=str))
                text = render(results, args.length)
                (args.out / "profile.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
