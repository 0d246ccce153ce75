"""What a fresh machine's first request spends compiling Triton kernels, kernel by kernel.

    python -m benchmarks.compile_profile --out benchmarks/results/compile_profile_h200

Points Triton's cache at an empty directory (``TRITON_CACHE_DIR``, set before triton is imported; ``--cache-dir``
keeps one), wraps ``triton.compiler.compile`` with a timer, then runs one short request on a random-weight model
(``--model``, with ``--layers`` decoder layers: every layer of these models launches the same kernels) through
:class:`ltri_rag.engine.LtriSession`: a prompt of ``--prompt`` tokens (long enough to evict, detect spans and
retrieve) and ``--decode`` decoded tokens (captured decode steps included). The same request then runs again in the
same process, everything compiled, for comparison. Each compile is recorded with its kernel name, compile-time
settings (constexprs), the arguments Triton specialised (``attrs``: divisibility by 16) and seconds; the table sums them per kernel. Whether the background compile of the selection sorts runs
(:mod:`ltri_rag.kernels.precompile`) follows ``LTRI_PRECOMPILE`` as in any session. GPU only.

Prints and writes ``bench.json`` / ``bench.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any


def _settings(src: Any) -> str:
    """The compile-time settings of a Triton source object, briefly: its constexprs by value, each named by its
    argument where the source's function gives the names (``BLOCK=1024,FLOAT=True``), else by its index path."""
    constants = getattr(src, "constants", {}) or {}
    names = list(getattr(getattr(src, "fn", None), "arg_names", []))

    def name(key) -> str:
        if isinstance(key, str):
            return key
        return names[key[0]] if len(key) == 1 and key[0] < len(names) else "/".join(map(str, key))

    return ",".join(f"{name(k)}={v}" for k, v in constants.items() if isinstance(v, (bool, int, float, str)))[:200]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3-8b-random")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=12288)
    parser.add_argument("--decode", type=int, default=6)
    parser.add_argument("--cache-dir", default=None, help="Triton cache to use (default: a new empty directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.layers < 1 or args.prompt < 1 or args.decode < 0:
        parser.error(f"--layers and --prompt must be >= 1 and --decode >= 0, got {args.layers}, {args.prompt}, "
                     f"{args.decode}")
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # before triton is imported

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("compile_profile needs a CUDA device (the CPU path compiles nothing)")
    import triton.compiler

    records: list[dict[str, Any]] = []
    original = triton.compiler.compile

    def timed(src, *a, **kw):  # what JITFunction calls on a kernel-cache miss (bound at its first launch)
        start = time.perf_counter()
        try:
            return original(src, *a, **kw)
        finally:
            records.append({"kernel": getattr(src, "name", type(src).__name__), "settings": _settings(src),
                            "specialised": str(getattr(src, "attrs", ""))[:400],
                            "seconds": time.perf_counter() - start, "at": time.perf_counter() - began})

    triton.compiler.compile = timed
    from transformers import AutoModelForCausalLM

    from benchmarks.e2e.models import BUILTIN_MODELS, _config_for
    from ltri_rag import LtriConfig, LtriSession

    began = time.perf_counter()
    family, fields = BUILTIN_MODELS[args.model]
    config = _config_for(family, {**fields, "num_hidden_layers": args.layers}, args.prompt + args.decode + 64)
    device = torch.device("cuda")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (1, args.prompt), device=device, generator=gen)

    def request() -> tuple[float, float]:
        session = LtriSession(model, LtriConfig())
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = session.feed(ids)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.decode):
            logits = session.step(logits.argmax(-1))
        torch.cuda.synchronize()
        return prefill, time.perf_counter() - start

    cold = request()
    compiled_cold = len(records)
    warm = request()
    per_kernel: dict[str, dict[str, Any]] = defaultdict(lambda: {"variants": 0, "seconds": 0.0})
    for r in records[:compiled_cold]:
        per_kernel[r["kernel"]]["variants"] += 1
        per_kernel[r["kernel"]]["seconds"] += r["seconds"]
    table = sorted(({"kernel": k, **v} for k, v in per_kernel.items()), key=lambda r: -r["seconds"])
    total = sum(r["seconds"] for r in table)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "model": args.model, "layers": args.layers, "prompt": args.prompt, "decode": args.decode,
            "precompile_env": os.environ.get("LTRI_PRECOMPILE", "(unset: on)"), "cold_cache": args.cache_dir is None}
    result = {"meta": meta, "cold": {"prefill_s": cold[0], "decode_s": cold[1]},
              "warm": {"prefill_s": warm[0], "decode_s": warm[1]}, "compile_s": total, "per_kernel": table,
              "compiles": records, "compiles_in_warm_run": len(records) - compiled_cold}
    print(f"first request: prefill {cold[0]:.2f} s, {args.decode} tokens {cold[1]:.2f} s; again: prefill "
          f"{warm[0]:.2f} s, decode {warm[1]:.2f} s; {compiled_cold} compiles, {total:.1f} s in all")
    for r in table:
        print(f"  {r['kernel']:40s} {r['variants']:3d} variants {r['seconds']:7.2f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Kernel compiles of a first request ({meta['device']}, triton {meta['triton']})", "",
             f"{args.model} with {args.layers} layers, a {args.prompt:,}-token prompt and {args.decode} decoded "
             f"tokens, empty Triton cache: {meta['cold_cache']}; `LTRI_PRECOMPILE`: {meta['precompile_env']}.", "",
             f"First request: prefill {cold[0]:.2f} s, decode {cold[1]:.2f} s. The same request again: prefill "
             f"{warm[0]:.2f} s, decode {warm[1]:.2f} s. Compiles: {compiled_cold} in the first request "
             f"({total:.1f} s), {len(records) - compiled_cold} in the second.", "",
             "| kernel | variants | compile, s |", "|---|---:|---:|"]
    lines += [f"| `{r['kernel']}` | {r['variants']} | {r['seconds']:.2f} |" for r in table]
    (out / "bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
