"""What a prompt's span-table appends cost: rows appended in place with spare capacity against a concatenation per
append, side by side.

    python -m benchmarks.bench_span_table --out benchmarks/results/span_table_cpu

One layer's :class:`~ltri_rag.span_memory.SpanTable` receives the spans of a long prompt chunk by chunk, as the
engine appends them: by default 512 chunks of 32 spans with 8 index vectors each, Llama-3-8B's 8 KV heads x 128
dimensions in bf16 (a 1M-token prompt's ~16K spans per layer, a 268 MB layout at the end). ``growing.GROWTH``
(``ltri_rag/growing.py``, the default) is timed against ``None`` (exact sizes: every append copies all rows kept, as
``torch.cat`` did before session 30). Times are the whole prompt's appends (index vectors, validity, starts, ends
and owners), one repeat each, alternating the forms; on CUDA the layout lives on the GPU (synchronised before each
clock read), elsewhere in host memory.

Prints a Markdown table and writes ``bench.json`` and ``bench.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.output import save_rows
from ltri_rag import growing
from ltri_rag.span_memory import SpanTable


def fill(device: torch.device, appends: int, spans: int, vectors: int, heads: int, dim: int,
         dtype: torch.dtype) -> float:
    """Seconds to append ``appends`` chunks of ``spans`` spans (``vectors`` each) to a fresh table."""
    gen = torch.Generator().manual_seed(0)
    chunk_vectors = torch.randn(spans * vectors, heads, dim, generator=gen).to(device, dtype)
    owner = torch.arange(spans).repeat_interleave(vectors)
    lengths = torch.full((spans,), 64, dtype=torch.int64)
    table = SpanTable(heads, dim, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    for chunk in range(appends):
        starts = chunk * spans * 64 + torch.cumsum(lengths, 0) - lengths
        table.append(starts, starts + lengths, chunk_vectors, owner)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    assert len(table) == appends * spans and table.layout().padded.shape[0] == appends * spans * vectors
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--appends", type=int, default=512, help="chunks appended (default: a 1M-token prompt)")
    parser.add_argument("--spans", type=int, default=32, help="spans per chunk")
    parser.add_argument("--vectors", type=int, default=8, help="index vectors per span")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    for name in ("appends", "spans", "vectors", "heads", "dim", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    default = growing.GROWTH
    forms = {f"in place, growth {default}": default, "concatenated (growth None)": None}
    times: dict[str, list[float]] = {form: [] for form in forms}
    try:
        for _ in range(args.repeats):
            for form, growth in forms.items():
                growing.GROWTH = growth
                times[form].append(fill(device, args.appends, args.spans, args.vectors, args.heads, args.dim,
                                        torch.bfloat16))
                print(f"{form:32s} {times[form][-1]:8.3f} s", flush=True)
    finally:
        growing.GROWTH = default
    layout_mb = args.appends * args.spans * args.vectors * args.heads * args.dim * 2 / 1e6
    rows: list[dict[str, Any]] = [{"form": form, "seconds": min(t), "all_seconds": t,
                                   "ms_per_append": 1e3 * min(t) / args.appends} for form, t in times.items()]
    meta = {**{k: v for k, v in vars(args).items() if k not in ("out", "device")},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "layout_mb_at_end": layout_mb,
            "command": " ".join(["python -m benchmarks.bench_span_table",
                                 *(argv if argv is not None else sys.argv[1:])])}
    lines = [f"# Span-table appends, {meta['device']} (torch {meta['torch']})", "",
             f"{args.appends} appends of {args.spans} spans x {args.vectors} index vectors, {args.heads} KV heads x "
             f"{args.dim}, bf16; the layout holds {layout_mb:.0f} MB at the end. Best of {args.repeats}.", "",
             "| form | seconds | ms per append | all repeats, s |", "|---|---:|---:|---|"]
    lines += [f"| {r['form']} | {r['seconds']:.3f} | {r['ms_per_append']:.2f} | "
              f"{', '.join(f'{t:.3f}' for t in r['all_seconds'])} |" for r in rows]
    save_rows(args.out, meta, rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
