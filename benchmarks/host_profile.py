"""Where the host (Python) time of an ltri prefill (and decode) goes: cProfile of one prefill per chunk size.

    python -m benchmarks.host_profile --length 16384 --chunks 2048 512 [--model llama3-8b-random] [--top 30]
        [--decode-tokens 16] [--syncs] [--set decode_retrieval_stride=4 ...] [--callers repeat_interleave ...]
        [--dump DIR]

For each chunk size: a warm-up prefill (compiles the kernels at the run's shapes), one timed prefill, one prefill under
cProfile; prints the wall time per layer and pass (every model pass counted: the chunks, the short last chunk and the
look-ahead's; before session 37 only the chunk-sized ones, which overstated it: 16 of 18 at 32K) and the functions with
the most internal and cumulative time. On a GPU, calls that read a result back (``.cpu()``, ``.item()``) also carry the
time the host waits for the device. With ``--decode-tokens N``, N decode steps after each prefill are timed, then N more
are profiled.
With ``--syncs`` (CUDA), one more prefill per chunk size runs under ``torch.cuda.set_sync_debug_mode("warn")``
and the host-device synchronisations are counted by the line of this project that caused them
(:func:`benchmarks.profile_engine.count_syncs`): each one makes the host wait until the device has drained its
queue. ``--set KEY=VALUE`` overrides a field of the engine's configuration (an int, float, bool or string). A
diagnostic next to ``benchmarks.profile_engine`` (which splits device time by engine stage).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.e2e.models import BUILTIN_MODELS, build_random_model
from benchmarks.profile_engine import count_syncs
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
    parser.add_argument("--decode-tokens", type=int, default=0, help="decode steps timed, then profiled, per prefill")
    parser.add_argument("--syncs", action="store_true",
                        help="CUDA: count host-device synchronisations per source line (one more prefill per chunk)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="LtriConfig overrides")
    parser.add_argument("--dump", type=Path, default=None, metavar="DIR",
                        help="also save each profile's full statistics (pstats files prefill_<chunk>.prof, "
                             "decode_<chunk>.prof) for reading elsewhere with pstats")
    parser.add_argument("--callers", nargs="*", default=[], metavar="NAME",
                        help="also list who called the functions matching these names (pstats patterns)")
    args = parser.parse_args(argv)
    overrides = dict(_override(item) for item in args.set)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_random_model(args.model, device, dtype, 0, 1 << 21)
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (args.length,), generator=torch.Generator().manual_seed(0))
    for chunk in args.chunks:
        config = LtriConfig(**{"mode": "ltri", "chunk_size": chunk, **overrides})
        LtriSession(model, config).feed(ids)  # warm-up at the same shapes
        _sync(device)
        timed = LtriSession(model, config)
        passes = _count_passes(timed)
        start = time.perf_counter()
        timed.feed(ids)
        _sync(device)
        seconds = time.perf_counter() - start
        passes = passes[0]  # every model pass: the chunks, the short last one, the look-ahead's
        profiler = cProfile.Profile()
        profiler.enable()
        session = LtriSession(model, config)
        session.feed(ids)
        _sync(device)
        profiler.disable()
        print(f"==== chunk {chunk}: {seconds:.2f} s, {passes} passes, {1000 * seconds / passes / layers:.2f} ms "
              f"per layer and pass", flush=True)
        _print_stats(profiler, args.top, args.callers)
        _dump(profiler, args.dump, f"prefill_{chunk}.prof")
        if args.syncs:
            syncs = count_syncs(model, ids, config, args.top)
            print(f"==== chunk {chunk}: {sum(x['syncs'] for x in syncs)} host-device synchronisations in one prefill "
                  f"from the {len(syncs)} lines causing the most (at most --top lines; CUDA only)", flush=True)
            for row in syncs:
                print(f"{row['syncs']:8d}  {row['where']}", flush=True)
        if args.decode_tokens > 0:
            decode = _profile_decode(session, args.decode_tokens, layers, device, args.top)
            _dump(decode, args.dump, f"decode_{chunk}.prof")


def _count_passes(session: LtriSession) -> list[int]:
    """A one-element list that counts ``session``'s model passes from now on (its ``_forward`` calls)."""
    count = [0]
    forward = session._forward

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        count[0] += 1
        return forward(*args, **kwargs)

    session._forward = counted  # type: ignore[method-assign]
    return count


def _override(item: str) -> tuple[str, object]:
    key, sep, text = item.partition("=")
    if not sep:
        raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
    value: object = text
    if text in ("true", "false", "True", "False"):
        value = text.lower() == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
    return key, value


def _print_stats(profiler: cProfile.Profile, top: int, callers: list[str] | None = None) -> None:
    for key in ("tottime", "cumtime"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(top)
        print(out.getvalue(), flush=True)
    for name in callers or ():
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_callers(name)
        print(out.getvalue(), flush=True)


def _dump(profiler: cProfile.Profile, folder: Path | None, name: str) -> None:
    """Save ``profiler``'s full statistics as ``folder / name`` (nothing without ``--dump``)."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(folder / name)
    print(f"saved {folder / name}", flush=True)


def _profile_decode(session: LtriSession, tokens: int, layers: int, device: torch.device,
                    top: int) -> cProfile.Profile:
    """Times ``tokens`` decode steps after the prefill, then profiles ``tokens`` more; returns that profile."""
    token = torch.zeros(1, dtype=torch.int64)
    times = []
    for _ in range(tokens):
        _sync(device)
        began = time.perf_counter()
        token = session.step(token).argmax(-1).cpu()
        _sync(device)
        times.append(time.perf_counter() - began)
    times.sort()
    median = statistics.median(times)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(tokens):
        token = session.step(token).argmax(-1).cpu()
    _sync(device)
    profiler.disable()
    print(f"==== decode: {1000 * median:.1f} ms per token (median of {tokens}; min {1000 * times[0]:.1f}, max "
          f"{1000 * times[-1]:.1f}), {1000 * median / layers:.2f} ms per layer", flush=True)
    _print_stats(profiler, top)
    return profiler


if __name__ == "__main__":
    main()
