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
