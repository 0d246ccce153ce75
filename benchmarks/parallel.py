"""Run one grid command as N worker processes sharing the GPUs (small models leave a GPU mostly idle).

Each worker is the same ``benchmarks.evaluate`` (or ``benchmarks.tune``) command with ``--shard I/N`` added; the
workers append to the same ``samples.jsonl`` (one atomic write per row), so the grid stays resumable. Worker ``I``
sees GPU ``I % len(gpus)`` only, gets ``--threads`` CPU threads, and logs to ``OUT/logs/worker-I.log``.

Example (the lent GPU: 10 workers over 2 GPUs)::

    python -m benchmarks.parallel --workers 10 --gpus 0,1 benchmarks.evaluate \\
        --model qwen=/tmp/m/qwen.gguf --tasks niah_single vt --lengths 4096 131072 --samples 20 \\
        --out results/q --max-seconds 1500

Exit status: 0 when every worker exited 0, else the first non-zero status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def worker_commands(module: str, rest: list[str], workers: int) -> list[list[str]]:
    """The command line of each worker: ``python -m MODULE REST... --shard I/N``."""
    if "--shard" in rest:
        raise ValueError("the command must not set --shard: parallel.py assigns the shards")
    return [[sys.executable, "-m", module, *rest, "--shard", f"{i}/{workers}"] for i in range(workers)]


def out_dir(rest: list[str]) -> Path:
    """The ``--out`` folder of the worker command (where the logs go too)."""
    for i, arg in enumerate(rest):
        if arg == "--out" and i + 1 < len(rest):
            return Path(rest[i + 1])
        if arg.startswith("--out="):
            return Path(arg.split("=", 1)[1])
    raise ValueError("the command needs --out")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, required=True, help="number of worker processes")
    parser.add_argument("--gpus", default=None, type=lambda text: [g for g in text.split(",") if g],
                        help="comma-separated CUDA device ids to spread the workers over, e.g. 0,1 "
                             "(default: leave CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker (OMP/MKL/tokenizers)")
    parser.add_argument("module", help="the grid module, e.g. benchmarks.evaluate")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    try:
        commands = worker_commands(args.module, rest, args.workers)
        logs = out_dir(rest) / "logs"
    except ValueError as err:
        parser.error(str(err))
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, command in enumerate(commands):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   RAYON_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if args.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(args.gpus[i % len(args.gpus)])
        log = open(logs / f"worker-{i}.log", "a", encoding="utf-8")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    began = time.perf_counter()
    status = 0
    for i, (proc, log) in enumerate(procs):
        code = proc.wait()
        log.close()
        print(f"worker {i}/{args.workers} exited {code} after {time.perf_counter() - began:.0f} s", flush=True)
        status = status or code
    return status


if __name__ == "__main__":
    sys.exit(main())
