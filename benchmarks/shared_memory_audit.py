"""Whether every Triton kernel a request launches fits the shared memory of GPUs the numbers were not taken on.

    python -m benchmarks.shared_memory_audit --out benchmarks/results/shared_memory_audit_h100

The kernels' pipeline depths were tuned on sm_90, whose blocks may take 227 KiB of shared memory; sm_86 / sm_89
GPUs (RTX 30xx / 40xx, A10, L4) give a block at most 99 KiB. Launches through
:func:`ltri_rag.kernels._triton_support.launch_fitting` are made again shallower when they do not fit; the others
would fail at their first launch. This runs one short request per model shape (``--models``, random weights, two
decoder layers: every layer launches the same kernels) on the GPU at hand, the way compile_profile does, with the
decode attention's Hopper-only dependent launch off (the path other GPUs take). Every kernel variant Triton
compiles for it is compiled once more, ahead of time, for ``--target`` (default sm_86): its shared memory at the
asked depth against that GPU's per-block limit, and where it does not fit, the deepest depth that does. GPU only
(the launch settings it audits are the CUDA ones). Every span-selection sort variant the engine can launch is
audited too, built from its argument types, whatever widths the requests reached; ``--sort-variants`` audits those
alone and needs no GPU:

    python -m benchmarks.shared_memory_audit --sort-variants --out benchmarks/results/shared_memory_sm86_sorts

Prints and writes ``bench.json`` / ``bench.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

from benchmarks.compile_profile import _settings

# a block's shared memory limit (the opt-in maximum Triton compares with), bytes
LIMITS = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
# compile options that follow the target, not the launch: left to the target's own defaults
_TARGET_OPTIONS = ("arch", "supported_fp8_dtypes", "deprecated_fp8_dot_operand_dtypes")


def kernel_dir() -> Path:
    """The folder of the kernel modules the engine imports (``ltri_rag.kernels``: installed, or this checkout's
    ``kernels/``), not a path relative to this script, which a device run copies elsewhere."""
    spec = importlib.util.find_spec("ltri_rag.kernels")
    if spec is None or spec.origin is None:
        raise RuntimeError("ltri_rag.kernels is not importable: install the package first")
    return Path(spec.origin).resolve().parent


def fitting_kernels(directory: Path | None = None) -> set[str]:
    """Names of the kernels launched through ``launch_fitting`` (their first argument there), read from the
    kernel modules' source (``directory``, default :func:`kernel_dir`). Raises when it finds none: an empty set
    would mark every kernel as unwrapped."""
    directory = kernel_dir() if directory is None else directory
    names: set[str] = set()
    for path in sorted(directory.glob("*.py")):
        names.update(re.findall(r"launch_fitting\(\s*(\w+)\s*,", path.read_text()))
    if not names:
        raise RuntimeError(f"no launch_fitting call found in {directory}: not the kernel modules' folder")
    return names


def target_options(options: dict[str, Any]) -> dict[str, Any]:
    """A launch's compile options without the ones the target decides."""
    return {k: v for k, v in options.items() if k not in _TARGET_OPTIONS}


def audit_variant(compile_fn, src, options: dict[str, Any], capability: int) -> dict[str, Any]:
    """Compile ``src`` with ``options`` for CUDA ``capability`` (ahead of time: no such GPU needed): its shared
    memory at the asked depth, whether it fits the limit, and if not the deepest ``num_stages`` that fits (None when
    even one stage does not). ``compile_fn``: ``triton.compile``."""
    from triton.backends.compiler import GPUTarget

    limit = LIMITS[capability]
    target = GPUTarget("cuda", capability, 32)
    asked = int(options.get("num_stages", 3))
    opts = target_options(options)

    def shared(stages: int) -> int:
        with _interpreter_off():
            return int(compile_fn(src, target=target, options={**opts, "num_stages": stages}).metadata.shared)

    try:
        at_asked = shared(asked)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: one kernel must not stop the audit
        return {"asked_stages": asked, "shared": None, "fits": None, "fitting_stages": None,
                "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    fitting = asked if at_asked <= limit else None
    stages = asked - 1
    while fitting is None and stages >= 1:
        if shared(stages) <= limit:
            fitting = stages
        stages -= 1
    return {"asked_stages": asked, "shared": at_asked, "fits": at_asked <= limit, "fitting_stages": fitting,
            "error": None}


@contextlib.contextmanager
def _interpreter_off() -> Iterator[None]:
    """``TRITON_INTERPRET`` unset for a while (a test process may have set it after importing triton): Triton
    decorates kernels and generates code differently under it. A process that imported triton itself under the
    interpreter cannot compile at all (its standard-library functions are interpreted): run the audit in a clean
    one."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _compiled_copy(module: ModuleType) -> ModuleType:
    """``module`` itself, or where it was imported for the Triton interpreter (its kernels and their ``@triton.jit``
    helpers are then interpreted functions, which do not compile), a copy loaded from its file with the interpreter
    off, kept out of ``sys.modules``."""
    if not getattr(module, "INTERPRETED", False):
        return module
    with _interpreter_off():
        spec = importlib.util.spec_from_file_location(f"{module.__name__}_compiled", module.__file__)
        copy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copy)
    return copy


def sort_variant_sources(tail: int = 64) -> list[tuple[str, Any, dict[str, Any]]]:
    """``(kernel, source, options)`` of every span-selection sort variant the engine can launch
    (:func:`~ltri_rag.kernels.triton_sort_fill.launch_variants`, the widest blocks included, whatever a request
    reaches), with the argument types :mod:`ltri_rag.kernels.precompile` warms them up with: aligned pointers,
    32-bit integers. Built without a GPU."""
    from triton.compiler import ASTSource

    from ltri_rag.kernels import triton_sort_fill

    sorts = _compiled_copy(triton_sort_fill)
    out = []
    for name, meta in sorts.launch_variants():
        settings = dict(meta)
        options = {"num_warps": settings.pop("num_warps", 4), "num_stages": 3}  # launched at triton's default depth
        keys = "*fp32" if settings["FLOAT"] else "*i64"
        if name == "chunk_top":  # (Src, Dst, n, src_stride, dst_stride)
            kernel, runtime = sorts._chunk_top_kernel, [keys, "*i64", "i32", "i32", "i32"]
        else:  # sort_fill: (Src, Lengths, Out, Scratch, n, src_stride, num_spans, budget)
            kernel, runtime = sorts._sort_fill_kernel, [keys, "*i64", "*i8", "*i64", "i32", "i32", "i32", "i32"]
            settings["TAIL"] = tail
        names = kernel.arg_names
        signature = {n: runtime[i] if i < len(runtime) else "constexpr" for i, n in enumerate(names)}
        attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(runtime) if kind.startswith("*")}
        src = ASTSource(fn=kernel, signature=signature, constexprs={n: settings[n] for n in names[len(runtime):]},
                        attrs=attrs)
        out.append((f"_{name}_kernel", src, options))
    return out


def _captured_requests(models: list[str], prompt: int, decode: int) -> tuple[list[tuple[Any, dict, int]], str]:
    """On CUDA: one request per model, every kernel variant Triton compiles recorded as ``(source, options, shared
    bytes here)``; and the device's name."""
    import torch
    import triton.compiler
    from transformers import AutoModelForCausalLM

    from benchmarks.e2e.models import BUILTIN_MODELS, _config_for
    from ltri_rag import LtriConfig, LtriSession
    from ltri_rag.kernels import triton_decode

    captured: list[tuple[Any, dict[str, Any], int]] = []
    original = triton.compiler.compile

    def recording(src, *a, **kw):  # what JITFunction calls on a kernel-cache miss (bound at its first launch)
        compiled = original(src, *a, **kw)
        if kw.get("options") is not None and hasattr(src, "fn"):
            captured.append((src, dict(kw["options"]), int(compiled.metadata.shared)))
        return compiled

    triton.compiler.compile = recording
    triton_decode.PDL_FINISH = False  # Hopper only: the audited GPUs launch the finish plainly
    device = torch.device("cuda")
    try:
        for name in models:
            family, fields = BUILTIN_MODELS[name]
            config = _config_for(family, {**fields, "num_hidden_layers": 2}, prompt + decode + 64)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
            ids = torch.randint(0, config.vocab_size, (1, prompt), device=device,
                                generator=torch.Generator(device=device).manual_seed(0))
            session = LtriSession(model, LtriConfig())
            logits = session.feed(ids)
            for _ in range(decode):
                logits = session.step(logits.argmax(-1))
            torch.cuda.synchronize()
            del session, model
    finally:
        triton.compiler.compile = original
    return captured, torch.cuda.get_device_name()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama3-8b-random", "qwen2.5-0.5b-random"])
    parser.add_argument("--prompt", type=int, default=12288)
    parser.add_argument("--decode", type=int, default=6)
    parser.add_argument("--target", type=int, default=86, choices=sorted(LIMITS),
                        help="compute capability to audit for (x10: 86 = sm_86)")
    parser.add_argument("--sort-variants", action="store_true",
                        help="only the span-selection sort variants (built from their argument types: no GPU needed)")
    parser.add_argument("--max-seconds", type=float, default=420.0,
                        help="stop compiling variants after this long from the start (the rest are counted as not "
                             "audited; the report is written either way)")
    parser.add_argument("--out", required=True)
    started = time.perf_counter()
    args = parser.parse_args(argv)
    if args.prompt < 1 or args.decode < 0:
        parser.error(f"--prompt must be >= 1 and --decode >= 0, got {args.prompt}, {args.decode}")
    if args.max_seconds <= 0:
        parser.error(f"--max-seconds must be > 0, got {args.max_seconds}")
    from benchmarks.e2e.models import BUILTIN_MODELS

    unknown = [m for m in args.models if m not in BUILTIN_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(BUILTIN_MODELS)}")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-audit-")  # every variant compiled here
    import torch

    if not args.sort_variants and not torch.cuda.is_available():
        raise SystemExit("shared_memory_audit needs a CUDA device (the CUDA launch settings are what it audits); "
                         "--sort-variants runs without one")
    import triton

    if args.sort_variants:
        captured, where = [], "a machine without a GPU (sort variants only)"
    else:
        captured, where = _captured_requests(args.models, args.prompt, args.decode)
    wrapped = fitting_kernels()
    rows = []
    began = time.perf_counter()
    variants = [(getattr(src, "name", type(src).__name__), src, options, shared_here)
                for src, options, shared_here in captured]
    variants += [(kernel, src, options, None) for kernel, src, options in sort_variant_sources()]
    for kernel, src, options, shared_here in variants:
        if time.perf_counter() - started > args.max_seconds:
            break
        row = {"kernel": kernel, "settings": _settings(src), "num_warps": options.get("num_warps"),
               "shared_here": shared_here, "launch_fitting": kernel in wrapped,
               **audit_variant(triton.compile, src, options, args.target)}
        row["launches"] = bool(row["fits"] or (row["launch_fitting"] and row["fitting_stages"] is not None))
        rows.append(row)
    failing = [r for r in rows if not r["launches"]]
    meta = {"device": where, "torch": torch.__version__, "triton": triton.__version__,
            "models": [] if args.sort_variants else args.models, "prompt": args.prompt, "decode": args.decode,
            "target": f"sm_{args.target}", "limit_bytes": LIMITS[args.target],
            "audit_seconds": time.perf_counter() - began, "not_audited": len(variants) - len(rows)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"meta": meta, "variants": rows}, indent=1))
    requests = ("" if args.sort_variants else f"one request per model ({', '.join(args.models)}; 2 layers, "
                f"{args.prompt:,}-token prompt, {args.decode} decoded tokens) and ")
    command = " ".join(["python -m benchmarks.shared_memory_audit", *(argv if argv is not None else sys.argv[1:])])
    lines = [f"# Shared memory of kernel variants at sm_{args.target}'s limit ({LIMITS[args.target]:,} bytes per "
             "block)", "",
             f"Command: `{command}`", "",
             f"On {where} (triton {meta['triton']}, torch {meta['torch']}): {requests}every span-selection sort "
             f"variant, each compiled ahead of time for sm_{args.target}. {len(rows)} variants audited, "
             f"{len(failing)} that would not launch there"
             + (f"; {meta['not_audited']} not audited (--max-seconds {args.max_seconds:g})." if meta["not_audited"]
                else "."), "",
             "| kernel | settings | warps | stages asked | shared here | shared at target | fits | through "
             "launch_fitting | depth that fits | launches |", "|---|---|---:|---:|---:|---:|---|---|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["launches"], r["kernel"])):
        here = "-" if r["shared_here"] is None else f"{r['shared_here']:,}"
        shared = r["error"] or f"{r['shared']:,}"
        lines.append(f"| `{r['kernel']}` | {r['settings'][:80]} | {r['num_warps']} | {r['asked_stages']} | "
                     f"{here} | {shared} | {r['fits']} | {r['launch_fitting']} | {r['fitting_stages']} | "
                     f"{'yes' if r['launches'] else '**no**'} |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} variants audited ({meta['not_audited']} not, for time); {len(failing)} would not launch "
          f"on sm_{args.target}")
    for r in rows:
        print(f"  {'ok ' if r['launches'] else 'NO '} {r['kernel']:28s} {r['settings'][:60]:60s} "
              f"{r['error'] or r['shared']} bytes at {r['asked_stages']} stages")


if __name__ == "__main__":
    main()
