"""The command line: parsing and checking the options, the engine sizes they set, and ``main``, which runs every
``--model`` within the time limit and writes what was measured, also when interrupted."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks import e2e
from benchmarks.e2e.device import GIB, free_memory, host_total_gib
from benchmarks.e2e.isolate import run_isolated
from benchmarks.e2e.models import BUILTIN_MODELS, check_model_spec, load_model_info
from benchmarks.e2e.modes import MODES, engine_config
from benchmarks.e2e.runs import Bench
from ltri_rag import LtriConfig
from ltri_rag.loading import resolve_device, resolve_dtype

# Engine sizes of --small (tiny, so that 256-512 tokens evict, segment and retrieve).
SMALL_ENGINE = {"local_window": 64, "chunk_size": 32, "budget": 64, "num_sink_tokens": 4}


def _versions() -> dict[str, str | None]:
    import transformers

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line (bad values are named in the error)."""
    parser = argparse.ArgumentParser(description=e2e.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", metavar="NAME|NAME=PATH",
                        help=f"built-in random model ({', '.join(BUILTIN_MODELS)}) or NAME=PATH of a real one; "
                             "repeat for several (default llama3-8b-random; --small: tiny-llama-random)")
    parser.add_argument("--lengths", type=int, nargs="+", help="prefill lengths (default 32K 128K 512K 1M)")
    parser.add_argument("--decode-lengths", type=int, nargs="*",
                        help="contexts to decode at (default 8K 32K 128K 512K 1M); each is also a prefill row")
    parser.add_argument("--decode-tokens", type=int, help="timed decode steps per context (default 32)")
    parser.add_argument("--prefill-repeats", type=int, default=1,
                        help="prompts read per (mode, length), each by a fresh session; the row keeps the median "
                             "and every time (prompt times are host-bound and move between reads)")
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help="modes, run in this order at each length (default ltri full streaming infllm)")
    parser.add_argument("--backend", default="auto", choices=("torch", "triton", "auto"),
                        help="LtriConfig.attention_backend of the engine modes")
    parser.add_argument("--sdpa-backend", default="auto", choices=("auto", "flash", "cudnn", "efficient"),
                        help="SDPA kernel of the full mode (auto: torch's choice; others: that one first)")
    parser.add_argument("--window", type=int, help="LtriConfig.local_window (default: LtriConfig's)")
    parser.add_argument("--budget", type=int, help="LtriConfig.budget")
    parser.add_argument("--chunk", type=int, help="LtriConfig.chunk_size")
    parser.add_argument("--sinks", type=int, help="LtriConfig.num_sink_tokens")
    parser.add_argument("--time-limit", type=float, default=540.0,
                        help="seconds for the whole run; lengths predicted not to fit are skipped (default 540)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every mode this many times, each in a process of its own, the order rotated "
                             "each round; the tables hold the medians, the report every round (needs isolation)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled decode step / prefill chunk")
    parser.add_argument("--isolate", choices=("auto", "on", "off"), default="auto",
                        help="run each mode in a process of its own, then merge the rows (benchmarks.e2e.isolate); "
                             "auto (default): on CUDA when there are several modes")
    parser.add_argument("--hbm-tbps", type=float, default=4.3, help="HBM bandwidth of the decode floor (TB/s)")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matmul peak of the prefill floor")
    parser.add_argument("--host-mem-gib", type=float, default=None,
                        help="host memory for the pinned span pool (default: the machine's total; 0: no check)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    parser.add_argument("--device", default=None, help="auto / cuda / cpu (default auto; --small: cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny random Llama on CPU: a check of the script")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    small = args.small
    defaults = {"model": ["tiny-llama-random"] if small else ["llama3-8b-random"],
                "lengths": [256, 512] if small else [32768, 131072, 524288, 1048576],
                "decode_lengths": [256, 512] if small else [8192, 32768, 131072, 524288, 1048576],
                "decode_tokens": 4 if small else 32,
                "modes": ["full", "ltri", "streaming"] if small else ["ltri", "full", "streaming", "infllm"],
                "device": "cpu" if small else "auto"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for spec in args.model:
        problem = check_model_spec(spec)
        if problem:
            parser.error(problem)
    names = [spec.partition("=")[0] for spec in args.model]
    if len(set(names)) != len(names):
        parser.error(f"--model names must differ, got {names}")
    for key in ("lengths", "decode_lengths"):
        bad = [n for n in getattr(args, key) if n < 1]
        if bad:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {bad}")
    if not args.lengths and not args.decode_lengths:
        parser.error("nothing to run: --lengths and --decode-lengths are both empty")
    if args.decode_tokens < 1:
        parser.error(f"--decode-tokens must be >= 1, got {args.decode_tokens}")
    if args.prefill_repeats < 1:
        parser.error(f"--prefill-repeats must be >= 1, got {args.prefill_repeats}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.rounds > 1 and args.isolate == "off":
        parser.error(f"--rounds {args.rounds} runs each mode in processes of its own: it needs --isolate on or auto")
    if len(set(args.modes)) != len(args.modes):
        parser.error(f"--modes lists a mode twice: {args.modes}")
    for key in ("time_limit", "hbm_tbps", "peak_tflops"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    if args.host_mem_gib is None:
        args.host_mem_gib = host_total_gib()
    return args


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """LtriConfig fields set by the command line (``--small``: tiny sizes unless given)."""
    engine: dict[str, Any] = dict(SMALL_ENGINE) if args.small else {}
    for flag, key in (("window", "local_window"), ("budget", "budget"), ("chunk", "chunk_size"),
                      ("sinks", "num_sink_tokens")):
        if getattr(args, flag) is not None:
            engine[key] = getattr(args, flag)
    return engine


def run_meta(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, engine: dict[str, Any],
             words: list[str]) -> dict[str, Any]:
    """The run's metadata: device, versions, host, the command (``words``: its arguments), the settings."""
    shown = LtriConfig(**engine)
    meta: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype":
            str(dtype).removeprefix("torch."), **_versions(), "host": platform.node(), "cpus": os.cpu_count(),
            "host_mem_gib": args.host_mem_gib, "command": shlex.join(["python", "-m", "benchmarks.bench_e2e",
                                                                        *words]),
            "modes": args.modes, "lengths": args.lengths, "decode_lengths": args.decode_lengths,
            "decode_tokens": args.decode_tokens, "prefill_repeats": args.prefill_repeats, "rounds": args.rounds,
            "backend": args.backend, "sdpa_backend": args.sdpa_backend,
            "engine": {k: getattr(shown, k) for k in ("num_sink_tokens", "local_window", "chunk_size",
                                                      "final_chunk_size", "budget", "kv_offload", "page_size")},
            "time_limit": args.time_limit, "hbm_tbps": args.hbm_tbps, "peak_tflops": args.peak_tflops,
            "seed": args.seed, "profile": not args.no_profile,
            "full_baseline": "engine mode full = HF forward, SDPA, DynamicCache (eager decode)"}
    if device.type == "cuda":
        meta["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / GIB
        if "H200" not in meta["device"] and (args.hbm_tbps, args.peak_tflops) == (4.3, 790.0):
            print(f"warning: the floors use the H200's figures (4.3 TB/s, 790 TFLOP/s) on a {meta['device']}; "
                  "pass --hbm-tbps / --peak-tflops", flush=True)
    meta["host_load"] = host_load()
    return meta


def host_load() -> dict[str, Any]:
    """What else the host is doing: load averages over 1/5/15 minutes against its CPUs, and torch's intra-op threads
    (host-side engine work slows by orders of magnitude when those threads outnumber the idle cores)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"loadavg": [round(x, 2) for x in load] if load else None, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result dict (also written under ``--out``)."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    engine = engine_overrides(args)
    try:
        for mode in args.modes:
            engine_config(mode, engine, args.backend)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"bad engine setting: {err}") from err
    words = sys.argv[1:] if argv is None else list(argv)
    meta = run_meta(args, device, dtype, engine, words)
    bench = Bench(args, device, dtype, engine, meta)
    longest = max(args.lengths + args.decode_lengths)
    max_positions = max(1 << 21, longest + args.decode_tokens + 8 * (engine.get("chunk_size") or 512) + 1024)

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        isolated = _isolating(args, device)
        if isolated:  # the modes in child processes, their rows gathered into ``bench``
            run_isolated(bench, words)
        for spec in ([] if isolated else args.model):
            info = None
            try:
                info = load_model_info(spec, device, dtype, args.seed, max_positions)
                print(f"{info.name}: built in {info.build_seconds:.1f} s, "
                      f"{info.weight_bytes / 1e9:.2f} GB of weights", flush=True)
                if device.type == "cuda":
                    meta.setdefault("weights_gib", {})[info.name] = torch.cuda.memory_allocated(device) / GIB
                with torch.inference_mode():
                    bench.run_model(info)
            except Exception as err:
                if len(args.model) == 1 and info is None:
                    raise  # nothing else to run: the load error itself is the answer
                meta.setdefault("model_errors", {})[spec] = f"{type(err).__name__}: {err}"[:500]
                print(f"{spec}: {type(err).__name__}: {err}", flush=True)
            finally:
                info = None
                free_memory(device)
    except KeyboardInterrupt as err:
        meta["interrupted"] = str(err) or "KeyboardInterrupt"
        print(f"interrupted ({meta['interrupted']}): writing what was measured", flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        text = bench.save(plot=True)
    print(text)
    return bench.result()


def _isolating(args: argparse.Namespace, device: torch.device) -> bool:
    """Whether the modes run in processes of their own: ``--isolate on``, or ``auto`` on CUDA, with two or more
    modes; with ``--rounds`` > 1 unless ``--isolate off`` (which the parser refuses with rounds)."""
    rounds = getattr(args, "rounds", 1)
    wanted = args.isolate == "on" or (args.isolate == "auto" and (device.type == "cuda" or rounds > 1))
    return wanted and (len(args.modes) > 1 or rounds > 1)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
