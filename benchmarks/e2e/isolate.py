"""``--isolate``: every mode of a run in a process of its own, the rows then merged into one result.

Modes measured one after another in one process are not independent. In session 24 the second of two modes with
identical code paths decoded 3-4 ms per token slower at 128K once the first mode had been profiled (PyTorch's
profiler leaves CUPTI attached), and still 0.6-2 ms slower without profiles or with CUPTI finalised; the 128K
prompts moved by 10-30%. A child process per mode starts each one from the same state: a fresh CUDA context,
allocator and host heap. The cost is a model load and a warm-up per mode (compiled kernels come from Triton's
on-disk cache after the first).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.e2e.rounds import DECODE_KEYS, PREFILL_KEYS, merge_rounds, rotated
from benchmarks.e2e.runs import Bench

CHILD_FOLDER = "modes"  # under --out: one folder per mode, each a complete single-mode result


def child_command(words: list[str], mode: str, out: Path, time_limit: float) -> list[str]:
    """The command line of ``mode``'s child: the parent's own arguments (``words``), then the options it overrides.

    argparse keeps the last value of a repeated option, so ``--modes``, ``--out``, ``--time-limit``, ``--isolate``
    and ``--rounds`` given again at the end win (a child runs its one mode once, in its own process)."""
    return [sys.executable, "-m", "benchmarks.bench_e2e", *words, "--modes", mode, "--out", str(out),
            "--time-limit", f"{max(time_limit, 1.0):.0f}", "--isolate", "off", "--rounds", "1"]


def run_isolated(bench: Bench, words: list[str]) -> None:
    """Run each of ``bench.args.modes`` in a child process, in order, each within an equal share of the time left,
    and gather the children's rows into ``bench`` (which the caller saves). A child that fails or is cut short still
    gives the rows it wrote; one that wrote nothing gives an ``error`` row per length naming its exit status.

    With ``--rounds N`` > 1 every mode runs N times, round ``r`` in the order :func:`rounds.rotated` gives, each child
    in ``modes/<mode>_round<r>``; the rows are then merged into one per mode and length (:func:`rounds.merge_rounds`).
    """
    args = bench.args
    rounds = max(1, getattr(args, "rounds", 1))
    runs = [(r, position, mode) for r in range(rounds) for position, mode in enumerate(rotated(args.modes, r), 1)]
    for index, (round_index, position, mode) in enumerate(runs):
        tag = (round_index, position) if rounds > 1 else None
        folder = mode if tag is None else f"{mode}_round{round_index}"
        out = args.out / CHILD_FOLDER / folder
        left = bench.remaining()
        if left <= 1.0:
            _missing(bench, mode, "time: the run's time limit was reached", tag)
            continue
        # an equal share of what is left for each run still to come (in a shared process the lengths go round the
        # modes, so a slow first mode cannot take every later mode's time either)
        command = child_command(words, mode, out, left / (len(runs) - index))
        print(f"[isolate] {folder}: {' '.join(command[1:])}", flush=True)
        began = time.perf_counter()
        child = subprocess.Popen(command)
        try:
            code = child.wait()
        except KeyboardInterrupt:  # the parent was stopped: let the child write what it measured, then stop too
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
            _gather(bench, mode, out, None, tag)
            _merge(bench, rounds)
            raise
        print(f"[isolate] {folder}: exit {code} after {time.perf_counter() - began:.0f} s", flush=True)
        _gather(bench, mode, out, code, tag)
    _merge(bench, rounds)


def _merge(bench: Bench, rounds: int) -> None:
    """With more than one round: one row per mode and length, the medians over the rounds."""
    if rounds > 1:
        bench.prefill = merge_rounds(bench.prefill, PREFILL_KEYS)
        bench.decode = merge_rounds(bench.decode, DECODE_KEYS)


def _gather(bench: Bench, mode: str, out: Path, code: int | None, tag: tuple[int, int] | None = None) -> None:
    """Add the rows of ``mode``'s child (its ``bench.json``) to ``bench``; ``tag``: (round, position in the round),
    written into the rows when the run has rounds."""
    path = out / "bench.json"
    try:
        result: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        status = "interrupted" if code is None else f"exit status {code}"
        _missing(bench, mode, f"the mode's process wrote no result ({status}: {type(err).__name__})", tag)
        return
    marks = {} if tag is None else {"round": tag[0], "position": tag[1]}
    bench.prefill += [dict(r, **marks) for r in result.get("prefill", [])]
    bench.decode += [dict(r, **marks) for r in result.get("decode", [])]
    bench.profiles += result.get("profile", [])
    known = {m.get("name") for m in bench.models}
    bench.models += [m for m in result.get("models", []) if m.get("name") not in known]  # one row per model
    child_meta = result.get("meta", {})
    for key in ("warm_up_seconds", "weights_gib", "model_errors"):
        for name, value in child_meta.get(key, {}).items():
            target = bench.meta.setdefault(key, {}).setdefault(name, {})
            if isinstance(value, dict) and isinstance(target, dict):
                target.update(value)
            else:
                bench.meta[key][name] = value
    folder = out.name
    bench.meta.setdefault("isolated", {})[folder] = {"exit_status": code, "folder": f"{CHILD_FOLDER}/{folder}",
                                                  "elapsed_seconds": child_meta.get("elapsed_seconds"),
                                                  "host_load": child_meta.get("host_load")}


def _missing(bench: Bench, mode: str, reason: str, tag: tuple[int, int] | None = None) -> None:
    """An error row per (model, length) of ``mode``, saying why it has no measurement (``tag`` as in ``_gather``)."""
    args = bench.args
    decode = set(args.decode_lengths)
    for spec in args.model:
        name = spec.partition("=")[0]
        for length in sorted(set(args.lengths) | decode):
            base = {"model": name, "mode": mode, "length": length, "status": "error", "reason": reason,
                    **({} if tag is None else {"round": tag[0], "position": tag[1]})}
            bench.prefill.append(dict(base, phase="prefill"))
            if length in decode:
                bench.decode.append(dict(base, phase="decode"))
    print(f"[isolate] {mode}: {reason}", flush=True)
