"""Compiling the selection sorts ahead of use (``kernels.precompile``): the variants it compiles are every one
``sort_fill`` can launch, markers make later processes skip them, failures of its child processes are reported with
their error output, and nothing starts without CUDA. (The compile itself needs a GPU:
``tests/gpu/test_precompile_gpu.py``.)"""

import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from ltri_rag.kernels import precompile, triton_sort_fill


def _key(step: triton_sort_fill.Launch) -> tuple:
    return step.kernel, tuple(sorted(step.meta.items()))


def test_variants_are_every_launch_sort_fill_can_make() -> None:
    variants = {(kernel, tuple(sorted(meta.items()))) for kernel, meta in triton_sort_fill.launch_variants()}
    assert len(variants) == len(triton_sort_fill.launch_variants())  # no repeats
    rng = random.Random(0)
    lengths = list(range(1, 5000)) + [rng.randrange(1, 1 << 27) for _ in range(3000)]
    lengths += [(1 << k) + d for k in range(12, 31) for d in (-1, 0, 1)]
    reached = set()
    for num_spans in lengths:
        candidates = rng.randrange(1, triton_sort_fill.MAX_CANDIDATES + 1)
        for step in triton_sort_fill.launch_plan(num_spans, candidates):
            assert _key(step) in variants, (num_spans, candidates, step)
            reached.add(_key(step))
    assert reached == variants  # and none of them is never launched
    # the plan of a short row is one sort; a long one ends in a sort of at most MAX_SPANS packed keys
    assert [s.kernel for s in triton_sort_fill.launch_plan(300)] == ["sort_fill"]
    plan = triton_sort_fill.launch_plan(65536, 300)
    assert [s.kernel for s in plan] == ["chunk_top"] * (len(plan) - 1) + ["sort_fill"]
    assert plan[-1].n <= triton_sort_fill.MAX_SPANS and plan[-1].meta["FLOAT"] is False


def test_markers_decide_what_is_pending(tmp_path: Path) -> None:
    variants = triton_sort_fill.launch_variants()
    assert precompile.pending_variants("90", 64, tmp_path) == variants
    markers = tmp_path / "ltri_rag_precompiled"
    markers.mkdir()
    (markers / precompile.variant_key(variants[0], 64, "90")).write_text("{}")
    assert precompile.pending_variants("90", 64, tmp_path) == variants[1:]
    # another architecture or tail is another compile
    assert precompile.pending_variants("80", 64, tmp_path) == variants
    assert precompile.pending_variants("90", 32, tmp_path) == variants
    keys = {precompile.variant_key(v, 64, "90") for v in variants}
    assert len(keys) == len(variants)


def _job(tmp_path: Path, scripts: list[str]) -> precompile.PrecompileJob:
    logs = [tempfile.TemporaryFile() for _ in scripts]
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=log)
             for script, log in zip(scripts, logs)]
    markers = [tmp_path / f"marker{i}" for i in range(len(scripts))]
    return precompile.PrecompileJob([("k", {"i": i}) for i in range(len(scripts))], procs, markers, logs)


def test_job_waits_and_counts_markers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = _job(tmp_path, [f"import pathlib, time; time.sleep(0.3); pathlib.Path({str(tmp_path / f'marker{i}')!r})"
                          ".write_text('x')" for i in range(2)])
    assert job.wait(progress=True) >= 0.3
    assert job.done() and job.compiled() == 2
    assert capsys.readouterr().err.endswith("[" + "#" * 20 + "] 2/2\n")


def test_job_reports_a_failed_child_with_its_error_output(tmp_path: Path) -> None:
    job = _job(tmp_path, ["pass", "import sys; sys.stderr.write('no kernel for you'); sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"1 of 2 compiling processes failed \(exit 3(.|\n)*no kernel for you"):
        job.wait()


def test_job_times_out_and_cancels(tmp_path: Path) -> None:
    job = _job(tmp_path, ["import time; time.sleep(60)"])
    with pytest.raises(TimeoutError, match="1 of 1 selection kernels still compiling"):
        job.wait(timeout=0.2)
    job.cancel()
    assert job.done()


def test_bad_arguments_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precompile, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="tail must be an int >= 1, got 0"):
        precompile.precompile_sort_kernels("cuda", tail=0)
    with pytest.raises(ValueError, match="workers must be an int >= 1 or None, got 0"):
        precompile.precompile_sort_kernels("cuda", workers=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
            precompile.precompile_sort_kernels("cpu")


def test_nothing_starts_without_cuda_or_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precompile, "interpreted", lambda: False)
    # reaching the children fails the test (pytest's failure is not an Exception, so start_in_background's
    # catch-all cannot turn it into a None): each None below must come from a check, not from a CPU error
    monkeypatch.setattr(precompile, "precompile_sort_kernels", lambda *a, **k: pytest.fail("started children"))
    monkeypatch.setattr(precompile, "_JOBS", {})
    assert precompile.start_in_background(torch.device("cpu"), 64) is None
    for value in ("0", "off", "False", "no"):
        monkeypatch.setenv(precompile.ENV_SWITCH, value)
        assert not precompile.auto_enabled()
        assert precompile.start_in_background(torch.device("cuda", 0), 64) is None
    monkeypatch.setenv(precompile.ENV_SWITCH, "1")
    assert precompile.auto_enabled()
    # an interpreter embedded in another program: its executable cannot run the children
    monkeypatch.setattr(precompile.sys, "executable", "/usr/bin/uwsgi")
    assert precompile.start_in_background(torch.device("cuda", 0), 64) is None


def test_interpreter_compiles_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert precompile.precompile_sort_kernels("cuda") is None


def test_cache_dir_follows_triton(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    try:
        from triton import knobs
    except ImportError:
        knobs = None
    if knobs is not None and hasattr(knobs, "cache"):
        monkeypatch.setattr(knobs.cache, "dir", str(tmp_path))
    else:
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert precompile.cache_dir() == tmp_path
    assert os.fspath(precompile.cache_dir()) == str(tmp_path)
