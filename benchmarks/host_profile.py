"""Where the host (Python) time of an ltri prefill goes: cProfile of one prefill per chunk size.

    python -m benchmarks.host_profile --length 16384 --chunks 2048 512 [--model llama3-8b-random] [--top 30]

For each chunk size: a warm-up prefill (compiles the kernels at the run's shapes), one timed prefill, one prefill
under cProfile; prints the wall time per layer and pass and the functions with the most internal and cumulative
time. On a GPU, calls that read a result back (``.cpu()``, ``.item()``) also carry the time the host waits for the
device. A diagnostic next to ``benchmarks.profile_engine`` (which splits device time by engine stage).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from benchmarks.e2e.models import BUILTIN_MODELS, build_random_model
from ltri_rag import LtriConfig, LtriSession


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b-random", choices=sorted(BUILTIN_MODELS))
    parser.add_argument("--length", type=int, default=16384, help="prompt tokens")
    parser.add_argument("--chunks", type=int, nargs="+", default=[2048, 512], help="chunk sizes to profile")
    parser.add_argument("--top", type=int, default=30, help="functions listed per table")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_random_model(args.model, device, dtype, 0, 1 << 21)
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (args.length,), generator=torch.Generator().manual_seed(0))
    for chunk in args.chunks:
        config = LtriConfig(mode="ltri", chunk_size=chunk)
        LtriSession(model, config).feed(ids)  # warm-up at the same shapes
        _sync(device)
        start = time.perf_counter()
        LtriSession(model, config).feed(ids)
        _sync(device)
        seconds = time.perf_counter() - start
        passes = -(-args.length // chunk)
        profiler = cProfile.Profile()
        profiler.enable()
        LtriSession(model, config).feed(ids)
        _sync(device)
        profiler.disable()
        print(f"==== chunk {chunk}: {seconds:.2f} s, {passes} passes, {1000 * seconds / passes / layers:.2f} ms "
              f"per layer and pass", flush=True)
        for key in ("tottime", "cumtime"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(args.top)
            print(out.getvalue(), flush=True)


if __name__ == "__main__":
    main()
