"""Passkey retrieval across context lengths: every mode side by side, with prefill time and peak GPU memory.

Example (the lent GPU)::

    python -m benchmarks.passkey --model /tmp/m/qwen.gguf --lengths 32768 65536 131072 --samples 10 \\
        --out benchmarks/results/passkey_qwen05b_h200

Writes ``samples.jsonl`` (one line per sample: mode, length, depth, prediction, answer, correct, prefill seconds,
peak GPU bytes) and ``summary.md`` under ``--out``, and prints the summary table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import ltri_rag
from benchmarks.measure import run_prompt
from benchmarks.tasks import haystack_text, passkey_correct, passkey_sample
from ltri_rag import LtriConfig

MODES = ("full", "streaming", "infllm", "ltri")


def _config(mode: str, args: argparse.Namespace) -> LtriConfig:
    return LtriConfig(mode=mode, local_window=args.window, budget=args.budget, chunk_size=args.chunk,
                      num_sink_tokens=args.sinks)


def summarise(rows: list[dict[str, Any]]) -> str:
    """Markdown table: accuracy, mean prefill seconds and max peak GPU GiB per (length, mode)."""
    lines = ["| length | mode | correct | accuracy | prefill s (mean) | peak GPU GiB (max) |",
             "|---:|---|---:|---:|---:|---:|"]
    keys = sorted({(r["length"], r["mode"]) for r in rows}, key=lambda k: (k[0], MODES.index(k[1])))
    for length, mode in keys:
        cell = [r for r in rows if r["length"] == length and r["mode"] == mode]
        n_ok = sum(r["correct"] for r in cell)
        lines.append(f"| {length} | {mode} | {n_ok}/{len(cell)} | {n_ok / len(cell):.2f} | "
                     f"{sum(r['prefill_s'] for r in cell) / len(cell):.2f} | "
                     f"{max(r['peak_gpu_bytes'] for r in cell) / 2**30:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id, model directory or .gguf file")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--samples", type=int, default=10, help="samples per length (depths spread over 5-95%%)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--sinks", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--indices", type=int, nargs="+", default=None,
                        help="run only these sample indices (0 .. samples-1), e.g. to split a grid over calls")
    parser.add_argument("--seed-offset", type=int, default=1000, help="test split: seeds differ from tuning")
    parser.add_argument("--max-seconds", type=float, default=float("inf"), help="stop cleanly after this long")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    bad = [i for i in args.indices or [] if not 0 <= i < args.samples]
    if bad:
        parser.error(f"--indices {bad} outside 0..{args.samples - 1}")

    began = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = ltri_rag.load_model(args.model, dtype=args.dtype)
    haystack = haystack_text()
    device = next(model.parameters()).device
    meta = {"model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "config": {m: _config(m, args).to_dict() for m in args.modes}, "argv": vars(args) | {"out": str(args.out)}}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    rows: list[dict[str, Any]] = []
    with open(args.out / "samples.jsonl", "a", encoding="utf-8") as sink:
        for length in args.lengths:
            for i in (args.indices if args.indices is not None else range(args.samples)):
                depth = 0.05 + 0.9 * i / max(args.samples - 1, 1)
                sample = passkey_sample(tokenizer, length, depth, seed=args.seed_offset + i, haystack=haystack)
                for mode in args.modes:
                    if time.perf_counter() - began > args.max_seconds:
                        print(f"time budget reached; stopping at length {length} sample {i}")
                        (args.out / "summary.md").write_text(summarise(rows) + "\n")
                        print(summarise(rows))
                        return
                    result = run_prompt(model, tokenizer, sample.prompt, _config(mode, args), args.max_new_tokens)
                    row = {"mode": mode, "length": length, "depth": round(depth, 3), "answer": sample.answer,
                           "correct": passkey_correct(result["prediction"], sample.answer), **result}
                    rows.append(row)
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    print(f"{length:>7} d={depth:.2f} {mode:<9} ok={row['correct']!s:<5} "
                          f"prefill={result['prefill_s']:.2f}s peak={result['peak_gpu_bytes'] / 2**30:.2f}GiB "
                          f"pred={result['prediction']!r}", flush=True)
    table = summarise(rows)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
