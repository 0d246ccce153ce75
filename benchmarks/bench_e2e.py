"""End-to-end speed of the engine against Hugging Face full attention: prefill, decode, memory, time split.

    python -m benchmarks.bench_e2e --model llama3-8b-random --lengths 32768 131072 --out benchmarks/results/e2e_h200

The entry point only: the benchmark lives in the package :mod:`benchmarks.e2e`, whose docstring (also the
``--help`` text) says what is measured, the time budget, the built-in models and the files written. ``main`` (from
:mod:`benchmarks.e2e.cli`), ``Track`` and ``run_prefill`` are re-exported for the callers of this module; to
replace ``run_prefill`` in a run, patch :mod:`benchmarks.e2e.runs`, where the runner looks it up.
"""

from __future__ import annotations

from benchmarks.e2e.budget import Track
from benchmarks.e2e.cli import main
from benchmarks.e2e.runs import run_prefill

__all__ = ["Track", "main", "run_prefill"]

if __name__ == "__main__":
    main()
