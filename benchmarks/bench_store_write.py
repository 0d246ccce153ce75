"""What the store's writes cost per ingested token (no model): synthetic documents in a model's K/V shape.

    python -m benchmarks.bench_store_write [--tokens 200000] [--doc-tokens 4000] [--layers 24 --kv-heads 2
        --head-dim 64] [--batch-docs 1] [--url sqlite-or-postgresql-url] [--profile]

Each document carries, per layer, bf16 K/V for its tokens, spans of 8-64 tokens and 4-8 float32 index vectors per
span (the engine's defaults; Qwen2.5-0.5B's K/V shape by default). Times ``SqlSpanStore.add`` (K/V file written
and fsynced, SQL rows, FAISS adds) on ``--batch-docs`` documents per call (``KVMemory.add_documents`` hands the
store batches of about ``batch_bytes``, 256 MB by default: six 4,000-token documents of this shape; a batch's files
are written in parallel), then the final close (the FAISS files), and prints tokens/s, MB/s of K/V and bytes on disk
per token; then times a writer's reopen of the closed store. ``--profile`` adds the functions with the most
cumulative time. A host-side benchmark: the numbers depend on this machine's disk and CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ltri_rag.storage import SqlSpanStore

from ltri_rag.store import DocumentRecord, Fingerprint, LayerRecord


def synthetic_document(doc_id: str, num_tokens: int, layers: int, kv_heads: int, head_dim: int,
                       rng: np.random.Generator) -> DocumentRecord:
    """A document of ``num_tokens`` characters-as-tokens with random K/V, spans and index vectors."""
    records = []
    for layer in range(layers):
        bounds = [0]
        while bounds[-1] < num_tokens:
            bounds.append(min(num_tokens, bounds[-1] + int(rng.integers(8, 65))))
        starts = torch.tensor(bounds[:-1], dtype=torch.int64)
        ends = torch.tensor(bounds[1:], dtype=torch.int64)
        counts = torch.from_numpy(rng.integers(4, 9, size=len(starts)))
        owner = torch.repeat_interleave(torch.arange(len(starts)), counts)
        records.append(LayerRecord(
            layer=layer,
            keys=torch.randn(num_tokens, kv_heads, head_dim).to(torch.bfloat16),
            values=torch.randn(num_tokens, kv_heads, head_dim).to(torch.bfloat16),
            token_starts=starts, token_ends=ends, char_starts=starts.clone(), char_ends=ends.clone(),
            vectors=torch.randn(len(owner), kv_heads, head_dim), owner=owner))
    return DocumentRecord(doc_id=doc_id, text="x" * num_tokens, num_tokens=num_tokens, layers=tuple(records))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--doc-tokens", type=int, default=4_000)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch-docs", type=int, default=1, help="documents per add() call")
    parser.add_argument("--url", default=None, help="a SQLAlchemy URL for the tables (default: SQLite in the folder)")
    parser.add_argument("--dir", type=Path, default=None, help="where the store goes (default: a temp folder)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    for name in ("tokens", "doc_tokens", "layers", "kv_heads", "head_dim", "batch_docs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    sizes = [args.doc_tokens] * (args.tokens // args.doc_tokens) + ([args.tokens % args.doc_tokens] if
                                                                   args.tokens % args.doc_tokens else [])
    docs = [synthetic_document(f"doc{i}", n, args.layers, args.kv_heads, args.head_dim, rng)
            for i, n in enumerate(sizes)]
    folder = args.dir or Path(tempfile.mkdtemp(prefix="ltri-store-bench-"))
    shutil.rmtree(folder, ignore_errors=True)
    fingerprint = Fingerprint(num_layers=args.layers, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                              dtype="bfloat16")
    profiler = cProfile.Profile() if args.profile else None
    store = SqlSpanStore.create(args.url or folder, fingerprint, data_dir=folder if args.url else None)
    began = time.perf_counter()
    if profiler:
        profiler.enable()
    for i in range(0, len(docs), args.batch_docs):
        store.add(docs[i:i + args.batch_docs])
    added = time.perf_counter() - began
    store.close()
    if profiler:
        profiler.disable()
    total = time.perf_counter() - began
    reopened = time.perf_counter()
    SqlSpanStore.open(args.url or folder, fingerprint, data_dir=folder if args.url else None).close()
    open_s = time.perf_counter() - reopened
    kv_bytes = 2 * args.tokens * args.layers * args.kv_heads * args.head_dim * 2
    disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{args.tokens:,} tokens in {len(docs)} documents, {args.batch_docs} per add ({args.layers} layers x {args.kv_heads} KV heads x "
          f"{args.head_dim}, bf16): add {added:.2f} s, close {total - added:.2f} s -> {args.tokens / total:,.0f} "
          f"tokens/s, {kv_bytes / total / 1e6:,.0f} MB/s of K/V; {disk / args.tokens:,.0f} bytes on disk per token; "
          f"reopen {open_s:.2f} s")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumtime").print_stats(25)
        print(out.getvalue())
    if args.dir is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
