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
            assert row["max_err_out"] < (1e-4 if row["dtype"] == "torch.float32" else 2e-3)  # bf16 on a GPU
            assert ("no key mass" in name) == ("max_rel_err_key_mass" not in row)
            assert row.get("max_rel_err_key_mass", 0.0) < 1e-3
    assert "| tiny | torch |" in (tmp_path / "bench.md").read_text()


def test_sampled_key_mass_rows_are_checked_against_the_same_sampling(tmp_path, monkeypatch) -> None:
    """``--mass-step N`` adds a Triton row whose key mass sums every N-th query; its error is taken against the
    torch path with the same sampling (so it stays at rounding level). Interpreted on CPU."""
    import pytest
    import torch

    pytest.importorskip("triton")
    from tests.unit.triton_modules import kernel_module

    kernel_module("triton_local")  # interpreted on CPU (set up before the kernels are built)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    main(["--small", "--reps", "1", "--mass-step", "4", "--out", str(tmp_path)])
    rows = {r["backend"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    row = rows["triton (key mass of 1/4 queries)"]
    assert row["max_err_out"] < (1e-4 if row["dtype"] == "torch.float32" else 2e-3)  # bf16 on a GPU
    assert row["max_rel_err_key_mass"] < 1e-3


def test_sweep_times_each_setting_and_records_the_ones_that_fail(monkeypatch) -> None:
    """``--sweep``'s rows: one per launch setting, fastest first, each checked against the reference; a setting the
    kernel refuses is a row with its error, not a stop. Runs the kernel under the Triton interpreter on CPU."""
    import importlib
    import os

    import pytest
    import torch

    pytest.importorskip("triton")
    from benchmarks import bench_local_attention as bench

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        from ltri_rag.kernels import triton_local

        if not triton_local.INTERPRETED:
            importlib.reload(triton_local)
        assert os.environ["TRITON_INTERPRET"] == "1"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grid = {"block_m": (16, 32), "block_n": (16,), "num_warps": (1, 3), "num_stages": (1,)}  # 3 warps: refused
    rows = bench.sweep_shape("tiny", bench.SMALL["tiny"], device, torch.float32, 1, 8, grid)
    assert len(rows) == 4
    ok = [r for r in rows if r["ms"] is not None]
    failed = [r for r in rows if r["ms"] is None]
    assert [r["num_warps"] for r in ok] == [1, 1] and all(r["max_err_out"] < 1e-4 for r in ok)
    assert ok[0]["ms"] <= ok[1]["ms"]
    assert len(failed) == 2 and all("num_warps" in r["error"] for r in failed)
    assert "| tiny | 16 | 16 | 3 | 1 | - | - | ValueError" in bench.render_sweep(rows, {"device": "cpu",
                                                                                    "dtype": "float32"})


def test_mass_sweep_times_each_key_mass_setting_and_restores_the_default(monkeypatch) -> None:
    """``--mass-sweep``'s rows: the call without an override, then one per key-mass launch setting, each with its
    key mass checked against the reference; the module's override is restored afterwards."""
    import importlib

    import pytest
    import torch

    pytest.importorskip("triton")
    from benchmarks import bench_local_attention as bench

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        from ltri_rag.kernels import triton_local

        if not triton_local.INTERPRETED:
            importlib.reload(triton_local)
    from ltri_rag.kernels import triton_local

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grid = {"block_m": (16, 32), "block_n": (16,), "num_warps": (1, 3), "num_stages": (1,)}  # 3 warps: refused
    rows = bench.mass_sweep_shape("tiny", bench.SMALL["tiny"], device, torch.float32, 1, 8, grid)
    assert len(rows) == 5 and sum(r["setting"] == "default" for r in rows) == 1
    ok = [r for r in rows if r["ms"] is not None]
    assert len(ok) == 3 and all(r["max_rel_err_key_mass"] < 1e-3 for r in ok)
    assert all("num_warps" in r["error"] for r in rows if r["ms"] is None)
    assert triton_local.KEY_MASS_LAUNCH is None
    assert "| tiny | default |" in bench.render_mass_sweep(rows, {"device": "cpu", "dtype": "float32"})


def test_baseline_module_gets_rows_of_its_own(monkeypatch, tmp_path) -> None:
    """``--baseline FILE`` times another copy of the kernel module in the same run (here the module itself, under
    the Triton interpreter on CPU, compiled on a GPU): rows ``baseline`` / ``baseline (no key mass)`` checked like
    the others."""
    import importlib
    from pathlib import Path

    import pytest
    import torch

    pytest.importorskip("triton")
    from ltri_rag.kernels import triton_local

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        if not triton_local.INTERPRETED:
            triton_local = importlib.reload(triton_local)
    main(["--small", "--reps", "1", "--baseline", str(Path(triton_local.__file__)), "--out", str(tmp_path)])
    rows = {r["backend"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert {"triton", "baseline", "baseline (no key mass)"} <= set(rows)
    tolerance = 1e-4 if rows["baseline"]["dtype"] == "torch.float32" else 2e-3  # bf16 on a GPU
    assert rows["baseline"]["max_err_out"] < tolerance and rows["baseline"]["max_rel_err_key_mass"] < 1e-3
