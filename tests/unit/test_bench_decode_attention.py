"""The decode-attention benchmark script runs end to end on tiny shapes and checks each backend against the
float32 composition (the speed numbers themselves come from the GPU, not from tests)."""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():  # the Triton row runs under the interpreter on CPU (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.bench_decode_attention import _triton_module, main


def test_small_run_writes_rows_for_every_backend(tmp_path) -> None:
    main(["--small", "--reps", "1", "--splits", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]
    backends = {r["backend"] for r in rows}
    assert {"torch", "sdpa (out only)"} <= backends
    if _triton_module(torch.device("cpu")) is not None:  # the interpreter was on when triton_decode was imported
        assert {"triton", "triton (num_splits=2)"} <= backends
    assert len(rows) == 2 * len(backends)  # two contexts
    for row in rows:
        assert row["us"] > 0 and row["floor_pct"] > 0 and row["kv_bytes"] > 0
        assert row["mem_len"] + row["win_len"] == row["keys"]
        if row["backend"].startswith("sdpa"):
            assert row["max_err_out"] < 1e-4
        else:  # the kernels that return ltri's statistics match the reference
            assert row["max_err_out"] < 1e-4 and row["max_rel_err_key_mass"] < 1e-3
    assert "| tiny | 48 | 24 + 24 | torch |" in (tmp_path / "bench.md").read_text()
