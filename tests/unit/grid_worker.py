"""A grid worker for ``test_parallel_runs_workers_into_one_grid``: ``benchmarks.evaluate``'s grid on the tiny model.

Run as ``python -m tests.unit.grid_worker --out DIR --shard I/N``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.evaluate import SYSTEMS, parse_shard, run_grid
from tests.unit.tiny_models import tiny_model
from tests.unit.tiny_tokenizer import tiny_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard", type=parse_shard, required=True)
    cli = parser.parse_args()
    args = argparse.Namespace(tasks=["niah_single", "vt"], lengths=[1200], samples=2, split="dev", window=64,
                              budget=64, chunk=128, sinks=8, dtype="float32", device="cpu", prompt_format="raw",
                              max_seconds=float("inf"), out=cli.out, shard=cli.shard, order="sample",
                              systems=[SYSTEMS["full"], SYSTEMS["ltri"]])
    loaded = tiny_model("llama"), tiny_tokenizer()
    run_grid([("tiny", "tiny")], args, loader=lambda p: loaded)


if __name__ == "__main__":
    main()
