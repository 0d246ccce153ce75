"""Time of the store fingerprint's weights hash: version 2 (every value) against version 1 (256 samples per parameter).

    python -m benchmarks.bench_fingerprint --model MODELS/qwen2.5-coder-0.5b.gguf \
        --out benchmarks/results/fingerprint_cpu_qwen
    python -m benchmarks.bench_fingerprint --random-params 100000000 --device cuda --out OUT

A :class:`~ltri_rag.memory.KVMemory` computes the hash when it creates or opens a store (once per model object: the
result is cached until a parameter changes). This times the uncached computation
(:func:`ltri_rag.memory_fingerprint._weights_digest`) of both versions on one model, median of ``--reps`` calls after
a warm-up, and checks that the cached call returns the same hash. The model is a GGUF / Hugging Face checkpoint
(``--model``, loaded by :func:`ltri_rag.load_model`) or a stack of random float32 matrices of ``--random-params``
values in all. Prints a table, writes ``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.measure import median_seconds
from benchmarks.output import save_rows
from ltri_rag.memory_fingerprint import _weights_digest, weights_sha256


def random_model(num_params: int, width: int = 4096, seed: int = 0) -> nn.Module:
    """Random float32 ``[rows, width]`` matrices (at most 2**24 values each) holding ``num_params`` values in all."""
    if num_params < 1:
        raise ValueError(f"num_params must be >= 1, got {num_params}")
    gen = torch.Generator().manual_seed(seed)
    model, left = nn.Module(), num_params
    while left:
        size = min(left, 1 << 24)
        rows = max(1, size // width)
        cols = size // rows if size >= width else size
        tensor = torch.randn(rows * cols, generator=gen).view(rows, cols)
        model.register_parameter(f"w{len(list(model.parameters()))}", nn.Parameter(tensor, requires_grad=False))
        left -= rows * cols
    return model


def run(model: nn.Module, reps: int) -> list[dict[str, Any]]:
    """One row per version: median seconds of the uncached hash, and whether the cached call agrees."""
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    rows = []
    for version in (1, 2):
        def once(v: int = version) -> str:
            digest = _weights_digest(model, v)
            sync()
            return digest
        seconds = median_seconds(once, reps)
        rows.append({"version": version, "seconds": seconds, "cached_agrees": weights_sha256(model, version) == once()})
        print(f"version {version}: {seconds:.4f} s", flush=True)
    return rows


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Weights hash of the store fingerprint ({meta['model']}, {meta['params'] / 1e6:.1f}M parameters, "
             f"{meta['dtype']} on {meta['device']}; {meta['cpu_count']} CPUs, torch {meta['torch']})", "",
             "| version | what it hashes | median s | s per billion parameters | cached call agrees |",
             "|---:|---|---:|---:|---|"]
    what = {1: "256 values per parameter", 2: "every value (block sums)"}
    lines += [f"| {r['version']} | {what[r['version']]} | {r['seconds']:.4f} | "
              f"{r['seconds'] / meta['params'] * 1e9:.3f} | {r['cached_agrees']} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a GGUF file or Hugging Face checkpoint")
    source.add_argument("--random-params", type=int, help="random float32 matrices of this many values in all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.random_params is not None and args.random_params < 1:
        parser.error(f"--random-params must be >= 1, got {args.random_params}")
    if args.model:
        from ltri_rag import load_model
        model, _ = load_model(args.model, device=args.device)
        name = Path(args.model).name
    else:
        model, name = random_model(args.random_params).to(args.device), "random"
    first = next(model.parameters())
    meta = {"model": name, "params": sum(p.numel() for p in model.parameters()), "dtype": str(first.dtype),
            "device": str(first.device), "reps": args.reps, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    rows = run(model, args.reps)
    save_rows(args.out, meta, rows, render(rows, meta))


if __name__ == "__main__":
    main()
