"""``ltri-rag precompile``: compile span selection's sort kernels for this machine's GPU now, and wait.

A session on CUDA starts this in the background by itself (:mod:`ltri_rag.kernels.precompile`); the command is for
paying it at a chosen time, e.g. while building a container image whose Triton cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``) is kept.
"""

from __future__ import annotations

import argparse
import time

from ltri_rag.cli.runtime import CliError, Output


def cmd_precompile(args: argparse.Namespace, out: Output) -> int:
    """Compile every sort variant not compiled yet for CUDA device ``args.gpu`` (None: the current one)."""
    import torch

    if not torch.cuda.is_available():
        raise CliError("no CUDA device here: the kernels compile for a GPU (the CPU path compiles nothing)")
    if args.gpu is not None and not 0 <= args.gpu < torch.cuda.device_count():
        raise CliError(f"--gpu {args.gpu} is not a CUDA device here (there are {torch.cuda.device_count()})")
    from ltri_rag.kernels.precompile import cache_dir, precompile_sort_kernels
    from ltri_rag.retrieval import FILL_TAIL

    start = time.perf_counter()
    job = precompile_sort_kernels(args.gpu, tail=FILL_TAIL, workers=args.workers, progress=not args.json)
    seconds = time.perf_counter() - start
    compiled = 0 if job is None else len(job.variants)
    where = cache_dir()
    out.json({"compiled": compiled, "seconds": round(seconds, 3), "cache_dir": str(where),
              "processes": 0 if job is None else len(job.processes)})
    if job is None:
        out.text(f"nothing to compile: every selection kernel is in {where} already")
    else:
        out.text(f"compiled {compiled} selection kernels in {seconds:.1f} s over {len(job.processes)} processes "
                 f"into {where}")
    return 0
