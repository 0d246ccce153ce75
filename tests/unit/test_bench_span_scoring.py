"""The span-scoring benchmark script runs end to end on tiny shapes (the Triton row under the interpreter on CPU)
and checks each backend against the float32 reference (the speed numbers themselves come from the GPU)."""

from __future__ import annotations

import importlib
import importlib.util
import json

import torch

from benchmarks.bench_span_scoring import main


def test_small_run_writes_rows_for_every_backend(tmp_path, monkeypatch) -> None:
    have_triton = importlib.util.find_spec("triton") is not None
    if have_triton and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # as test_triton_scoring does, before the kernels are built
        from ltri_rag.kernels import triton_scoring

        if not triton_scoring.INTERPRETED:  # imported earlier in this process without the interpreter
            importlib.reload(triton_scoring)
    main(["--small", "--reps", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    chunk = {"torch", "torch + layout", "torch, int8"} | ({"triton", "triton + layout", "triton, int8"}
                                                          if have_triton else set())
    one_query = chunk | ({"triton, block_s 32", "triton, block_s 128"} if have_triton else set())  # the tile sizes
    chunk |= {"triton, recomputed", "triton, 32 MiB slabs"} if have_triton else set()  # the score buffer's forms
    rows = result["rows"]
    assert {r["backend"] for r in rows if r["q_len"] > 1} == chunk
    assert {r["backend"] for r in rows if r["q_len"] == 1} == one_query
    assert len(rows) == len(chunk) + len(one_query)  # one row per backend and shape
    for row in result["rows"]:
        assert row["ms"] > 0 and row["tflops"] > 0
        if "int8" in row["backend"]:  # int8 codes: the quantisation's error, small but not rounding-sized
            assert 1e-5 < row["max_abs_err"] < 0.02
        else:
            assert row["max_abs_err"] < 1e-5
    text = (tmp_path / "bench.md").read_text()
    assert "| tiny S=40 q=16 | torch |" in text and "| tiny S=40 q=1 |" in text
