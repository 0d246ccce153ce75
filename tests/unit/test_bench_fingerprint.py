"""The fingerprint benchmark runs end to end on a small random model (speed numbers are not tested)."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_fingerprint import main, random_model
from ltri_rag.memory_fingerprint import weights_sha256


@pytest.mark.parametrize("num_params", [1, 4095, 5000, (1 << 24) + 7])
def test_random_model_holds_exactly_the_values_asked(num_params) -> None:
    model = random_model(num_params)
    assert sum(p.numel() for p in model.parameters()) == num_params
    assert all(p.numel() <= 1 << 24 for p in model.parameters())


def test_small_run_writes_both_versions(tmp_path) -> None:
    main(["--random-params", "20000", "--reps", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["meta"]["params"] == 20000
    assert [r["version"] for r in saved["rows"]] == [1, 2]
    assert all(r["seconds"] > 0 and r["cached_agrees"] is True for r in saved["rows"])
    assert "| 2 | every value" in (tmp_path / "bench.md").read_text()
    assert weights_sha256(random_model(20000)) == weights_sha256(random_model(20000))  # seeded: reproducible


def test_bad_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["--random-params", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--random-params", "10", "--reps", "0", "--out", str(tmp_path)])
