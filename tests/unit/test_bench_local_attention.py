"""The local-attention benchmark script runs end to end on tiny shapes and checks each backend against the
float32 reference (the speed numbers themselves come from the GPU, not from tests)."""

from __future__ import annotations

import json

from benchmarks.bench_local_attention import main


def test_small_run_writes_rows_for_every_backend(tmp_path) -> None:
    main(["--small", "--reps", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["backend"]: r for r in result["rows"]}
    assert {"torch", "sdpa (out only)"} <= set(rows)
    for name, row in rows.items():
        assert row["ms"] > 0 and row["tflops"] > 0
        if name != "sdpa (out only)":  # the kernels that return ltri's statistics match the reference
            assert row["max_err_out"] < 1e-4 and row["max_rel_err_key_mass"] < 1e-3
    assert "| tiny | torch |" in (tmp_path / "bench.md").read_text()
