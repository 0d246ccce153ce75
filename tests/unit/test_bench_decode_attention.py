"""The decode-attention benchmark script runs end to end on tiny shapes and checks each backend against the
float32 composition (the speed numbers themselves come from the GPU, not from tests)."""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton row runs under the interpreter on CPU (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.bench_decode_attention import READ_FLOOR, _triton_module, main


def test_small_run_writes_rows_for_every_backend(tmp_path) -> None:
    main(["--small", "--reps", "1", "--splits", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]
    backends = {r["backend"] for r in rows}
    assert {"torch", "sdpa (out only)"} <= backends
    if _triton_module(torch.device("cpu")) is not None:  # the interpreter was on when triton_decode was imported
        assert {"triton", "triton (num_splits=2)", READ_FLOOR, READ_FLOOR + " (num_splits=2)"} <= backends
    assert len(rows) == 2 * len(backends)  # two contexts
    for row in rows:
        assert row["us"] > 0 and row["floor_pct"] > 0 and row["kv_bytes"] > 0
        assert row["mem_len"] + row["win_len"] == row["keys"]
        if row["backend"].startswith(READ_FLOOR):  # every element read exactly once: the sums add up
            assert row["max_err_out"] < 1e-5
        elif row["backend"].startswith("sdpa"):
            assert row["max_err_out"] < 1e-4
        else:  # the kernels that return ltri's statistics match the reference
            assert row["max_err_out"] < 1e-4 and row["max_rel_err_key_mass"] < 1e-3
    assert "| tiny | 48 | 24 + 24 | torch |" in (tmp_path / "bench.md").read_text()


def test_read_floor_reads_every_element_once() -> None:
    """The read-floor kernel's partial sums, per (sequence, KV head) and split, add up to the sum of every element
    of the four tensors: each tile of the memory and of the window read once, none twice, the tails masked. A
    memory that ends inside a tile, an empty memory, and a batch of two."""
    from benchmarks import decode_read_floor as floor

    if not floor.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("no CUDA device, and triton was imported in this test process without TRITON_INTERPRET=1 "
                    "(another test module loaded it first): nothing here can run the kernel")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    cases = ((1, 45, 21, {}), (2, 0, 33, {"num_splits": 2}), (1, 96, 64, {"num_splits": 5}),
             (1, 70, 30, {"block_n": 16, "num_warps": 2, "num_stages": 2}))  # launch settings given (--grid)
    for batch, mem_len, win_len, settings in cases:
        tensors = [torch.rand(batch, 2, n, 24, generator=gen).to(device) for n in (mem_len, mem_len, win_len,
                                                                                  win_len)]
        sums = floor.read_kv(*tensors, **settings)
        assert sums.shape[0] == batch * 2
        for row in range(batch * 2):
            b, h = divmod(row, 2)
            expected = sum(float(t[b, h].double().sum()) for t in tensors)
            assert abs(float(sums[row].double().sum()) - expected) < 1e-4 * max(1.0, expected)


def test_read_floor_refuses_bad_launch_settings() -> None:
    from benchmarks import decode_read_floor as floor

    if not floor.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("no CUDA device, and triton was imported in this test process without TRITON_INTERPRET=1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tensors = [torch.rand(1, 2, 8, 16).to(device) for _ in range(4)]
    for settings, shown in (({"block_n": 24}, "block_n must be a power of two >= 16, got 24"),
                            ({"num_warps": 0}, "num_warps must be a power of two >= 1, got 0"),
                            ({"num_stages": 0}, "num_stages must be >= 1, got 0")):
        try:
            floor.read_kv(*tensors, **settings)
        except ValueError as err:
            assert shown in str(err)
        else:
            raise AssertionError(f"{settings} was accepted")
