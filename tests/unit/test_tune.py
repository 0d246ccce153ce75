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
