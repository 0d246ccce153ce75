"""``bench_e2e --rounds N``: each mode measured in N processes of its own, the order rotated each round, one merged
row per mode and length holding the medians (``benchmarks/e2e/rounds.py``)."""

from __future__ import annotations

import json
import statistics
from argparse import Namespace

import pytest
import torch

from benchmarks.e2e.rounds import DECODE_KEYS, PREFILL_KEYS, merge_rounds, rotated


def test_rotation_puts_each_mode_first_once_per_cycle() -> None:
    modes = ["a", "b", "c"]
    orders = [rotated(modes, r) for r in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert rotated([], 3) == []


def _prefill(mode: str, seconds: float, round_index: int, position: int, status: str = "ok") -> dict:
    return {"model": "m", "mode": mode, "length": 1000, "phase": "prefill", "status": status, "seconds": seconds,
            "tokens_per_s": 1000 / seconds, "floor_s": 0.5, "x_floor": seconds / 0.5, "peak_gib": seconds,
            "round": round_index, "position": position}


def test_merge_takes_medians_keeps_every_round_and_rederives() -> None:
    rows = [_prefill("x", 3.0, 0, 1), _prefill("y", 10.0, 0, 2), _prefill("x", 1.0, 1, 2),
            _prefill("y", 4.0, 1, 1, status="error"), _prefill("x", 2.5, 2, 1)]
    merged = merge_rounds(rows, PREFILL_KEYS)
    assert [r["mode"] for r in merged] == ["x", "y"]  # order of first appearance
    x, y = merged
    assert x["seconds"] == 2.5 and x["round_seconds"] == [3.0, 1.0, 2.5]
    assert x["tokens_per_s"] == pytest.approx(400.0) and x["x_floor"] == pytest.approx(5.0)
    assert x["peak_gib"] == 3.0  # the largest of the rounds
    assert x["rounds"] == "3 of 3" and x["round_order"] == [0, 1, 2] and x["round_position"] == [1, 2, 1]
    assert "round" not in x and "position" not in x
    assert y["seconds"] == 10.0 and y["rounds"] == "1 of 2"  # the failed round is left out of the median
    failed = merge_rounds([_prefill("z", 1.0, 0, 1, "OOM"), _prefill("z", 1.0, 1, 1, "error")], PREFILL_KEYS)
    assert len(failed) == 1 and failed[0]["status"] == "OOM" and "round" not in failed[0]
    untagged = {"model": "m", "mode": "full", "length": 5, "phase": "prefill", "status": "ok", "seconds": 1.0}
    assert merge_rounds([untagged], PREFILL_KEYS) == [untagged]


def test_merge_of_decode_rows() -> None:
    def row(r: int, median: float, mean: float) -> dict:
        return {"model": "m", "mode": "ltri", "length": 8, "phase": "decode", "status": "ok", "median_ms": median,
                "mean_ms": mean, "loop_ms": mean - 1, "floor_weights_kv_ms": 2.0, "x_floor": median / 2.0,
                "round": r, "position": r + 1}
    first, second = row(0, 10.0, 14.0), row(1, 12.0, 20.0)
    first["step_kinds"], second["step_kinds"] = {"replay": 1}, {"replay": 2}
    first["min_ms"], first["max_ms"], second["min_ms"], second["max_ms"] = 9.0, 30.0, 11.5, 40.0
    (merged,) = merge_rounds([first, second], DECODE_KEYS)
    assert (merged["min_ms"], merged["max_ms"]) == (9.0, 40.0)  # over every round: they bound the medians
    assert merged["step_kinds"] == {"replay": 1} and merged["round_step_kinds"] == [{"replay": 1}, {"replay": 2}]
    assert merged["median_ms"] == 11.0 and merged["mean_ms"] == 17.0 and merged["loop_ms"] == 16.0
    assert merged["round_mean_ms"] == [14.0, 20.0] and merged["x_floor"] == pytest.approx(5.5)
    assert "round_loop_sync_ms" not in merged  # absent from the rows: nothing made up


def test_rounds_need_isolation_and_a_positive_count() -> None:
    from benchmarks.e2e.cli import _isolating, parse_args

    with pytest.raises(SystemExit):
        parse_args(["--small", "--rounds", "0", "--out", "x"])
    with pytest.raises(SystemExit):
        parse_args(["--small", "--rounds", "2", "--isolate", "off", "--out", "x"])
    cpu = torch.device("cpu")
    assert _isolating(Namespace(isolate="auto", modes=["ltri"], rounds=2), cpu)
    assert not _isolating(Namespace(isolate="auto", modes=["ltri", "full"], rounds=1), cpu)


def test_two_rounds_in_rotated_order_merge_to_medians(tmp_path) -> None:
    """Two modes, two rounds: four child processes, each mode first once; the parent's rows are the medians of its
    children's rows, and the report lists every round."""
    from benchmarks.bench_e2e import main

    main(["--small", "--rounds", "2", "--modes", "ltri", "streaming", "--lengths", "256", "--decode-lengths", "256",
          "--decode-tokens", "3", "--no-profile", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["meta"]["rounds"] == 2
    assert sorted(result["meta"]["isolated"]) == ["ltri_round0", "ltri_round1", "streaming_round0",
                                                  "streaming_round1"]
    for phase, key in (("prefill", "seconds"), ("decode", "median_ms")):
        rows = {r["mode"]: r for r in result[phase]}
        assert len(result[phase]) == 2 and set(rows) == {"ltri", "streaming"}
        for mode, row in rows.items():
            children = [json.loads((tmp_path / "modes" / f"{mode}_round{r}" / "bench.json").read_text())[phase][0]
                        for r in (0, 1)]
            assert row["status"] == "ok" and row[f"round_{key}"] == [c[key] for c in children]
            assert row[key] == statistics.median(c[key] for c in children)
        assert rows["ltri"]["round_position"] == [1, 2] and rows["streaming"]["round_position"] == [2, 1]
    report = (tmp_path / "bench.md").read_text()
    assert "Rounds (each mode in a process of its own per round" in report
    assert "in each of 2 rounds, the median over the rounds" in report
