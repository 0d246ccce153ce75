"""How often a decode step retrieves what earlier steps retrieved, on real text, and the hit rate the device cache of
host-tier rows (``LtriConfig.host_cache_tokens``) would get on those selections. Runs anywhere (CPU included).

    python -m benchmarks.host_cache_reuse --model qwen2.5-coder-0.5b.gguf --length 16384 --steps 32 \\
        --out benchmarks/results/e2e_llama8b_h200/session20/reuse_cpu_qwen.json

A prompt of ``--length`` tokens of essay text (``$LTRI_DATA_DIR``, :func:`benchmarks.tasks.haystack_text`) is read
with the default engine, then ``--steps`` greedy tokens are decoded; every global layer's retrieved
``(slot, KV head)`` rows are recorded at each step. Reported: the share of a step's rows that the step before
retrieved too, and for each ``--cache-tokens`` the hit rate of the cache's rule (a direct-mapped line per row,
``row % (tokens * Hkv)``; a row found in its line is a hit; a missed row takes the line over unless another row of the
same step took it first), emulated in the order the kernel's interpreter visits rows, counting every retrieved row as
a host row (the case of a pool whose device tier is full) over the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.tasks import haystack_text
from ltri_rag import LtriConfig, LtriSession
from ltri_rag.layer import GlobalLayerState
from ltri_rag.loading import load_model


def retrieved_rows(states: list[GlobalLayerState]) -> list[list[int]]:
    """Per global layer, the rows (``slot * Hkv + head``) its last retrieval read."""
    out = []
    for state in states:
        heads = state.sink_k.shape[1]
        out.append([int(slot) * heads + head for slots in state._last_slots
                    for head, row in enumerate(slots) for slot in row[row >= 0].tolist()])
    return out


def emulate(record: list[list[list[int]]], lines: int) -> float:
    """Hit rate of a direct-mapped cache of ``lines`` rows per layer over steps ``1 ..`` of ``record``
    (``record[step][layer]``: rows in the order they are visited)."""
    hits = total = 0
    tags: list[dict[int, tuple[int, int]]] = [{} for _ in record[0]]
    for step, layers in enumerate(record):
        for layer, rows in enumerate(layers):
            table = tags[layer]
            for row in rows:
                line = row % lines
                held_row, used = table.get(line, (-1, -1))
                held = held_row == row
                if held or used != step:  # found, or a line no row of this step took yet
                    table[line] = (row, step)
                if step > 0:
                    total += 1
                    hits += held
    return hits / max(total, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id, model directory or .gguf file")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--cache-tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--out", type=Path, default=None, help="write the numbers here as JSON")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2, got {args.steps}")
    model, tokenizer = load_model(args.model)
    ids = tokenizer(haystack_text(), add_special_tokens=False, return_tensors="pt").input_ids[:, :args.length]
    session = LtriSession(model, LtriConfig())
    start = time.perf_counter()
    logits = session.feed(ids.to(session.device))
    print(f"prompt of {ids.shape[1]} tokens read in {time.perf_counter() - start:.1f} s", flush=True)
    states = [s for s in session.cache.states if isinstance(s, GlobalLayerState)]
    heads = states[0].sink_k.shape[1]
    record = []
    for _ in range(args.steps):
        logits = session.step(logits[0].argmax().view(1))
        record.append(retrieved_rows(states))
    same = total = 0
    for before, now in zip(record, record[1:]):
        for a, b in zip(before, now):
            same += len(set(a) & set(b))
            total += len(b)
    result = {"model": args.model, "length": int(ids.shape[1]), "steps": args.steps,
              "rows_per_step": sum(len(r) for r in record[-1]), "retrieved_by_the_step_before": same / max(total, 1),
              "emulated_hit_rate": {str(n): emulate(record, n * heads) for n in args.cache_tokens}}
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
