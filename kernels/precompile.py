"""Compiling the span selection's sort kernels before a prompt needs them, in parallel child processes.

Triton compiles a kernel the first time it is launched with new compile-time settings. Span selection's sorts
(:mod:`ltri_rag.kernels.triton_sort_fill`) come in ten such variants (block sizes 128 to 1,024, chunk rounds), and a
prompt meets them one by one as its span memory grows: on an H200 a machine's first 128K-token prompt took 28.7 s
against 13.0 s once they were compiled (``benchmarks/results/e2e_llama8b_h200/session26``), ~2-6 s per variant, each
compiled while the prompt waits. Triton keeps compiled kernels in its on-disk cache, so this is paid once per
machine (per Triton version and cache directory).

Here every variant that the engine can launch (:func:`~ltri_rag.kernels.triton_sort_fill.launch_variants`) is
compiled ahead of use, spread over child processes (``python -m ltri_rag.kernels.precompile``) that write into the
same cache. Each child compiles with ``JITFunction.warmup`` (argument dtypes only: no kernel runs, nothing is
allocated on the device, no CUDA context is created) and leaves a marker file per variant, keyed by the Triton
version, the device's compute capability and the kernel module's source, so that later processes skip what is
done. A kernel the engine needs before its child has finished is compiled by the engine itself, as without this
module: the result is the same either way, only the waiting differs.

:class:`~ltri_rag.engine.LtriSession` starts this in the background on CUDA (once per process and device) unless
the environment variable ``LTRI_PRECOMPILE`` is ``0`` / ``off`` / ``false`` / ``no``. To pay the cost at a chosen
time instead (a container build, a service's start-up), call :func:`precompile_sort_kernels` and let it wait.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ltri_rag.kernels import triton_sort_fill
from ltri_rag.kernels._triton_support import interpreted, triton

__all__ = ["ENV_SWITCH", "PrecompileJob", "auto_enabled", "cache_dir", "pending_variants", "precompile_sort_kernels",
           "start_in_background", "variant_key"]

ENV_SWITCH = "LTRI_PRECOMPILE"
"""Environment variable that turns the automatic background compile off (``0``, ``off``, ``false``, ``no``)."""

Variant = tuple[str, dict[str, Any]]  # (kernel name, compile-time settings), as launch_variants gives them
_MARKERS = "ltri_rag_precompiled"  # folder of marker files inside Triton's cache directory
_JOBS: dict[int, PrecompileJob] = {}  # device index -> the job this process started


def auto_enabled() -> bool:
    """Whether sessions start the background compile (``LTRI_PRECOMPILE`` is not ``0`` / ``off`` / ...)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_dir() -> Path:
    """Triton's on-disk kernel cache directory (its knob, else ``TRITON_CACHE_DIR``, else ``~/.triton/cache``)."""
    try:
        from triton import knobs

        configured = knobs.cache.dir
    except (ImportError, AttributeError):  # triton before 3.4 has no knobs
        configured = None
    return Path(configured or os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def _device_index(device: torch.device | str | int | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"precompiling needs a CUDA device, got {device}")
    return torch.cuda.current_device() if device.index is None else device.index


def _capability(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{major}{minor}"


@functools.cache
def _source_digest() -> str:
    """sha256 of the sort kernels' module source (read once per process)."""
    return hashlib.sha256(Path(triton_sort_fill.__file__).read_bytes()).hexdigest()


def variant_key(variant: Variant, tail: int, capability: str) -> str:
    """Marker name of one compiled variant: a digest of the Triton version, the compute capability, the kernel
    module's source and the variant's settings (any change to these compiles it again)."""
    digest = hashlib.sha256()
    digest.update(f"{triton.__version__}|{capability}|{tail}|{_source_digest()}|".encode())
    digest.update(json.dumps(variant, sort_keys=True).encode())
    return f"{variant[0]}-{digest.hexdigest()[:24]}"


def pending_variants(capability: str, tail: int, directory: Path | None = None) -> list[Variant]:
    """The variants the engine can launch (:func:`~ltri_rag.kernels.triton_sort_fill.launch_variants`) that have
    no marker in ``directory`` (default: Triton's cache directory), largest first."""
    markers = (directory or cache_dir()) / _MARKERS
    return [v for v in triton_sort_fill.launch_variants()
            if not (markers / variant_key(v, tail, capability)).exists()]


class PrecompileJob:
    """Child processes compiling a share of the variants each (:func:`precompile_sort_kernels`).

    Attributes:
        variants: The variants being compiled.
        processes: One ``subprocess.Popen`` per child.
        started: ``time.perf_counter()`` when the children were started.
    """

    def __init__(self, variants: list[Variant], processes: list[subprocess.Popen], markers: list[Path],
                 logs: list[Any] | None = None) -> None:
        self.variants = variants
        self.processes = processes
        self._logs = logs or [None] * len(processes)  # each child's stderr, a temporary file (or None)
        self._markers = markers
        self.started = time.perf_counter()

    def compiled(self) -> int:
        """How many of :attr:`variants` are compiled (their markers written) so far."""
        return sum(1 for marker in self._markers if marker.exists())

    def done(self) -> bool:
        """Whether every child has exited."""
        return all(p.poll() is not None for p in self.processes)

    def wait(self, timeout: float | None = None, progress: bool = False) -> float:
        """Wait for every child, showing a progress bar over the variants with ``progress``; returns the seconds
        since the children started.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the children keep running).
            RuntimeError: a child failed; the message names its variants and ends with its error output.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        shown = -1
        while True:
            finished, compiled = self.done(), self.compiled()
            if progress and compiled != shown:  # a one-line bar on stderr (the kernels depend on torch only)
                shown = compiled
                filled = (20 * compiled) // max(1, len(self.variants))
                sys.stderr.write(f"\rcompiling selection kernels [{'#' * filled}{'.' * (20 - filled)}] "
                                 f"{compiled}/{len(self.variants)}")
            if progress and finished:
                sys.stderr.write("\n")
            if progress:
                sys.stderr.flush()
            if finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                if progress:
                    sys.stderr.write("\n")
                raise TimeoutError(f"{len(self.variants) - compiled} of {len(self.variants)} selection kernels "
                                   f"still compiling after {timeout} s")
            time.sleep(0.1)
        failed = [i for i, p in enumerate(self.processes) if p.returncode != 0]
        if failed:
            first, err = self.processes[failed[0]], ""
            log = self._logs[failed[0]]
            if log is not None:
                log.seek(0)
                err = log.read().decode(errors="replace")
            raise RuntimeError(f"{len(failed)} of {len(self.processes)} compiling processes failed (exit "
                               f"{first.returncode}; arguments {first.args[3:]}):\n{err[-4000:]}")
        return time.perf_counter() - self.started

    def cancel(self) -> None:
        """Stop the children still running (what they compiled stays in the cache)."""
        for p in self.processes:
            if p.poll() is None:
                p.kill()
        for p in self.processes:
            p.wait()


def precompile_sort_kernels(device: torch.device | str | int | None = None, *, tail: int = 64,
                            workers: int | None = None, wait: bool = True, progress: bool = True,
                            timeout: float | None = None) -> PrecompileJob | None:
    """Compile every span-selection sort variant not compiled yet on this machine for ``device``'s architecture.

    Args:
        device: The CUDA device the engine will run on (None: the current one).
        tail: The budget fill's tail (the engine's is 64; it is compiled into the fill kernel).
        workers: Child processes (None: one per variant, at most the CPU count minus one, at least one).
        wait: Block until they are done (else return at once; see :meth:`PrecompileJob.wait`).
        progress: With ``wait``, show a progress bar.
        timeout: With ``wait``, give up waiting after this many seconds (``TimeoutError``).

    Returns:
        The job, or None when there is nothing to compile (every marker present) or nothing can be compiled
        (triton missing, or the interpreter is on: kernels then run uncompiled).

    Raises:
        ValueError: ``device`` is not a CUDA device, ``tail`` < 1 or ``workers`` < 1.
        RuntimeError: with ``wait``, a child failed (its error output in the message).
    """
    if triton is None or interpreted():
        return None
    if not isinstance(tail, int) or tail < 1:
        raise ValueError(f"tail must be an int >= 1, got {tail!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be an int >= 1 or None, got {workers!r}")
    index = _device_index(device)
    capability = _capability(index)
    directory = cache_dir()
    todo = pending_variants(capability, tail, directory)
    if not todo:
        return None
    count = workers or max(1, min(len(todo), (os.cpu_count() or 2) - 1))
    shares = [todo[i::count] for i in range(count) if todo[i::count]]  # largest variants spread first
    env = {**os.environ, "TRITON_CACHE_DIR": str(directory)}
    env.pop("TRITON_INTERPRET", None)
    logs = [tempfile.TemporaryFile() for _ in shares]  # not pipes: a pipe nobody reads could fill and block a child
    processes = [subprocess.Popen([sys.executable, "-m", "ltri_rag.kernels.precompile", "--device", str(index),
                                   "--tail", str(tail), "--variants", json.dumps(share)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=log)
                 for share, log in zip(shares, logs)]
    job = PrecompileJob(todo, processes, [directory / _MARKERS / variant_key(v, tail, capability) for v in todo],
                        logs)
    if wait:
        job.wait(timeout=timeout, progress=progress)
    return job


def start_in_background(device: torch.device, tail: int) -> PrecompileJob | None:
    """What a session calls on CUDA: start :func:`precompile_sort_kernels` without waiting, once per process and
    device, unless ``LTRI_PRECOMPILE`` turns it off (or the interpreter is embedded in a program not named python*,
    whose executable could not run the children). Never raises: if the children cannot start, a warning says why
    and kernels compile on first use as before. Children still running when this process exits are stopped."""
    if device.type != "cuda" or not auto_enabled() or triton is None or interpreted():
        return None
    if not Path(sys.executable).name.lower().startswith("python"):  # an embedding host (a server binary, say): its
        return None  # executable would not run ``-m ltri_rag.kernels.precompile``; kernels compile on first use
    try:
        index = _device_index(device)
        if index in _JOBS:
            return _JOBS[index]
        job = precompile_sort_kernels(index, tail=tail, wait=False, progress=False)
    except Exception as exc:
        import warnings

        warnings.warn(f"could not start compiling the selection kernels ahead of use ({type(exc).__name__}: "
                      f"{exc}); they compile on first use", RuntimeWarning, stacklevel=2)
        return None
    _JOBS[index] = job
    if job is not None:
        import atexit

        atexit.register(job.cancel)
    return job


def _no_stream_lookup() -> None:
    """In a child: stop Triton from asking torch for the current stream before each (warm-up) compile. The answer
    is only used to launch, which a warm-up does not, and asking creates the device's CUDA context: ~0.5 GiB of
    device memory per child (measured on an H200), held while the session's own process sizes its pools."""
    from triton.runtime.driver import driver

    # a driver object that refuses the attribute (another Triton layout) keeps its lookup: the child then compiles
    # the same kernels, holding a context while it runs
    with contextlib.suppress(AttributeError, TypeError):
        driver.active.get_current_stream = lambda *args, **kwargs: 0


def _compile(variants: list[Variant], tail: int, index: int) -> None:
    """In a child: compile ``variants`` for device ``index`` with ``warmup`` (dtypes in place of tensors: nothing
    runs, nothing is allocated) and write each one's marker."""
    capability = _capability(index)
    markers = cache_dir() / _MARKERS
    markers.mkdir(parents=True, exist_ok=True)
    if index != torch.cuda.current_device():  # (setting the device creates a CUDA context: only when needed)
        torch.cuda.set_device(index)
    _no_stream_lookup()
    for kernel, meta in variants:
        keys = torch.float32 if meta["FLOAT"] else torch.int64
        if kernel == "chunk_top":  # (Src, Dst, n, src_stride, dst_stride)
            triton_sort_fill._chunk_top_kernel.warmup(keys, torch.int64, 1024, 1024, 1024, grid=(1, 1), **meta)
        elif kernel == "sort_fill":  # (Src, Lengths, Out, Scratch, n, src_stride, num_spans, budget)
            triton_sort_fill._sort_fill_kernel.warmup(keys, torch.int64, torch.int8, torch.int64, 1024, 1024,
                                                      1024, 1024, grid=(1,), TAIL=tail, **meta)
        else:
            raise ValueError(f"unknown kernel {kernel!r} in variant {meta}")
        marker = markers / variant_key((kernel, meta), tail, capability)
        partial = marker.parent / f"{marker.name}.{os.getpid()}.tmp"
        partial.write_text(json.dumps({"kernel": kernel, "meta": meta, "tail": tail, "triton": triton.__version__,
                                       "capability": capability}))
        os.replace(partial, marker)


def main(argv: list[str] | None = None) -> None:
    """Child entry point: ``python -m ltri_rag.kernels.precompile --device I --tail T --variants JSON``."""
    parser = argparse.ArgumentParser(description="Compile span-selection sort kernels into Triton's cache.")
    parser.add_argument("--device", type=int, required=True)
    parser.add_argument("--tail", type=int, required=True)
    parser.add_argument("--variants", required=True, help="JSON list of [kernel, meta] pairs")
    args = parser.parse_args(argv)
    if triton is None:
        raise SystemExit("triton is not installed")
    _compile([(kernel, meta) for kernel, meta in json.loads(args.variants)], args.tail, args.device)


if __name__ == "__main__":
    main()
