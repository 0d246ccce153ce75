"""Tuning: candidates are valid configs around the defaults, ranked by dev score."""

from __future__ import annotations

import argparse

from benchmarks.evaluate import system_config
from benchmarks.tune import candidates, rank


def test_candidates_are_valid_and_keep_the_working_set() -> None:
    args = argparse.Namespace(window=4096, budget=2048, chunk=2048, sinks=128)
    systems = candidates(4096, 2048)
    assert systems[0].name == "ltri" and len({s.name for s in systems}) == len(systems)
    for system in systems:
        cfg = system_config(system, args)
        assert cfg.mode == "ltri"
        assert cfg.local_window + cfg.budget == 4096 + 2048  # same tokens in attention for every candidate


def test_rank_prefers_score_then_the_default() -> None:
    rows = [{"system": s, "score": v} for s, v in [("a", 1.0), ("a", 0.0), ("ltri", 0.5), ("ltri", 0.5),
                                                    ("b", 1.0), ("b", 1.0)]]
    assert [name for name, _, _ in rank(rows)] == ["b", "ltri", "a"]


def test_tune_cli_ranks_on_dev_then_runs_the_test_split(tmp_path, monkeypatch) -> None:
    import json

    import ltri_rag
    from benchmarks import tune
    from tests.unit.tiny_models import tiny_model
    from tests.unit.tiny_tokenizer import tiny_tokenizer

    loaded = (tiny_model("llama"), tiny_tokenizer())
    monkeypatch.setattr(ltri_rag, "load_model", lambda *a, **k: loaded)
    common = ["--model", "tiny=x", "--tasks", "niah_single", "--lengths", "1500", "--samples", "1", "--window", "64",
              "--budget", "64", "--chunk", "128", "--sinks", "8", "--dtype", "float32", "--device", "cpu",
              "--out", str(tmp_path)]
    tune.main(common + ["--test"])
    result = json.loads((tmp_path / "tuning.json").read_text())
    assert result["complete"] and len(result["ranking"]) == len(candidates(64, 64))
    dev_rows = [json.loads(line) for line in (tmp_path / "dev" / "samples.jsonl").read_text().splitlines()]
    assert {r["split"] for r in dev_rows} == {"dev"} and len(dev_rows) == len(candidates(64, 64))
    test_rows = [json.loads(line) for line in (tmp_path / "test" / "samples.jsonl").read_text().splitlines()]
    assert {r["split"] for r in test_rows} == {"test"}
    assert {r["system"] for r in test_rows} == {"ltri", result["best"]}
    assert not {r["seed"] for r in dev_rows} & {r["seed"] for r in test_rows}
    assert "# Tuning on the dev split (complete)" in (tmp_path / "tuning.md").read_text()


def _rows(system: str, scores: list[float]) -> list[dict]:
    return [{"model": "m", "system": system, "task": "t", "length": 1, "seed": i, "score": v}
            for i, v in enumerate(scores)]


def test_paired_difference_counts_only_shared_samples() -> None:
    from benchmarks.tune import paired

    rows = _rows("ltri", [0, 1, 0, 1]) + _rows("a", [1, 1, 1]) + _rows("b", [0, 0, 0, 0])
    by_name = {p.name: p for p in paired(rows)}
    a, b = by_name["a"], by_name["b"]
    assert (a.n, a.wins, a.losses) == (3, 2, 0) and abs(a.diff - 2 / 3) < 1e-9
    assert (b.n, b.wins, b.losses) == (4, 0, 2) and abs(b.diff + 0.5) < 1e-9
    assert a.lo <= a.diff <= a.hi and b.lo <= b.diff <= b.hi


def test_paired_difference_needs_the_same_depth() -> None:
    """The same seed at another needle depth (a run with another --samples) is another prompt: no pair."""
    from benchmarks.tune import paired

    rows = _rows("ltri", [0, 1, 1]) + _rows("a", [1, 1, 1])
    rows[1]["depth"], rows[4]["depth"] = 0.35, 0.132
    (a,) = paired(rows)
    assert (a.n, a.wins, a.losses) == (2, 1, 0)


def test_grid_rows_keep_this_grid_and_need_every_cell() -> None:
    from benchmarks.evaluate import sample_plan
    from benchmarks.tune import grid_rows

    plan = sample_plan(2, "dev")
    rows = [{"model": "m", "system": s, "task": "t", "length": 8, "seed": seed, "depth": depth, "score": 1.0}
            for s in ("ltri", "a") for _, depth, seed in plan]
    stale = [dict(rows[0], task="other"), dict(rows[0], length=16), dict(rows[0], depth=0.5),
             dict(rows[0], system="old"), dict(rows[0], model="x")]
    kept, complete = grid_rows(rows + stale, ["m"], ["t"], [8], 2, ["ltri", "a"])
    assert kept == rows and complete
    # as many rows as the grid needs, one of them from another sample plan: not complete
    kept, complete = grid_rows(rows[:-1] + [dict(rows[-1], depth=0.5)], ["m"], ["t"], [8], 2, ["ltri", "a"])
    assert len(kept) == 3 and not complete


def test_choose_keeps_the_default_unless_the_gain_is_clear() -> None:
    from benchmarks.tune import choose, paired

    base = [0.0] * 10 + [1.0] * 10
    noisy = _rows("ltri", base) + _rows("noisy", [1.0] + base[1:19] + [0.0])  # one win, one loss
    clear = _rows("clear", [1.0] * 20)  # wins all 10 samples the default missed
    assert choose(paired(noisy), complete=True) == "ltri"
    assert choose(paired(noisy + clear), complete=True) == "clear"
    assert choose(paired(noisy + clear), complete=False) == "ltri"  # never choose on an unfinished grid
