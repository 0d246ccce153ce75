"""Where a replayed decode step's device time goes: the kernels of CUDA-graph replays, by total device time.

    python -m benchmarks.profile_decode_graph --model llama3-8b-random --length 32768 --warm 24 --steps 16 \\
        --out results/profile_decode

Reads ``--length`` random tokens with the default engine (``LtriConfig()`` on CUDA: every decoded token retrieves,
retrieving and reusing steps replayed as graphs while the pool is on the GPU), decodes ``--warm`` greedy tokens
(compiles, the first steps of a span set, captures), times ``--timed`` more without any profiler, then ``--steps``
more under ``torch.profiler`` (CPU + CUDA) and ``--host-steps`` under cProfile. Prints and saves (``profile.md``,
``profile.json``): the prompt's time, the unprofiled steps' median, how many of the profiled steps were replays,
their wall time, the kernels ranked by device time (total, calls, mean), so a step's device time can be split into
the model's own kernels and the retrieval's, the host functions ranked by own time (the host's share of a step:
time not spent waiting for the device), and the span memory's size (spans, index vectors, their layout); with
``--sequence`` also ``sequence.txt``, the last profiled step's kernels in the order they ran. GPU only;
a CPU run would profile the torch path, not graphs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.e2e.models import BUILTIN_MODELS, build_random_model
from ltri_rag import LtriConfig, LtriSession


def kernel_table(prof: Any, steps: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` kernels by device time: name, total ms, calls, mean µs, ms per step."""
    rows = []
    for event in prof.key_averages():
        if "CUDA" not in str(getattr(event, "device_type", "")):  # kernels only (an operator's row repeats them)
            continue
        if getattr(event, "is_user_annotation", False) or event.key.startswith("ltri."):
            continue  # a record_function range on the device timeline: its kernels have rows of their own
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0.0)
        if device_us <= 0 or event.count == 0:
            continue
        rows.append({"name": event.key[:110], "total_ms": device_us / 1e3, "calls": event.count,
                     "mean_us": device_us / event.count, "ms_per_step": device_us / 1e3 / steps})
    rows.sort(key=lambda r: -r["total_ms"])
    return rows[:top]


def kernel_sequence(prof: Any, since_us: float) -> list[tuple[str, float]]:
    """The kernels that started on the device after ``since_us`` (the profiler's clock), in the order they ran:
    ``(name, µs)``. With ``since_us`` the host start of the last profiled step (each step ends synchronised) these
    are that step's kernels, e.g. one layer's chain of small retrieval kernels after another's."""
    rows = []
    for event in prof.events():
        if "CUDA" not in str(getattr(event, "device_type", "")) or event.name.startswith("ltri."):
            continue
        if getattr(event, "is_user_annotation", False) or event.time_range.start < since_us:
            continue
        rows.append((event.time_range.start, event.name[:110], event.time_range.elapsed_us()))
    rows.sort()
    return [(name, us) for _, name, us in rows]


def memory_stats(session: LtriSession) -> dict[str, Any]:
    """Spans and index vectors over the session's layers: counts, the padded layout's widths, the GiB the vectors
    themselves take and the GiB of the layout that holds them (the only copy kept since session 18)."""
    spans = vectors = 0
    vector_bytes = layout_bytes = 0
    widths: set[int] = set()
    for state in session.cache.global_states:
        for table in state.tables:
            spans += len(table)
            vectors += table.num_vectors
            vector_bytes += table.num_vectors * table.num_kv_heads * table.head_dim * table.dtype.itemsize
            padded, _, width, _ = table.layout()
            layout_bytes += padded.numel() * padded.element_size()
            widths.add(int(width))
    return {"spans": spans, "vectors": vectors, "vector_gib": vector_bytes / 2**30,
            "layout_gib": layout_bytes / 2**30, "widths": sorted(widths)}


def host_table(session: LtriSession, token: torch.Tensor, steps: int, top: int) -> list[dict[str, Any]]:
    """Decode ``steps`` more tokens under cProfile (each step synchronised): the ``top`` functions by own time,
    per step. A replayed step's device work shows as the synchronisation's wait; the rest is the host's."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        token = session.step(token).argmax(-1)
        torch.cuda.synchronize()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, name), (_, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(path).name}:{line}" if line else path
        rows.append({"function": f"{name} ({where})", "own_ms_per_step": own * 1e3 / steps,
                     "cum_ms_per_step": cum * 1e3 / steps, "calls_per_step": calls / steps})
    rows.sort(key=lambda r: -r["own_ms_per_step"])
    return rows[:top]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b-random", choices=sorted(BUILTIN_MODELS))
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--warm", type=int, default=24, help="decode steps before the profiled ones")
    parser.add_argument("--steps", type=int, default=16, help="profiled decode steps")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--timed", type=int, default=16, help="decode steps timed without any profiler first")
    parser.add_argument("--host-steps", type=int, default=8,
                        help="decode steps run under cProfile last (the host's share of a step); 0: none")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="LtriConfig overrides (ints)")
    parser.add_argument("--patch", nargs="*", default=[], metavar="MODULE.NAME=VALUE",
                        help="library module settings for this run, e.g. ltri_rag.retrieval.SORT_FILL=0 (ints, "
                             "floats; 0 / 1 for switches; None; text for anything else)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequence", action="store_true",
                        help="also write sequence.txt: the last profiled step's kernels in the order they ran")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (it profiles CUDA-graph replays)")
    for name in ("length", "warm", "steps", "top", "timed"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.host_steps < 0:
        parser.error(f"--host-steps must be >= 0, got {args.host_steps}")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = int(value) if value.lstrip("-").isdigit() else value
    for item in args.patch:
        target, sep, value = item.partition("=")
        module_name, _, name = target.rpartition(".")
        if not sep or not module_name:
            parser.error(f"--patch takes MODULE.NAME=VALUE, got {item!r}")
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            parser.error(f"--patch: {module_name} has no setting {name!r}")
        old = getattr(module, name)
        if value == "None":
            new = None
        elif isinstance(old, (bool, int, float)):
            new = type(old)(float(value))
        else:
            new = value
        setattr(module, name, new)
        print(f"patched {target} = {getattr(module, name)!r} (was {old!r})", flush=True)
    device = torch.device("cuda")
    model = build_random_model(args.model, device, torch.bfloat16, args.seed, args.length + args.warm + args.steps + 64)
    config = LtriConfig(mode="ltri", **overrides)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=gen).to(device)
    session = LtriSession(model, config)
    began = time.perf_counter()
    logits = session.feed(ids)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - began
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"prefill {args.length:,} tokens: {prefill_s:.1f} s (the process's first: kernel compiles included), "
          f"peak {peak:.1f} GiB", flush=True)
    token = logits.argmax(-1)
    for _ in range(args.warm):
        token = session.step(token).argmax(-1)
    torch.cuda.synchronize()
    plain_times = []
    for _ in range(args.timed):  # no profiler: what the step costs as it runs
        began = time.perf_counter()
        token = session.step(token).argmax(-1)
        torch.cuda.synchronize()
        plain_times.append((time.perf_counter() - began) * 1e3)
    print(f"{args.timed} unprofiled steps: {statistics.median(plain_times):.2f} ms median", flush=True)
    graph = session.decode_graph
    before = (graph.replays, graph.retrieving_replays) if graph is not None else (0, 0)
    times = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            began = time.perf_counter()
            if i == args.steps - 1:  # marks where the last step's kernels begin (kernel_sequence)
                with record_function("ltri.profile_last_step"):
                    token = session.step(token).argmax(-1)
            else:
                token = session.step(token).argmax(-1)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - began) * 1e3)
    replays = (graph.replays - before[0], graph.retrieving_replays - before[1]) if graph is not None else (0, 0)
    table = kernel_table(prof, args.steps, args.top)
    if args.sequence:
        last = [e for e in prof.events() if e.name == "ltri.profile_last_step" and
                "CUDA" not in str(getattr(e, "device_type", ""))]
        sequence = kernel_sequence(prof, last[-1].time_range.start if last else 0.0)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sequence.txt").write_text(
            f"# the {len(sequence)} kernels of the last profiled step, in order: µs, name\n"
            + "".join(f"{us:8.2f}  {name}\n" for name, us in sequence))
    host = host_table(session, token, args.host_steps, args.top) if args.host_steps else []
    memory = memory_stats(session)
    result = {"model": args.model, "length": args.length, "config": overrides, "steps": args.steps,
              "replays": replays[0], "retrieving_replays": replays[1], "median_ms": statistics.median(times),
              "times_ms": [round(t, 3) for t in times], "kernels": table,
              "device_ms_per_step": sum(r["ms_per_step"] for r in kernel_table(prof, args.steps, 10**6)),
              "memory": memory, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
              "prefill_s": prefill_s, "plain_median_ms": statistics.median(plain_times),
              "plain_times_ms": [round(t, 3) for t in plain_times], "host_steps": args.host_steps,
              "host_functions": host}
    lines = [f"# Decode-step kernels: {args.model}, {args.length:,} tokens, overrides {overrides or 'none'}", "",
             (f"{args.steps} profiled steps ({replays[0]} replays, {replays[1]} of them retrieving); wall per step "
              f"under the profiler {result['median_ms']:.2f} ms median; device time per step "
              f"{result['device_ms_per_step']:.2f} ms (every kernel)."), "",
             "| kernel | ms per step | calls per step | mean µs |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['name']}` | {r['ms_per_step']:.3f} | {r['calls'] / args.steps:.1f} | {r['mean_us']:.1f} |"
              for r in table]
    lines += ["", (f"Prefill {prefill_s:.1f} s (compiles included); {args.timed} decode steps without a profiler: "
                   f"{result['plain_median_ms']:.2f} ms median.")]
    if host:
        lines += ["", f"Host functions of {args.host_steps} steps under cProfile, by own time:", "",
                  "| function | own ms per step | cumulative ms per step | calls per step |", "|---|---:|---:|---:|"]
        lines += [f"| `{h['function']}` | {h['own_ms_per_step']:.3f} | {h['cum_ms_per_step']:.3f} | "
                  f"{h['calls_per_step']:.1f} |" for h in host]
    lines += ["", (f"Span memory (all layers): {memory['spans']:,} spans, {memory['vectors']:,} index vectors "
                   f"({memory['vectors'] / max(memory['spans'], 1):.2f} per span, padded width "
                   f"{memory['widths']}); the vectors {memory['vector_gib']:.2f} GiB, the per-span layout that "
                   f"holds them {memory['layout_gib']:.2f} GiB; peak GPU memory {result['peak_gib']:.1f} GiB.")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(result, indent=1))
    (args.out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
